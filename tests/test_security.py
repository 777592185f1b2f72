"""Security: Supabase row-level security and hostile values stored as data. (Secrets never shown:
the production deployment of tests/test_settings.py plants them and scans what its run wrote.)"""

from __future__ import annotations

import json
import uuid

import dagster as dg
import numpy as np
import psycopg
import pytest

from retrieval_assets.defs.conversations.assets import conversation_chunks, conversations
from retrieval_assets.lib.connection import connect
from retrieval_assets.lib.lancedb_store import CHUNKS_TABLE
from retrieval_assets.lib.schema import ensure_schema
from tests.conftest import ALL_SHARDS, coarse_vectors, titan_vectors

SUPABASE_LIKE = """
DO $$ BEGIN
  IF to_regrole('anon') IS NULL THEN CREATE ROLE anon NOLOGIN; END IF;
  IF to_regrole('authenticated') IS NULL THEN CREATE ROLE authenticated NOLOGIN; END IF;
END $$;
CREATE SCHEMA auth;
-- As Supabase defines it: the user id from the request's JWT claims.
CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS
  $$ SELECT nullif(current_setting('request.jwt.claim.sub', true), '')::uuid $$;
GRANT USAGE ON SCHEMA auth, public TO anon, authenticated;
GRANT EXECUTE ON FUNCTION auth.uid() TO anon, authenticated;
-- Supabase grants every new public table to the API roles; RLS is what protects them.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated;
"""


@pytest.fixture
def supabase_like(pg_url: str) -> str:
    """A database shaped like Supabase (API roles, auth.uid()), migrated to head."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS supabase_like WITH (FORCE)")
        conn.execute("CREATE DATABASE supabase_like")
    url = "postgresql://postgres:@/supabase_like?" + pg_url.split("?", 1)[1]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SUPABASE_LIKE)
    ensure_schema(url, upgrade=True)
    return url


def test_supabase_users_read_only_their_own_rows_even_through_match(supabase_like):
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    dims = 1024
    rng = np.random.default_rng(0)
    with connect(supabase_like) as conn:  # the pipeline's role: the owner, not subject to RLS
        for user in (alice, bob):
            conn.execute(
                "INSERT INTO conversations (id, external_id, user_id, source, source_format, "
                "origin, turns, turn_count, content_hash) "
                "VALUES (%s, %s, %s, 's', 'jsonl', 'o', '[]', 0, 'h')",
                [f"conv-{user}", f"conv-{user}", user],
            )
            for i in range(5):
                vector = rng.normal(size=dims).astype(np.float32)
                conn.execute(
                    "INSERT INTO conversation_chunks (chunk_id, user_id, conversation_id, tier, "
                    "chunk_index, turn_start, turn_end, roles, content, content_hash, "
                    "token_count, embedding, embedding_model) VALUES (%s, %s, %s, 'medium', %s, "
                    "0, 0, '{user}', %s, 'h', 1, %s, 'm')",
                    [
                        f"{user[:8]}{i:024x}",
                        user,
                        f"conv-{user}",
                        i,
                        # each user's secret word: the lexicon must not reveal it to the other
                        f"text about {'aardvarks' if user == bob else 'tulips'} number {i}",
                        vector / np.linalg.norm(vector),
                    ],
                )
        assert conn.execute("SELECT count(*) FROM conversation_chunks").fetchone()[0] == 10
        conn.execute("SELECT refresh_chunk_lexicon()")
    query = rng.normal(size=dims).astype(np.float32)
    with connect(supabase_like, autocommit=True) as conn:
        conn.execute("SET ROLE authenticated")
        conn.execute("SELECT set_config('request.jwt.claim.sub', %s, false)", [alice])
        users = conn.execute("SELECT DISTINCT user_id FROM conversation_chunks").fetchall()
        assert users == [(alice,)]
        matched = conn.execute(
            "SELECT user_id FROM match_conversation_chunks(%s, -1, 100, NULL)", [query]
        ).fetchall()
        assert len(matched) == 5 and {u for (u,) in matched} == {alice}
        asked_for_bob = conn.execute(
            "SELECT count(*) FROM match_conversation_chunks(%s, -1, 100, %s)", [query, bob]
        ).fetchone()[0]
        assert asked_for_bob == 0
        # Lexical and hybrid: only her rows, and the statistics tell nothing of Bob's words.
        lexicon = conn.execute("SELECT DISTINCT user_id FROM chunk_lexicon").fetchall()
        assert lexicon == [(alice,)]
        assert not conn.execute("SELECT 1 FROM chunk_lexicon WHERE lexeme = 'aardvark'").fetchall()
        for call, args in (
            ("match_conversation_chunks_lexical(%s, 100, NULL)", ["aardvarks tulips"]),
            ("match_conversation_chunks_hybrid(%s, %s, 100, NULL)", [query, "aardvarks tulips"]),
            ("match_conversation_chunks_hybrid(%s, %s, 100, %s)", [query, "aardvarks", bob]),
        ):
            found = conn.execute(f"SELECT user_id FROM {call}", args).fetchall()
            assert {u for (u,) in found} <= {alice}, call
        lexical = conn.execute(
            "SELECT count(*) FROM match_conversation_chunks_lexical('tulips', 100, NULL)"
        ).fetchone()[0]
        assert lexical == 5
        for statement in (
            "DELETE FROM conversation_chunks",
            "UPDATE conversation_chunks SET content = 'x'",
            "SELECT count(*) FROM embedding_failures",
            "SELECT count(*) FROM embedding_schema_versions",
            "DELETE FROM chunk_lexicon",
            "SELECT refresh_chunk_lexicon()",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    with connect(supabase_like, autocommit=True) as conn:
        conn.execute("SET ROLE anon")
        for statement in (
            "SELECT count(*) FROM conversation_chunks",
            "SELECT count(*) FROM match_conversation_chunks_hybrid(%s, 'tulips')",
            "SELECT count(*) FROM match_conversation_chunks_hybrid_by_tier(%s, 'tulips')",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement, [query] if "%s" in statement else None)


def test_plain_postgres_is_left_without_policies(db):
    with connect(db) as conn:
        assert not conn.execute(
            "SELECT relrowsecurity FROM pg_class WHERE relname = 'conversation_chunks'"
        ).fetchone()[0]


HOSTILE = [
    "'; DROP TABLE conversation_chunks; --",
    "x' OR '1'='1",
    'quote " and backslash \\ and $$dollar$$',
    "percent %s %(name)s {brace}",
]


def test_hostile_ids_users_and_text_are_stored_as_data(
    tmp_path, make_graph_resources, make_bedrock, db, lance_uri
):
    source = tmp_path / "hostile.jsonl"
    with source.open("w") as out:
        for i, value in enumerate(HOSTILE):
            for role in ("user", "assistant"):
                out.write(
                    json.dumps(
                        {
                            "conversation_id": value,
                            "user_id": value,
                            "role": role,
                            "content": f"{value} — message {i} from the {role}",
                        }
                    )
                    + "\n"
                )
    resources = {**make_graph_resources(source), "titan_model": make_bedrock()}
    dg.materialize(
        [conversations, conversation_chunks, coarse_vectors, titan_vectors],
        tags=ALL_SHARDS,
        resources=resources,
    )
    with connect(db) as conn:
        stored = conn.execute("SELECT external_id, user_id FROM conversations").fetchall()
        assert sorted(stored) == sorted((v, v) for v in HOSTILE)
        chunks = conn.execute(
            "SELECT user_id, content, embedding IS NOT NULL FROM conversation_chunks"
        ).fetchall()
    assert {u for u, _, _ in chunks} == set(HOSTILE) and all(e for _, _, e in chunks)
    assert all(u in c for u, c, _ in chunks)  # the text came through intact
    import lancedb

    table = lancedb.connect(lance_uri).open_table(CHUNKS_TABLE)
    assert set(table.to_arrow().column("user_id").to_pylist()) == set(HOSTILE)
    assert table.count_rows("vector_coarse IS NULL") == 0
