"""Alembic owns the schema: up, down, up again; offline SQL; Titan dimension changes; revisions
and the SQL files they install frozen."""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
from alembic import command

from retrieval_assets.lib.connection import connect
from retrieval_assets.lib.embedded_postgres import hold_embedded
from retrieval_assets.lib.paths import MIGRATIONS_DIR
from retrieval_assets.lib.schema import (
    SchemaNotReady,
    alembic_config,
    current_revision,
    embedding_dims,
    ensure_schema,
    head_revision,
    write_titan_dims_revision,
)


@pytest.fixture(scope="module")
def fresh_url(tmp_path_factory) -> Iterator[str]:
    """A server of its own: these tests drop and recreate the whole schema."""
    with hold_embedded(tmp_path_factory.mktemp("pg-migrations")) as url:
        yield url


def tables(url: str) -> set[str]:
    with connect(url) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {r[0] for r in rows}


def index_method(url: str, index: str) -> str | None:
    with connect(url) as conn:
        row = conn.execute(
            "SELECT am.amname FROM pg_class i JOIN pg_am am ON am.oid = i.relam "
            "WHERE i.relname = %s",
            [index],
        ).fetchone()
        return row[0] if row else None


def test_upgrade_downgrade_upgrade(fresh_url):
    cfg = alembic_config(fresh_url)
    command.upgrade(cfg, "head")
    assert {"conversations", "conversation_chunks", "embedding_schema_versions"} <= tables(
        fresh_url
    )
    assert index_method(fresh_url, "conversation_chunks_embedding_hnsw") == "hnsw"
    with connect(fresh_url) as conn:
        seeded = conn.execute(
            "SELECT store, column_name, model, dims FROM embedding_schema_versions "
            "WHERE retired_at IS NULL ORDER BY store, column_name"
        ).fetchall()
        functions = {
            r[0]
            for r in conn.execute(
                "SELECT proname FROM pg_proc WHERE proname LIKE 'match_conversation_chunks%'"
            )
        }
    assert [(s, c) for s, c, _, _ in seeded] == [
        ("lancedb", "vector_coarse"),  # seeded as vector_fastembed, renamed by 0008
        ("lancedb", "vector_fine"),  # seeded as vector
        ("postgres", "embedding"),
    ]
    assert seeded[2][2:] == ("amazon.titan-embed-text-v2:0", 1024)
    assert functions == {
        "match_conversation_chunks",
        "match_conversation_chunks_by_tier",
        "match_conversation_chunks_lexical",
        "match_conversation_chunks_hybrid",
        "match_conversation_chunks_hybrid_by_tier",
    }

    command.downgrade(cfg, "base")
    assert tables(fresh_url) == {"alembic_version"}
    assert current_revision(fresh_url) is None
    command.upgrade(cfg, "head")
    assert current_revision(fresh_url) == head_revision()


def test_the_hybrid_functions_default_to_the_librarys_weights(fresh_url):
    """A Supabase client calling the RPC without weights gets the fusion the Python side uses."""
    from retrieval_assets.lib.search import CONTEXT_WEIGHT, HYBRID_CANDIDATES, LEXICAL_WEIGHT

    command.upgrade(alembic_config(fresh_url), "head")
    with connect(fresh_url) as conn:
        arguments = dict(
            conn.execute(
                "SELECT proname, pg_get_function_arguments(oid) FROM pg_proc "
                "WHERE proname LIKE 'match_conversation_chunks_hybrid%'"
            ).fetchall()
        )
    for name in ("match_conversation_chunks_hybrid", "match_conversation_chunks_hybrid_by_tier"):
        assert f"lexical_weight double precision DEFAULT {LEXICAL_WEIGHT}" in arguments[name]
        assert f"context_weight double precision DEFAULT {CONTEXT_WEIGHT}" in arguments[name]
    assert (
        f"candidates integer DEFAULT {HYBRID_CANDIDATES}"
        in arguments["match_conversation_chunks_hybrid_by_tier"]
    )


def test_upgrade_replaces_an_ivfflat_index(fresh_url):
    cfg = alembic_config(fresh_url)
    command.downgrade(cfg, "base")
    command.upgrade(cfg, "0001")
    with connect(fresh_url) as conn:  # the index the seed deployments carried
        conn.execute(
            "CREATE INDEX conversation_chunks_embedding_ivfflat ON conversation_chunks "
            "USING ivfflat (embedding vector_cosine_ops) WITH (lists = 10)"
        )
    command.upgrade(cfg, "head")
    assert index_method(fresh_url, "conversation_chunks_embedding_ivfflat") is None
    assert index_method(fresh_url, "conversation_chunks_embedding_hnsw") == "hnsw"
    command.downgrade(cfg, "0001")
    assert index_method(fresh_url, "conversation_chunks_embedding_hnsw") is None
    command.upgrade(cfg, "head")


def column_state(url: str) -> tuple[str, str, str | None]:
    """(type, storage, the HNSW index's opclass) of conversation_chunks.embedding."""
    with connect(url) as conn:
        return conn.execute(
            "SELECT format_type(a.atttypid, a.atttypmod), a.attstorage, "
            "(SELECT o.opcname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
            " JOIN pg_opclass o ON o.oid = x.indclass[0] "
            " WHERE i.relname = 'conversation_chunks_embedding_hnsw') "
            "FROM pg_attribute a WHERE a.attrelid = 'conversation_chunks'::regclass "
            "AND a.attname = 'embedding'"
        ).fetchone()


def test_half_precision_keeps_stored_vectors_and_the_match_functions_work(fresh_url):
    cfg = alembic_config(fresh_url)
    command.downgrade(cfg, "base")
    command.upgrade(cfg, "0005")
    vector = [((i * 37) % 101 - 50) / 400 for i in range(1024)]
    with connect(fresh_url) as conn:
        conn.execute(
            "INSERT INTO conversations (id, user_id, source, source_format, origin, "
            "turns, turn_count, content_hash) VALUES ('c', 'u', 's', 'f', 'o', '[]', 0, 'h')"
        )
        conn.execute(
            "INSERT INTO conversation_chunks (chunk_id, user_id, conversation_id, tier, "
            "chunk_index, turn_start, turn_end, roles, content, content_hash, token_count, "
            "embedding, embedding_model) VALUES ('k', 'u', 'c', 'medium', 0, 0, 0, '{user}', "
            "'t', 'h', 1, %s::vector, 'titan')",
            [str(vector)],
        )
    assert column_state(fresh_url) == ("vector(1024)", "e", "vector_cosine_ops")

    def match() -> tuple[str, str, float]:
        with connect(fresh_url) as conn:
            return conn.execute(
                "SELECT chunk_id, embedding_model, similarity FROM "
                "match_conversation_chunks(%s::vector, 0.5, 5, 'u')",
                [str(vector)],
            ).fetchone()

    for target, state in (
        ("head", ("halfvec(1024)", "e", "halfvec_cosine_ops")),
        ("0005", ("vector(1024)", "e", "vector_cosine_ops")),
    ):
        command.upgrade(cfg, target) if target == "head" else command.downgrade(cfg, target)
        assert column_state(fresh_url) == state
        chunk_id, model, similarity = match()  # the vector survived, still labelled
        assert (chunk_id, model) == ("k", "titan")
        assert similarity == pytest.approx(1.0, abs=1e-3)
    command.upgrade(cfg, "head")


def test_production_database_behind_head_is_a_clear_error(fresh_url):
    command.downgrade(alembic_config(fresh_url), "base")
    with pytest.raises(SchemaNotReady, match="alembic upgrade head"):
        ensure_schema(fresh_url, upgrade=False)
    ensure_schema(fresh_url, upgrade=True)
    assert current_revision(fresh_url) == head_revision()


def offline_sql(**env: str) -> subprocess.CompletedProcess:
    """`alembic upgrade head --sql`, as a Supabase user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head", "--sql"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )


def test_offline_sql_renders_a_pasteable_script():
    sql = offline_sql().stdout
    assert "CREATE TABLE conversation_chunks" in sql
    assert "embedding        vector(1024)" in sql
    assert "USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)" in sql
    assert "ALTER COLUMN embedding TYPE halfvec(%s)" in sql  # 0006
    assert "USING hnsw (embedding halfvec_cosine_ops) WITH (m = 16, ef_construction = 64)" in sql
    assert "query halfvec := query_embedding::halfvec;" in sql
    assert "CREATE OR REPLACE FUNCTION match_conversation_chunks_by_tier" in sql
    assert "CREATE TABLE embedding_failures" in sql
    assert sql.rstrip().endswith("COMMIT;")


def test_titan_dimensions_come_from_the_environment_and_768_is_refused():
    assert "vector(512)" in offline_sql(TITAN_DIMENSIONS="512").stdout
    bad = offline_sql(TITAN_DIMENSIONS="768")
    assert bad.returncode != 0
    assert "must be one of 256, 512, 1024; got '768'" in bad.stderr


def test_changing_titan_dimensions_migrates_without_mixing_vectors(fresh_url, tmp_path):
    scripts = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, scripts)
    shutil.copytree(MIGRATIONS_DIR.parent / "sql", tmp_path / "sql")  # revisions read it beside
    cfg = alembic_config(fresh_url, script_location=scripts)
    ensure_schema(fresh_url, upgrade=True, cfg=cfg)
    with connect(fresh_url) as conn:
        conn.execute("TRUNCATE conversations CASCADE")
        conn.execute(
            "INSERT INTO conversations (id, external_id, user_id, source, source_format, origin, "
            "turns, turn_count, content_hash) VALUES ('c', 'c', 'u', 's', 'f', 'o', '[]', 0, 'h')"
        )
        conn.execute(
            "INSERT INTO conversation_chunks (chunk_id, user_id, conversation_id, tier, "
            "chunk_index,"
            " turn_start, turn_end, roles, content, content_hash, token_count, embedding,"
            " embedding_model) VALUES ('k', 'u', 'c', 'medium', 0, 0, 0, '{user}', 't', 'h', 1,"
            " array_fill(0.1, ARRAY[1024])::vector, 'titan')"
        )
        assert embedding_dims(conn) == 1024

    revision = write_titan_dims_revision(1024, 512, cfg=cfg)
    assert revision.parent == scripts / "versions"
    assert not (MIGRATIONS_DIR / "versions" / revision.name).exists()
    command.upgrade(cfg, "head")
    with connect(fresh_url) as conn:
        assert embedding_dims(conn) == 512
        assert conn.execute(
            "SELECT embedding, embedding_model FROM conversation_chunks"
        ).fetchone() == (None, None)
        current = conn.execute(
            "SELECT dims FROM embedding_schema_versions WHERE store = "
            "'postgres' AND retired_at IS NULL"
        ).fetchall()
        retired = conn.execute(
            "SELECT count(*) FROM embedding_schema_versions WHERE store = "
            "'postgres' AND retired_at IS NOT NULL"
        ).fetchone()[0]
    assert current == [(512,)] and retired == 1
    assert index_method(fresh_url, "conversation_chunks_embedding_hnsw") == "hnsw"

    command.downgrade(cfg, "-1")
    with connect(fresh_url) as conn:
        assert embedding_dims(conn) == 1024
    command.downgrade(cfg, "base")
    command.upgrade(alembic_config(fresh_url), "head")


# Every SQL file a revision installs, with its content's sha256: a revision installs the file as
# it was when the revision was written, so the file never changes (a change is a new file).
FROZEN_SQL = {
    "match_conversation_chunks_v1.sql": (
        "e2542d79029fe091db4862c33268ffeef026870d5f96b68bff4bb4f9ba76088a"
    ),
    "match_conversation_chunks_lexical_v1.sql": (
        "3a55a8799bfa0fa7d169f752b89b5c72f54c5cce3a66fc489f84d07f90556ae5"
    ),
    "match_conversation_chunks_hybrid_v2.sql": (
        "c58de20656f8e252898ea550bac81d0ed1e4799635110388f49c8199263d8373"
    ),
}


def test_sql_files_are_frozen():
    sql_dir = MIGRATIONS_DIR.parent / "sql"
    found = {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sql_dir.glob("*.sql")
    }
    assert found == FROZEN_SQL, (
        "an SQL file a revision installs changed, or a new one is not listed in FROZEN_SQL: "
        "write a new file and a new revision instead of editing one"
    )


def test_revisions_import_no_project_code():
    """A revision runs the SQL it was written with, never today's library code."""
    for path in sorted((MIGRATIONS_DIR / "versions").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not [n for n in names if n.split(".")[0] == "retrieval_assets"], path.name


def test_a_generated_titan_revision_is_frozen_too(tmp_path):
    scripts = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, scripts)
    revision = write_titan_dims_revision(1024, 256, cfg=alembic_config(script_location=scripts))
    text = revision.read_text()
    assert "retrieval_assets" not in text.split('"""')[2]  # the code, past the docstring
    assert "halfvec(256)" in text and "halfvec(1024)" in text
