"""Lexical and hybrid search in both stores, on a real conversation (LoCoMo's conversation 30),
through the graph: the lexical indexes follow the chunks, their checks see when they do not, and
the three modes answer per user in both stores with one fusion."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import pytest

from retrieval_assets.defs.conversations.assets import conversation_chunks, conversations
from retrieval_assets.defs.lexical.assets import lancedb_lexical_index, postgres_lexical_index
from retrieval_assets.lib.connection import connect
from retrieval_assets.lib.lancedb_store import LanceDBResource
from retrieval_assets.lib.search import (
    HYBRID_CANDIDATES,
    LEXICAL_WEIGHT,
    fuse,
    lexical_search,
    postgres_match,
    postgres_search,
    search,
)
from tests.benchmarks.locomo import write_export
from tests.conftest import (
    ALL_SHARDS,
    coarse_vectors,
    emptied,
    fine_vectors,
    local_bedrock,
    store_resources,
    titan_vectors,
    with_models,
)

GRAPH = [
    conversations,
    conversation_chunks,
    coarse_vectors,
    fine_vectors,
    titan_vectors,
    lancedb_lexical_index,
    postgres_lexical_index,
]
USER = "locomo-30"


def checks(result) -> dict[str, bool]:
    return {
        f"{e.asset_key.path[0]}:{e.check_name}": e.passed
        for e in result.get_asset_check_evaluations()
    }


def materialized(result, key: str) -> dict:
    for event in result.get_asset_materialization_events():
        if event.asset_key.to_user_string() == key:
            return {k: v.value for k, v in event.materialization.metadata.items()}
    raise KeyError(key)


@pytest.fixture(scope="module")
def locomo(tmp_path_factory, pg_url, chunker_resource, fastembed, sentence_transformer, model_dir):
    """Conversation 30 through the graph once for the file (embedding it is most of the file's
    time): the tests read it, and the last one adds to it."""
    root = tmp_path_factory.mktemp("locomo")
    source = root / "source"
    source.mkdir()
    questions = write_export(source / "locomo.jsonl", ["30"])
    titan = local_bedrock(model_dir)
    stores = store_resources(emptied(pg_url), str(root / "lancedb"), chunker_resource, source)
    resources = {**with_models(stores, fastembed, sentence_transformer), "titan_model": titan}
    try:
        yield (
            source,
            questions,
            resources,
            dg.materialize(GRAPH, resources=resources, tags=ALL_SHARDS),
        )
    finally:
        titan.teardown_after_execution(None)


def test_three_modes_per_user_in_both_stores_with_one_fusion(locomo):
    _, questions, resources, _ = locomo
    lance: LanceDBResource = resources["lancedb"]
    titan = resources["titan_model"]
    agree = []
    with (
        lance.get_connection() as db,
        connect(resources["postgres"].database_url) as conn,
    ):
        table = lance.chunks_table(db)
        for q in questions[:25]:
            both = {}
            for mode in ("dense", "lexical", "hybrid"):
                lance_hits = search(
                    table,
                    resources["coarse_model"],
                    resources["fine_model"],
                    q.text,
                    10,
                    USER,
                    mode=mode,
                )
                pg_hits = postgres_search(conn, titan, q.text, 10, USER, mode=mode)
                for hits in (lance_hits, pg_hits):
                    # Lexical finds only chunks sharing a word with the question.
                    assert len(hits) == 10 or (mode == "lexical" and hits), (mode, q.text)
                    assert {h.user_id for h in hits} == {USER}
                    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
                both[mode] = (lance_hits, pg_hits)
            # Postgres fuses in SQL exactly as the Python fusion does over its two lists.
            dense = postgres_match(conn, titan.embed_query(q.text), HYBRID_CANDIDATES, USER)
            lexical = postgres_search(conn, titan, q.text, HYBRID_CANDIDATES, USER, mode="lexical")
            python = fuse(dense, lexical, 10, LEXICAL_WEIGHT)
            sql = both["hybrid"][1]
            assert [h.chunk_id for h in sql] == [h.chunk_id for h in python]
            assert np.allclose([h.score for h in sql], [h.score for h in python], atol=1e-6)
            lance_ids = {h.chunk_id for h in both["hybrid"][0]}
            agree.append(len(lance_ids & {h.chunk_id for h in sql}) / 10)
            # The names of the speakers are in the chunks (LoCoMo's JSONL carries them).
            assert any("Jon:" in h.content or "Gina:" in h.content for h in both["hybrid"][0])
    # The stores' dense rankings are the same model's here; their BM25s tokenize alike.
    assert np.mean(agree) >= 0.8, agree
    # Another user's query never sees this user's chunks, in any mode or store.
    with lance.get_connection() as db, connect(resources["postgres"].database_url) as conn:
        for mode in ("dense", "lexical", "hybrid"):
            assert not search(
                lance.chunks_table(db),
                resources["coarse_model"],
                resources["fine_model"],
                questions[0].text,
                10,
                "nobody' OR '1'='1",
                mode=mode,
            )
            assert not postgres_search(conn, titan, questions[0].text, 10, "nobody", mode=mode)


def test_a_query_without_words_finds_nothing_lexically(locomo):
    _, _, resources, _ = locomo
    lance: LanceDBResource = resources["lancedb"]
    with lance.get_connection() as db, connect(resources["postgres"].database_url) as conn:
        for text in ("", "?!", "the and of"):
            assert lexical_search(lance.chunks_table(db), text, 5, USER) == []
            assert postgres_search(conn, None, text, 5, USER, mode="lexical") == []


def test_lexical_indexes_cover_new_chunks_and_their_checks_say_when_not(locomo):
    """Last in the file: it adds a conversation to the graph the others read."""
    source, _, resources, first = locomo
    found = checks(first)
    assert found["lancedb:lexical_index_covers_chunks"], found
    assert found["postgres:lexical_index_covers_chunks"], found
    assert all(found.values()), found
    assert materialized(first, "lancedb/lexical_index")["action"] == "created"
    assert materialized(first, "lancedb/lexical_index")["unindexed_rows"] == 0
    # A new conversation arrives; only the chunk assets run.
    with (source / "locomo.jsonl").open("a") as out:
        for role, text in (("user", "My zebrafish tank needs a new heater"), ("assistant", "ok")):
            out.write(
                json.dumps(
                    {"conversation_id": "late", "user_id": USER, "role": role, "content": text}
                )
                + "\n"
            )
    dg.materialize([conversations, conversation_chunks], resources=resources)
    lance: LanceDBResource = resources["lancedb"]
    with lance.get_connection() as db:
        table = lance.chunks_table(db)
        # Found before the index catches up: LanceDB scans the rows the index lacks, Postgres'
        # tsvector is generated with the row.
        assert "zebrafish" in lexical_search(table, "zebrafish heater", 5, USER)[0].content
    with connect(resources["postgres"].database_url) as conn:
        found = postgres_search(conn, None, "zebrafish heater", 5, USER, mode="lexical")
        assert "zebrafish" in found[0].content
    # The checks alone (as the nightly job runs them): the indexes' steps, materializing nothing.
    behind = dg.materialize(
        [lancedb_lexical_index, postgres_lexical_index],
        resources=resources,
        selection=dg.AssetSelection.checks_for_assets(
            lancedb_lexical_index, postgres_lexical_index
        ),
    )
    assert set(checks(behind)) == {
        "lancedb:lexical_index_covers_chunks",
        "postgres:lexical_index_covers_chunks",
    }
    assert set(checks(behind).values()) == {False}
    assert not behind.get_asset_materialization_events()
    caught_up = dg.materialize(GRAPH, resources=resources, tags=ALL_SHARDS)
    assert materialized(caught_up, "lancedb/lexical_index")["action"] == "updated"
    assert materialized(caught_up, "postgres/lexical_index")["action"] == "updated"
    assert all(checks(caught_up).values()), checks(caught_up)
