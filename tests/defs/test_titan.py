"""Titan vectors in Postgres: the asset, failures and quarantine, and the match functions."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pytest

from retrieval_assets.defs.conversations.assets import conversation_chunks, conversations
from retrieval_assets.lib.bedrock import LocalFaults
from retrieval_assets.lib.bedrock_emulator import projection
from retrieval_assets.lib.connection import connect
from retrieval_assets.lib.paths import SAMPLE_DATA_DIR
from retrieval_assets.lib.search import postgres_match
from retrieval_assets.lib.titan import (
    TitanSchemaMismatch,
    VectorOutOfRange,
    check_dimensions,
    ensure_titan_model,
    replay_quarantine,
    write_vectors,
)
from tests.conftest import ALL_SHARDS, real_sentences, titan_vectors

GRAPH = [conversations, conversation_chunks, titan_vectors]


def run(resources: dict, bedrock) -> dg.ExecuteInProcessResult:
    return dg.materialize(GRAPH, resources={**resources, "titan_model": bedrock}, tags=ALL_SHARDS)


def meta(result) -> dict:
    for event in result.get_asset_materialization_events():
        if event.asset_key.to_user_string() == "postgres/titan_vectors":
            return {k: v.value for k, v in event.materialization.metadata.items()}
    raise KeyError("postgres/titan_vectors")


def counts(db) -> tuple[int, int]:
    with connect(db) as conn:
        return conn.execute(
            "SELECT count(*) FILTER (WHERE embedding IS NOT NULL), "
            "count(*) FILTER (WHERE embedding IS NULL) FROM conversation_chunks"
        ).fetchone()


def test_every_chunk_gets_a_labelled_titan_vector(make_resources, make_bedrock, db):
    result = run(make_resources(SAMPLE_DATA_DIR), make_bedrock())
    m = meta(result)
    embedded, missing = counts(db)
    assert missing == 0 and m["rows_embedded"] == embedded > 0 and m["nulls_remaining"] == 0
    assert m["vector_source"] == "local Bedrock endpoint" and m["dims"] == 1024
    assert m["stored_as"] == "halfvec(1024)"
    with connect(db) as conn:
        models = {
            r[0] for r in conn.execute("SELECT DISTINCT embedding_model FROM conversation_chunks")
        }
        norms = conn.execute(
            "SELECT min(l2_norm(embedding)), max(l2_norm(embedding)) FROM conversation_chunks"
        ).fetchone()
    assert models == {m["model"]} and m["model"].startswith("local-bedrock-endpoint:")
    assert norms == pytest.approx((1.0, 1.0), abs=1e-4)
    again = meta(run(make_resources(SAMPLE_DATA_DIR), make_bedrock()))
    assert again["rows_embedded"] == 0 and again["dagster/row_count"] == embedded
    assert m["dagster/row_count"] == embedded
    types = {c.name: c.type for c in m["dagster/column_schema"].columns}
    assert types["embedding"] == "halfvec(1024)" and list(types) == [
        "chunk_id",
        "embedding",
        "embedding_model",
        "embedded_at",
    ]


def test_injected_faults_lose_nothing(make_resources, make_bedrock, db):
    bedrock = make_bedrock(
        local_faults=LocalFaults(throttle_rate=0.3, error_rate=0.1, seed=3), max_attempts=12
    )
    m = meta(run(make_resources(SAMPLE_DATA_DIR), bedrock))
    assert counts(db)[1] == 0 and m["rows_failed"] == 0
    assert m["retries"] > 0 and m["invoke_attempts"] == m["local_endpoint_requests"]
    assert m["local_endpoint_throttled"] > 0 and m["local_endpoint_errors"] > 0


def test_failing_rows_stay_null_are_quarantined_and_can_be_replayed(
    make_resources, make_bedrock, db
):
    resources = make_resources(SAMPLE_DATA_DIR)
    broken = make_bedrock(local_faults=LocalFaults(error_rate=1.0), max_attempts=1)
    first = meta(run(resources, broken))
    total = counts(db)[1]
    assert first["rows_failed"] == total and first["rows_embedded"] == 0
    assert first["nulls_remaining"] == total and first["quarantined"] == 0
    run(resources, broken)
    third = dg.materialize(GRAPH, resources={**resources, "titan_model": broken}, tags=ALL_SHARDS)
    evaluation = next(
        e for e in third.get_asset_check_evaluations() if e.check_name == "no_quarantined_rows"
    )
    assert meta(third)["quarantined"] == total and not evaluation.passed
    assert meta(third)["nulls_remaining"] == 0  # quarantined rows are not retried forever
    with connect(db) as conn:
        errors = conn.execute(
            "SELECT DISTINCT attempts, last_error LIKE '%%503%%' OR last_error "
            "LIKE '%%500%%' FROM embedding_failures"
        ).fetchall()
    assert errors == [(3, True)]
    assert meta(run(resources, broken))["rows_failed"] == 0  # skipped, not retried

    with connect(db) as conn:
        assert replay_quarantine(conn) == total
    healed = meta(run(resources, make_bedrock()))
    assert healed["rows_embedded"] == total and healed["quarantined"] == 0
    with connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM embedding_failures").fetchone()[0] == 0


def test_a_different_producer_clears_the_column_instead_of_mixing(make_resources, make_bedrock, db):
    run(make_resources(SAMPLE_DATA_DIR), make_bedrock())
    embedded, _ = counts(db)
    with connect(db) as conn:
        assert ensure_titan_model(conn, "amazon.titan-embed-text-v2:0", 1024) == embedded
        assert ensure_titan_model(conn, "amazon.titan-embed-text-v2:0", 1024) == 0
    assert counts(db) == (0, embedded)


def test_a_dimension_mismatch_says_how_to_migrate(db):
    with connect(db) as conn, pytest.raises(TitanSchemaMismatch, match="titan-dims 512"):
        check_dimensions(conn, 512)


def add_chunks(conn, ids: list[str]) -> None:
    conn.execute(
        "INSERT INTO conversations (id, external_id, user_id, source, source_format, origin, "
        "turns, "
        "turn_count, content_hash) VALUES ('c', 'c', 'u', 's', 'f', 'o', '[]', 0, 'h')"
    )
    for n, chunk_id in enumerate(ids):
        conn.execute(
            "INSERT INTO conversation_chunks (chunk_id, user_id, conversation_id, tier, "
            "chunk_index, turn_start, turn_end, roles, content, content_hash, token_count) "
            "VALUES (%s, 'u', 'c', 'medium', %s, 0, 0, '{user}', 't', 'h', 1)",
            [chunk_id, n],
        )


def test_written_vectors_are_the_half_precision_of_what_was_sent(db):
    """The COPY stream is built by hand (numpy), so read back what Postgres stored: every
    component equals float16 rounding of the sent value, for ids of any length."""
    ids = ["0" * 32, "f" * 32, "short-id", "an id with 'quotes' and spaces"]
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((len(ids), 1024)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with connect(db) as conn:
        add_chunks(conn, ids)
        with conn.transaction():
            assert write_vectors(conn, list(zip(ids, vectors, strict=True)), "test-titan") == 4
        stored = dict(conn.execute("SELECT chunk_id, embedding FROM conversation_chunks"))
    for chunk_id, vector in zip(ids, vectors, strict=True):
        assert np.array_equal(stored[chunk_id].to_numpy(), vector.astype(np.float16))


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e6])
def test_a_vector_half_precision_cannot_hold_is_refused_naming_its_chunk(db, bad):
    ids = [f"{i:032x}" for i in range(3)]
    vectors = np.full((3, 1024), 0.03125, dtype=np.float32)
    vectors[1, 17] = bad
    with connect(db) as conn:
        add_chunks(conn, ids)
        conn.commit()
        with pytest.raises(VectorOutOfRange, match=ids[1]), conn.transaction():
            write_vectors(conn, list(zip(ids, vectors, strict=True)), "test-titan")
        assert (
            conn.execute(  # the batch is all or nothing
                "SELECT count(*) FROM conversation_chunks WHERE embedding IS NOT NULL"
            ).fetchone()[0]
            == 0
        )


# ------------------------------------------------------------------------ the match functions

USERS = 10


@pytest.fixture(scope="module")
def titan_corpus(pg_url, fastembed):
    """~1,700 real sentences with Titan-shaped (1024-d) vectors: 10 users, one rare user."""
    sentences = real_sentences(1_700)
    vectors = fastembed.embed_documents(sentences) @ projection(384, 1024)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with connect(pg_url) as conn:
        conn.execute("TRUNCATE conversations, conversation_chunks CASCADE")
        conn.execute(
            "INSERT INTO conversations (id, external_id, user_id, source, source_format, origin, "
            "turns, turn_count, content_hash) VALUES ('c', 'c', 'u', 's', 'f', 'o', '[]', "
            "0, 'h')"
        )
        with conn.cursor().copy(
            "COPY conversation_chunks (chunk_id, user_id, conversation_id, "
            "tier, chunk_index, turn_start, turn_end, roles, content, "
            "content_hash, token_count) FROM STDIN"
        ) as copy:
            for i, text in enumerate(sentences):
                user = "rare-user" if i < 3 else f"user-{i % USERS}"
                copy.write_row(
                    (
                        f"{i:032x}",
                        user,
                        "c",
                        "micro" if i % 2 else "medium",
                        i,
                        0,
                        0,
                        ["user"],
                        text,
                        "h",
                        10,
                    )
                )
        with conn.transaction():
            write_vectors(conn, [(f"{i:032x}", v) for i, v in enumerate(vectors)], "test-titan")
    yield sentences, vectors
    with connect(pg_url) as conn:
        conn.execute("TRUNCATE conversations CASCADE")


def query_vector(fastembed, text):
    v = fastembed.embed_documents([text])[0] @ projection(384, 1024)
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("count", [5, 40, 100, 300])
def test_match_returns_exactly_count_rows_with_and_without_a_user(
    pg_url, titan_corpus, fastembed, count
):
    q = query_vector(fastembed, "how do I parse command line arguments")
    with connect(pg_url) as conn:
        everyone = postgres_match(conn, q, k=count)
        one_user = postgres_match(conn, q, k=count, user="user-4")
        rare = postgres_match(conn, q, k=count, user="rare-user")
        conn.execute("SET enable_indexscan = off")  # exact ordering to compare with
        exact = postgres_match(conn, q, k=count)
    assert len(everyone) == count
    assert len(one_user) == min(count, sum(1 for i in range(3, 1_700) if i % USERS == 4))
    assert {h.user_id for h in one_user} == {"user-4"}
    assert len(rare) == 3
    _, vectors = titan_corpus
    user4 = [i for i in range(3, 1_700) if i % USERS == 4]
    qualifying = int((vectors[user4] @ q >= 0.1).sum())
    with connect(pg_url) as conn:
        above = postgres_match(conn, q, k=count, user="user-4", threshold=0.1)
    assert len(above) == min(count, qualifying)
    assert [h.score for h in everyone] == sorted((h.score for h in everyone), reverse=True)
    top = min(count, 10)
    recall = len({h.chunk_id for h in everyone[:top]} & {h.chunk_id for h in exact[:top]}) / top
    assert recall >= 0.9


def test_match_threshold_and_tier(pg_url, titan_corpus, fastembed):
    q = query_vector(fastembed, "read and write JSON documents")
    with connect(pg_url) as conn:
        loose = postgres_match(conn, q, k=50, threshold=0.0)
        strict = postgres_match(conn, q, k=50, threshold=loose[4].score)
        micro = postgres_match(conn, q, k=50, tier="micro")
        medium_of_user = postgres_match(conn, q, k=50, tier="medium", user="user-2")
        by_rpc = conn.execute(
            "SELECT count(*) FROM match_conversation_chunks(%s::vector, 0.0, 25, NULL)", [q]
        ).fetchone()[0]
    assert len(strict) == 5 and all(h.score >= loose[4].score for h in strict)
    assert len(micro) == 50 and {h.tier for h in micro} == {"micro"}
    assert {(h.tier, h.user_id) for h in medium_of_user} == {("medium", "user-2")}
    assert by_rpc == 25


@pytest.mark.parametrize(
    "hostile", ["x' OR '1'='1", "'; DROP TABLE conversation_chunks; --", "\\x00", "user-4\u0000"]
)
def test_hostile_user_values_are_data(pg_url, titan_corpus, fastembed, hostile):
    q = query_vector(fastembed, "anything")
    with connect(pg_url) as conn:
        try:
            hits = postgres_match(conn, q, k=10, user=hostile)
        except Exception as exc:  # NUL cannot be sent as text: refused, never executed
            assert "NUL" in str(exc) or "0x00" in str(exc)
            hits = []
        assert hits == []
        assert conn.execute("SELECT count(*) FROM conversation_chunks").fetchone()[0] == 1_700
