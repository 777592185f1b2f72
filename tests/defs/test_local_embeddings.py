"""Local embeddings and the coarse index: real models, real LanceDB, real Postgres."""

from __future__ import annotations

import json

import dagster as dg
import lancedb
import numpy as np
import pyarrow as pa
import pytest

from retrieval_assets.definitions import consistency_checks
from retrieval_assets.defs.coarse_index.assets import (
    chunk_table_maintenance,
    coarse_index,
    search_snapshot,
)
from retrieval_assets.defs.conversations.assets import conversation_chunks, conversations
from retrieval_assets.defs.vectors.columns import column_definitions
from retrieval_assets.lib.columns import COARSE, FINE
from retrieval_assets.lib.connection import connect
from retrieval_assets.lib.embedders import SentenceTransformerResource
from retrieval_assets.lib.lancedb_store import CHUNKS_TABLE, chunk_schema
from retrieval_assets.lib.lexical import ensure_lancedb_index
from retrieval_assets.lib.paths import SAMPLE_DATA_DIR
from retrieval_assets.lib.search import (
    RESULT_COLUMNS,
    coarse_search,
    dense_search,
    lexical_search,
    search,
)
from retrieval_assets.lib.search_snapshot import build, current
from retrieval_assets.lib.vectors import (
    count_nulls,
    ensure_coarse_index,
    ensure_vector_column,
    fill_nulls,
)
from tests.conftest import (
    ALL_SHARDS,
    EXTRA,
    coarse_vectors,
    fine_vectors,
    real_sentences,
)

GRAPH = [
    conversations,
    conversation_chunks,
    coarse_vectors,
    fine_vectors,
    coarse_index,
    chunk_table_maintenance,
    search_snapshot,
]


def run(resources, raise_on_error=True, instance=None):
    return dg.materialize(
        GRAPH,
        resources=resources,
        raise_on_error=raise_on_error,
        tags=ALL_SHARDS,
        instance=instance,
    )


def meta(result, key: str) -> dict:
    for event in result.get_asset_materialization_events():
        if event.asset_key.to_user_string() == key:
            return {k: v.value for k, v in event.materialization.metadata.items()}
    raise KeyError(key)


def table(uri: str):
    return lancedb.connect(uri).open_table(CHUNKS_TABLE)


def vectors_by_id(uri: str, column: str) -> dict[str, list[float] | None]:
    rows = table(uri).search().select(["chunk_id", column]).limit(None).to_arrow().to_pylist()
    return {r["chunk_id"]: r[column] for r in rows}


def test_both_columns_are_filled_and_recorded(make_graph_resources, db, lance_uri):
    result = run(make_graph_resources(SAMPLE_DATA_DIR))
    rows = table(lance_uri).count_rows()
    for key, column in (
        ("lancedb/coarse_vectors", COARSE.column),
        ("lancedb/fine_vectors", FINE.column),
    ):
        m = meta(result, key)
        assert m["rows_embedded"] == rows and m["nulls_remaining"] == 0 and m["dims"] == 384
        assert m["column_action"] == "created"
        assert count_nulls(table(lance_uri), column) == 0
    # Every table-like asset says how many rows it holds and which columns (the UI's row count
    # and column schema): each LanceDB asset here covers every chunk.
    for event in result.get_asset_materialization_events():
        key = event.asset_key.to_user_string()
        count = event.materialization.metadata["dagster/row_count"].value
        assert count > 0 and (count == rows or not key.startswith("lancedb/")), (key, count)
        schema = event.materialization.metadata["dagster/column_schema"].value
        types = {c.name: c.type for c in schema.columns}
        assert "chunk_id" in types or key == "postgres/conversations", (key, types)
    for key, column in (("lancedb/coarse_vectors", COARSE), ("lancedb/fine_vectors", FINE)):
        schema = meta(result, key)["dagster/column_schema"]
        assert [c.name for c in schema.columns] == ["chunk_id", column.column]
        assert schema.columns[1].type.endswith("[384]") and schema.columns[1].constraints.nullable
    snapshot = meta(result, "lancedb/search_snapshot")
    assert snapshot["action"] == "built" and snapshot["dagster/row_count"] == rows
    assert snapshot["table_version"] == table(lance_uri).version
    with connect(db) as conn:
        recorded = dict(
            conn.execute(
                "SELECT column_name, model || ' ' || dims FROM embedding_schema_versions "
                "WHERE store = 'lancedb' AND retired_at IS NULL"
            ).fetchall()
        )
    assert recorded == {
        "vector_coarse": "fastembed:sentence-transformers/all-MiniLM-L6-v2 384",
        "vector_fine": "sentence-transformers:sentence-transformers/all-MiniLM-L6-v2 384",
    }
    index = meta(result, "lancedb/coarse_index")
    assert index["action"] == "none"
    checks = {
        (e.asset_key.to_user_string(), e.check_name): e
        for e in result.get_asset_check_evaluations()
    }
    assert checks[("lancedb/coarse_index", "coarse_recall_at_10")].metadata[
        "recall_at_10"
    ].value == pytest.approx(1.0)
    for key in ("lancedb/coarse_vectors", "lancedb/fine_vectors"):
        for name in ("null_backlog", "dims_match_declared", "unit_norms"):
            assert checks[(key, name)].passed, (key, name)
        assert checks[(key, "dims_match_declared")].metadata["stored_dims"].value == 384


def test_a_second_run_with_nothing_new_calls_no_model_and_the_checks_run_alone(
    make_graph_resources, lance_uri
):
    run(make_graph_resources(SAMPLE_DATA_DIR))
    version = table(lance_uri).version
    again = run(make_graph_resources(SAMPLE_DATA_DIR))
    for key in ("lancedb/coarse_vectors", "lancedb/fine_vectors"):
        assert meta(again, key)["rows_embedded"] == 0
        assert meta(again, key)["column_action"] == "unchanged"
    assert table(lance_uri).version == version

    calls = []
    result = fill_nulls(table(lance_uri), FINE.column, lambda *a: calls.append(a))
    assert calls == [] and result.embedded == 0

    # The nightly job's selection (by its rule) over these assets: the store checks alone, in
    # their assets' steps, materializing and writing nothing.
    selection = consistency_checks(dg.Definitions(assets=GRAPH))
    alone = dg.materialize(
        GRAPH, resources=make_graph_resources(SAMPLE_DATA_DIR), selection=selection
    )
    evaluated = {
        (e.asset_key.to_user_string(), e.check_name): e.passed
        for e in alone.get_asset_check_evaluations()
    }
    assert evaluated == {
        **{
            (key, name): True
            for key in ("lancedb/coarse_vectors", "lancedb/fine_vectors")
            for name in ("null_backlog", "dims_match_declared", "unit_norms")
        },
        ("postgres/conversation_chunks", "chunks_within_token_budget"): True,
        ("lancedb/conversation_chunks", "chunk_counts_agree"): True,
        ("lancedb/coarse_index", "coarse_recall_at_10"): True,
        ("lancedb/search_snapshot", "search_snapshot_recall_at_10"): True,
    }
    assert not alone.get_asset_materialization_events()
    assert table(lance_uri).version == version


def test_recall_checks_measure_each_table_version_once(make_graph_resources, lance_uri):
    """A run with nothing new gives the recall checks' last figures again (the same table version
    cannot score differently) without loading a query model; any write measures anew."""

    def recalls(result) -> dict[str, dict]:
        return {
            e.check_name: {k: v.value for k, v in e.metadata.items()}
            for e in result.get_asset_check_evaluations()
            if e.check_name in ("coarse_recall_at_10", "search_snapshot_recall_at_10")
        }

    with dg.instance_for_test() as instance:
        first = run(make_graph_resources(SAMPLE_DATA_DIR), instance=instance)
        measured = recalls(first)
        assert len(measured) == 2 and all("measured_in_run" not in m for m in measured.values())
        again = run(make_graph_resources(SAMPLE_DATA_DIR), instance=instance)
        for name, figures in recalls(again).items():
            assert figures["measured_in_run"] == first.run_id, name
            assert figures["recall_at_10"] == measured[name]["recall_at_10"]
            assert figures["table_version"] == table(lance_uri).version
        table(lance_uri).update(values={"tier": "medium"})  # a write: a new table version
        third = run(make_graph_resources(SAMPLE_DATA_DIR), instance=instance)
        for name, figures in recalls(third).items():
            assert "measured_in_run" not in figures, name
            assert figures["table_version"] > measured[name]["table_version"]


def test_changed_text_re_embeds_only_its_chunks(make_graph_resources, lance_uri, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    records = [
        {
            "id": f"c{i}",
            "conversations": [
                {"from": "user", "value": f"question {i}"},
                {"from": "gpt", "value": f"answer {i}"},
            ],
        }
        for i in range(5)
    ]
    (source / "e.json").write_text(json.dumps(records))
    run(make_graph_resources(source))
    before = vectors_by_id(lance_uri, FINE.column)

    records[2]["conversations"][1]["value"] = "a rewritten answer"
    (source / "e.json").write_text(json.dumps(records))
    result = run(make_graph_resources(source))
    assert meta(result, "lancedb/coarse_vectors")["rows_embedded"] == 1
    assert meta(result, "lancedb/fine_vectors")["rows_embedded"] == 1
    after = vectors_by_id(lance_uri, FINE.column)
    kept = before.keys() & after.keys()
    assert len(kept) == 4 and all(before[k] == after[k] for k in kept)


def test_a_failing_fine_model_leaves_its_column_null(make_graph_resources, lance_uri):
    resources = make_graph_resources(SAMPLE_DATA_DIR)
    resources["fine_model"] = SentenceTransformerResource(model="/no/such/model")
    result = run(resources, raise_on_error=False)
    assert not result.success
    failed = {e.step_key for e in result.all_events if e.is_step_failure}
    assert failed == {"lancedb__fine_vectors"}
    chunks = table(lance_uri)
    assert count_nulls(chunks, COARSE.column) == 0
    assert (
        FINE.column not in chunks.schema.names
        or count_nulls(chunks, FINE.column) == chunks.count_rows()
    )


def test_a_model_change_migrates_the_column_instead_of_mixing(make_graph_resources, db, lance_uri):
    run(make_graph_resources(SAMPLE_DATA_DIR))
    chunks = table(lance_uri)
    rows = chunks.count_rows()
    with connect(db) as conn:
        assert (
            ensure_vector_column(chunks, conn, FINE.column, "sentence-transformers:other", 384)
            == "migrated"
        )
        assert count_nulls(chunks, FINE.column) == rows  # the old space is gone, not relabelled
        assert (
            ensure_vector_column(chunks, conn, FINE.column, "sentence-transformers:other", 8)
            == "migrated"
        )
        assert chunks.schema.field(FINE.column).type.list_size == 8
        history = conn.execute(
            "SELECT model, dims, retired_at IS NOT NULL FROM embedding_schema_versions "
            "WHERE column_name = 'vector_fine' ORDER BY id"
        ).fetchall()
    assert [h[2] for h in history] == [True, True, False] and history[-1][:2] == (
        "sentence-transformers:other",
        8,
    )
    # the configured model is back: one more migration, then the asset refills every row
    result = run(make_graph_resources(SAMPLE_DATA_DIR))
    m = meta(result, "lancedb/fine_vectors")
    assert m["column_action"] == "migrated" and m["rows_embedded"] == rows


def test_a_seeded_record_learns_its_dims_when_the_column_is_created(db, lance_uri):
    chunks = lancedb.connect(lance_uri).create_table(CHUNKS_TABLE, schema=chunk_schema())
    with connect(db) as conn:
        conn.execute(
            "INSERT INTO embedding_schema_versions (store, table_name, column_name, "
            "model, dims) VALUES ('lancedb', %s, %s, 'fastembed:m', NULL)",
            [CHUNKS_TABLE, COARSE.column],
        )
        assert (
            ensure_vector_column(chunks, conn, COARSE.column, "fastembed:m", lambda: 16)
            == "created"
        )
        assert (
            ensure_vector_column(
                chunks,
                conn,
                COARSE.column,
                "fastembed:m",
                lambda: pytest.fail("the model must not load"),
            )
            == "unchanged"
        )
        rows = conn.execute(
            "SELECT model, dims, retired_at FROM embedding_schema_versions WHERE store = 'lancedb'"
        ).fetchall()
    assert rows == [("fastembed:m", 16, None)]
    assert chunks.schema.field(COARSE.column).type.list_size == 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, fastembed, sentence_transformer):
    """~1,100 real sentences with both vector columns, in a LanceDB table of the chunk schema
    (enough for an ANN index and for user-4's 110 rows to exceed a top 100)."""
    sentences = real_sentences(1_100)
    n = len(sentences)
    uri = str(tmp_path_factory.mktemp("corpus"))
    base = pa.Table.from_pydict(
        {
            "chunk_id": [f"{i:032x}" for i in range(n)],
            "user_id": [f"user-{i % 10}" if i >= 3 else "rare-user" for i in range(n)],
            "conversation_id": [f"c{i // 4}" for i in range(n)],
            "tier": ["medium"] * n,
            "chunk_index": [i % 4 for i in range(n)],
            "turn_start": [0] * n,
            "turn_end": [1] * n,
            "roles": [["user"]] * n,
            "content": sentences,
            "content_hash": ["h"] * n,
            "token_count": [len(s.split()) for s in sentences],
            "created_at": [None] * n,
        },
        schema=chunk_schema(),
    )
    chunks = lancedb.connect(uri).create_table(CHUNKS_TABLE, data=base)
    chunks.add_columns(pa.field(COARSE.column, pa.list_(pa.float32(), 384)))
    chunks.add_columns(pa.field(FINE.column, pa.list_(pa.float32(), 384)))
    fill_nulls(chunks, COARSE.column, fastembed.embed_documents)
    fill_nulls(chunks, FINE.column, sentence_transformer.embed_documents)
    return chunks, sentences


def test_a_fill_never_undoes_what_the_other_column_s_fill_wrote_meanwhile(
    corpus, fastembed, sentence_transformer, tmp_path
):
    """Fills write whole rows; the run filling the other column commits while this one embeds."""
    chunks, _ = corpus
    rows = chunks.search().limit(300).to_arrow().drop_columns([COARSE.column, FINE.column])
    uri = str(tmp_path)
    table = lancedb.connect(uri).create_table(CHUNKS_TABLE, data=rows)
    table.add_columns(pa.field(COARSE.column, pa.list_(pa.float32(), 384)))
    table.add_columns(pa.field(FINE.column, pa.list_(pa.float32(), 384)))
    beside = lancedb.connect(uri).open_table(CHUNKS_TABLE)  # the other run's own handle
    calls = []

    def embed_fine(texts, lengths):
        if not calls:  # while the first batch is being embedded, the coarse fill completes
            assert fill_nulls(beside, COARSE.column, fastembed.embed_documents).embedded == 300
        calls.append(len(texts))
        return sentence_transformer.embed_documents(texts, lengths)

    result = fill_nulls(table, FINE.column, embed_fine, write_rows=100)

    assert table.count_rows(f"{COARSE.column} IS NULL OR {FINE.column} IS NULL") == 0
    assert result.embedded == 300 and result.remaining == 0
    assert sum(calls) > 300  # the batch read before the coarse fill was skipped and redone
    assert table.count_rows() == 300


@pytest.mark.parametrize("indexed", [False, True])
def test_coarse_search_returns_exactly_min_k_rows(corpus, fastembed, indexed):
    chunks, sentences = corpus
    if indexed:
        assert ensure_coarse_index(chunks, min_rows=500).action in ("built", "unchanged")
        assert chunks.index_stats(f"{COARSE.column}_idx").num_indexed_rows == len(sentences)
    query = fastembed.embed_query("how do I parse command line arguments")
    assert coarse_search(chunks, query, 100).num_rows == 100
    assert coarse_search(chunks, query, 7).num_rows == 7
    assert coarse_search(chunks, query, 100, user="rare-user").num_rows == 3
    assert coarse_search(chunks, query, 100, user="user-4").num_rows == 100
    assert coarse_search(chunks, query, 100, user="nobody' OR '1'='1").num_rows == 0
    exact = set(coarse_search(chunks, query, 10, exact=True).column("chunk_id").to_pylist())
    approx = set(coarse_search(chunks, query, 10).column("chunk_id").to_pylist())
    assert len(exact & approx) >= 8


def test_search_reranks_by_the_fine_vectors(corpus, fastembed, sentence_transformer):
    chunks, _ = corpus
    query = "read and write JSON documents"
    hits = dense_search(chunks, fastembed, sentence_transformer, query, k=10)
    assert len(hits) == 10 and all(h.reranked for h in hits)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    q = sentence_transformer.embed_query(query)
    fine = (
        chunks.search().where(f"chunk_id = '{hits[0].chunk_id}'").select([FINE.column]).to_arrow()
    )
    assert hits[0].score == pytest.approx(
        float(np.dot(fine.column(FINE.column)[0].as_py(), q)), abs=1e-5
    )
    assert "json" in hits[0].content.lower()


def test_search_puts_rows_without_fine_vectors_after_reranked_ones(
    corpus, fastembed, sentence_transformer, tmp_path
):
    chunks, _ = corpus
    copy = lancedb.connect(str(tmp_path)).create_table(
        CHUNKS_TABLE,
        data=chunks.search()
        .limit(None)
        .to_arrow()
        .drop_columns([c for c in ("_distance",) if c in chunks.schema.names]),
    )
    best = dense_search(copy, fastembed, sentence_transformer, "JSON documents", k=1)[0]
    copy.update(where=f"chunk_id = '{best.chunk_id}'", values={FINE.column: None})
    hits = dense_search(copy, fastembed, sentence_transformer, "JSON documents", k=100)
    assert hits[-1].chunk_id == best.chunk_id and not hits[-1].reranked
    assert all(h.reranked for h in hits[:-1])


def copy_of(chunks, uri: str):
    return lancedb.connect(uri).create_table(
        CHUNKS_TABLE, data=chunks.search().limit(None).to_arrow()
    )


def test_a_search_snapshot_answers_like_lancedb_for_its_table_version_only(
    corpus, fastembed, sentence_transformer, tmp_path
):
    chunks, sentences = corpus
    copy = copy_of(chunks, str(tmp_path / "lancedb"))
    built = build(copy, tmp_path / "snapshot", RESULT_COLUMNS)
    snapshot = current(tmp_path / "snapshot")
    assert built.rows == snapshot.rows == len(sentences) and snapshot.serves(copy)

    query = "read and write JSON documents"
    vector = fastembed.embed_query(query)
    for k in (7, 100, 5_000):
        served = coarse_search(copy, vector, k, snapshot=snapshot)
        assert served.num_rows == min(k, len(sentences))
    served = coarse_search(copy, vector, 100, snapshot=snapshot).to_pylist()
    exact = coarse_search(copy, vector, 100, exact=True).to_pylist()
    assert len({r["chunk_id"] for r in served} & {r["chunk_id"] for r in exact}) >= 95
    by_id = {r["chunk_id"]: r for r in exact}
    for row in served:  # the snapshot's rows are the table's rows, column for column
        if row["chunk_id"] in by_id:
            expected = by_id[row["chunk_id"]]
            assert {c: row[c] for c in RESULT_COLUMNS} == {c: expected[c] for c in RESULT_COLUMNS}
            assert row["_distance"] == pytest.approx(expected["_distance"], abs=2e-3)

    fast = dense_search(copy, fastembed, sentence_transformer, query, k=10, snapshot=snapshot)
    slow = dense_search(copy, fastembed, sentence_transformer, query, k=10)
    assert len({h.chunk_id for h in fast} & {h.chunk_id for h in slow}) >= 9
    assert fast[0].chunk_id == slow[0].chunk_id
    assert fast[0].score == pytest.approx(slow[0].score, abs=2e-3)  # f16 fine vectors

    # Any write makes a new table version: the snapshot no longer answers, LanceDB does.
    copy.delete(f"chunk_id = '{fast[0].chunk_id}'")
    assert not snapshot.serves(copy)
    after = dense_search(copy, fastembed, sentence_transformer, query, k=10, snapshot=snapshot)
    assert fast[0].chunk_id not in {h.chunk_id for h in after} and len(after) == 10
    assert coarse_search(copy, vector, 5_000, snapshot=snapshot).num_rows == len(sentences) - 1
    # ... and a snapshot of another table never answers for this one.
    other = copy_of(chunks, str(tmp_path / "other"))
    assert other.version == snapshot.version and not snapshot.serves(other)


def test_a_snapshot_keeps_rows_without_fine_vectors_after_reranked_ones(
    corpus, fastembed, sentence_transformer, tmp_path
):
    chunks, _ = corpus
    copy = copy_of(chunks, str(tmp_path / "lancedb"))
    query = "JSON documents"
    best = dense_search(copy, fastembed, sentence_transformer, query, k=1)[0]
    copy.update(where=f"chunk_id = '{best.chunk_id}'", values={FINE.column: None})
    build(copy, tmp_path / "snapshot", RESULT_COLUMNS)
    snapshot = current(tmp_path / "snapshot")
    assert snapshot.serves(copy) and int(np.sum(~np.asarray(snapshot.has_fine))) == 1
    hits = dense_search(copy, fastembed, sentence_transformer, query, k=100, snapshot=snapshot)
    assert hits[-1].chunk_id == best.chunk_id and not hits[-1].reranked
    assert all(h.reranked for h in hits[:-1])


def test_a_snapshot_update_inserts_only_what_changed_and_answers_like_a_fresh_build(
    corpus, fastembed, tmp_path
):
    chunks, sentences = corpus
    copy = copy_of(chunks, str(tmp_path / "lancedb"))
    root = tmp_path / "snapshot"
    assert build(copy, root, RESULT_COLUMNS).action == "built"
    query = fastembed.embed_query("read and write JSON documents")
    best = coarse_search(copy, query, 1, snapshot=current(root)).column("chunk_id")[0].as_py()
    # One chunk removed, one given another chunk's coarse vector, one new chunk, 1 fine vector.
    donor = copy.search().where(f"chunk_id = '{best}'").limit(1).to_arrow()
    copy.delete(f"chunk_id = '{best}'")
    moved = f"{len(sentences) - 1:032x}"
    copy.update(where=f"chunk_id = '{moved}'", values={COARSE.column: query.tolist()})
    copy.add(donor.set_column(0, "chunk_id", pa.array(["f" * 32])).select(copy.schema.names))
    copy.update(where="chunk_id = '" + f"{5:032x}" + "'", values={FINE.column: None})

    updated = build(copy, root, RESULT_COLUMNS)
    snapshot = current(root)
    assert updated.action == "updated" and updated.inserted == 2  # the moved and the new chunk
    assert snapshot.rows == len(sentences) and snapshot.tombstones == 2 and snapshot.serves(copy)
    top = coarse_search(copy, query, 3, snapshot=snapshot).column("chunk_id").to_pylist()
    assert best not in top and {moved, "f" * 32} <= set(top)
    fresh_root = tmp_path / "fresh"
    build(copy, fresh_root, RESULT_COLUMNS)
    for text in ("parse command line arguments", "a thread pool runs tasks", "decimal rounding"):
        vector = fastembed.embed_query(text)
        ours = coarse_search(copy, vector, 10, snapshot=snapshot).to_pylist()
        fresh = coarse_search(copy, vector, 10, snapshot=current(fresh_root)).to_pylist()
        assert len({r["chunk_id"] for r in ours} & {r["chunk_id"] for r in fresh}) >= 9
    fifth = f"{5:032x}"
    own = copy.search().where(f"chunk_id = '{fifth}'").select([COARSE.column]).to_arrow()
    own = np.asarray(own.column(COARSE.column)[0].as_py(), dtype=np.float32)
    row = coarse_search(copy, own, 1, snapshot=snapshot, columns=["chunk_id", FINE.column])
    assert row.to_pylist()[0]["chunk_id"] == fifth
    assert row.to_pylist()[0][FINE.column] is None  # the NULL fine vector, not the old one


def test_snapshot_builds_at_the_same_time_both_complete(corpus, tmp_path):
    """Two runs may build at once; a publish removes the other snapshot directories, so builds
    take turns instead of deleting each other's half-written files."""
    from concurrent.futures import ThreadPoolExecutor

    chunks, sentences = corpus
    copy = copy_of(chunks, str(tmp_path / "lancedb"))
    root = tmp_path / "snapshot"
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(build, copy, root, RESULT_COLUMNS) for _ in range(3)]
        results = [f.result() for f in futures]
    assert sorted(r.action for r in results) == ["built", "updated", "updated"]
    assert current(root).serves(copy) and current(root).rows == len(sentences)


def test_a_new_snapshot_replaces_the_old_one_on_disk(corpus, tmp_path):
    chunks, _ = corpus
    copy = copy_of(chunks, str(tmp_path / "lancedb"))
    root = tmp_path / "snapshot"
    first = build(copy, root, RESULT_COLUMNS)
    copy.delete("user_id = 'rare-user'")
    second = build(copy, root, RESULT_COLUMNS)
    assert second.rows == first.rows - 3 and current(root).serves(copy)
    left = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))  # not the lock
    assert left == sorted(["CURRENT", second.path.name])
    copy.delete("true")  # an empty table has an empty snapshot that answers with no rows
    build(copy, root, RESULT_COLUMNS)
    assert current(root).serves(copy) and current(root).rows == 0
    vector = np.ones(384, dtype=np.float32) / np.sqrt(384)
    assert coarse_search(copy, vector, 10, snapshot=current(root)).num_rows == 0


def test_a_large_filtered_set_goes_through_the_index_and_still_returns_k(
    corpus, fastembed, monkeypatch
):
    import retrieval_assets.lib.search as search_module

    chunks, _ = corpus
    ensure_coarse_index(chunks, min_rows=500)
    monkeypatch.setattr(search_module, "EXACT_FILTER_ROWS", 10)  # user-4's rows take the ANN
    rows = chunks.count_rows("user_id = 'user-4'")
    assert rows > 100
    query = fastembed.embed_query("how do I parse command line arguments")
    for k in (5, 100, rows, 500):
        hits = coarse_search(chunks, query, k, user="user-4")
        assert hits.num_rows == min(k, rows)
        assert set(hits.column("user_id").to_pylist()) == {"user-4"}


def test_readers_move_to_the_latest_version_when_maintenance_removed_theirs(tmp_path):
    import time as clock

    from retrieval_assets.lib.lancedb_store import maintain, on_latest_version

    uri = str(tmp_path / "t")
    rows = pa.table({"chunk_id": [f"{i:032x}" for i in range(100)], "n": list(range(100))})
    writer = lancedb.connect(uri).create_table(CHUNKS_TABLE, data=rows.slice(0, 10))
    for start in range(10, 100, 10):
        writer.add(rows.slice(start, 10))
    stale = lancedb.connect(uri).open_table(CHUNKS_TABLE)
    stale.checkout(stale.version)  # a reader pinned to the version it opened
    clock.sleep(0.1)
    figures = maintain(writer, keep_versions_minutes=0)
    assert figures["fragments_after"] < figures["fragments_before"]
    assert figures["versions_after"] < figures["versions_before"]
    with pytest.raises(Exception, match="Not found"):
        stale.to_arrow()
    handles = iter([stale, lancedb.connect(uri).open_table(CHUNKS_TABLE)])
    total, _ = on_latest_version(lambda: next(handles), lambda t: t.to_arrow().num_rows)
    assert total == 100


def test_columns_under_their_former_names_are_renamed_in_place(make_graph_resources, db, lance_uri):
    """A store from before roles named the columns (vector_fastembed, vector) keeps its vectors:
    the next run renames the columns and their model records, and embeds nothing again."""
    run(make_graph_resources(SAMPLE_DATA_DIR))
    chunks = table(lance_uri)
    chunks.alter_columns(
        {"path": COARSE.column, "rename": "vector_fastembed"},
        {"path": FINE.column, "rename": "vector"},
    )
    with connect(db) as conn:  # the records as they were before revision 0008
        for old, new in (("vector_fastembed", COARSE.column), ("vector", FINE.column)):
            conn.execute(
                "UPDATE embedding_schema_versions SET column_name = %s "
                "WHERE store = 'lancedb' AND column_name = %s",
                [old, new],
            )
    before = vectors_by_id(lance_uri, "vector_fastembed")

    result = run(make_graph_resources(SAMPLE_DATA_DIR))
    for key in ("lancedb/coarse_vectors", "lancedb/fine_vectors"):
        assert meta(result, key)["column_action"] == "renamed"
        assert meta(result, key)["rows_embedded"] == 0
    names = table(lance_uri).schema.names
    assert {COARSE.column, FINE.column} <= set(names)
    assert not {"vector_fastembed", "vector"} & set(names)
    assert vectors_by_id(lance_uri, COARSE.column) == before
    with connect(db) as conn:
        recorded = {
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM embedding_schema_versions WHERE store = 'lancedb'"
            )
        }
    assert recorded == {COARSE.column, FINE.column}


def test_a_declared_column_is_made_filled_and_checked_by_its_definitions(
    make_graph_resources, db, lance_uri
):
    """Adding a column is one declaration: its asset makes and fills it with its model, and its
    checks run with it."""
    made = column_definitions(EXTRA)
    result = dg.materialize(
        [conversations, conversation_chunks, *(made.assets or [])],
        resources=make_graph_resources(SAMPLE_DATA_DIR),
        tags=ALL_SHARDS,
    )
    rows = table(lance_uri).count_rows()
    figures = meta(result, "lancedb/extra_vectors")
    assert figures["column"] == "vector_extra" and figures["column_action"] == "created"
    assert figures["rows_embedded"] == rows > 0
    assert count_nulls(table(lance_uri), "vector_extra") == 0
    checks = {
        e.check_name: e.passed
        for e in result.get_asset_check_evaluations()
        if e.asset_key.to_user_string() == "lancedb/extra_vectors"
    }
    assert checks == {"null_backlog": True, "dims_match_declared": True, "unit_norms": True}


class _SnapshotOnly:
    """The table's identity (uri, version) without its data: a search that reaches LanceDB
    fails, so an answer proves the snapshot gave it."""

    def __init__(self, table):
        self.uri, self.version = table.uri, table.version

    def search(self, *args, **kwargs):
        raise AssertionError("LanceDB was queried although the snapshot serves this version")

    def count_rows(self, *args, **kwargs):
        raise AssertionError("LanceDB was queried although the snapshot serves this version")


def test_a_snapshot_answers_per_user_searches_as_lancedb_does(
    corpus, fastembed, sentence_transformer, tmp_path, capfd
):
    chunks, _ = corpus
    copy = copy_of(chunks, str(tmp_path / "lancedb"))
    ensure_lancedb_index(copy)
    build(copy, tmp_path / "snapshot", RESULT_COLUMNS)
    snapshot = current(tmp_path / "snapshot")
    offline = _SnapshotOnly(copy)
    users = sorted(
        set(copy.search().select(["user_id"]).limit(None).to_arrow()["user_id"].to_pylist())
    )
    assert "rare-user" in users and len(users) == 11
    for text in ("read and write JSON documents", "a thread pool runs tasks"):
        vector = fastembed.embed_query(text)
        for user in users:
            served = coarse_search(offline, vector, 100, user, snapshot=snapshot).to_pylist()
            exact = coarse_search(copy, vector, 100, user, exact=True).to_pylist()
            assert {r["user_id"] for r in served} == {user}
            # Every row of the user is scored: the same rows (f16 vectors: near-ties at the
            # 100th place may swap), the same order at the top, the same columns.
            assert len(served) == len(exact) == min(100, snapshot.user_rows(user).size)
            assert len({r["chunk_id"] for r in served} & {r["chunk_id"] for r in exact}) >= (
                len(exact) - 2
            )
            assert [r["chunk_id"] for r in served[:3]] == [r["chunk_id"] for r in exact[:3]]
            by_id = {r["chunk_id"]: r for r in exact}
            for row in served:
                if row["chunk_id"] in by_id:
                    assert row["_distance"] == pytest.approx(
                        by_id[row["chunk_id"]]["_distance"], abs=2e-3
                    )
        fast = dense_search(
            offline, fastembed, sentence_transformer, text, 10, "user-3", snapshot=snapshot
        )
        slow = dense_search(copy, fastembed, sentence_transformer, text, 10, "user-3")
        assert [h.chunk_id for h in fast] == [h.chunk_id for h in slow]
        assert all(h.user_id == "user-3" for h in fast)
        # The full-text query reads only ids and scores; the rows come from the snapshot.
        capfd.readouterr()
        words = lexical_search(copy, text, 10, "user-3", snapshot)
        assert "warn" not in capfd.readouterr().err.lower()  # LanceDB logs to the process's stderr
        assert words and words == lexical_search(copy, text, 10, "user-3")
        both = search(copy, fastembed, sentence_transformer, text, 10, "user-3", snapshot=snapshot)
        alone = search(copy, fastembed, sentence_transformer, text, 10, "user-3")
        assert [h.chunk_id for h in both] == [h.chunk_id for h in alone]
    # A user the snapshot does not hold has no rows, nor does a hostile name.
    vector = fastembed.embed_query("JSON")
    for stranger in ("nobody", "user-3' OR '1'='1", ""):
        assert coarse_search(offline, vector, 10, stranger, snapshot=snapshot).num_rows == 0
    # After a write the snapshot no longer serves: LanceDB answers, and sees the write.
    gone = dense_search(
        copy, fastembed, sentence_transformer, "JSON", 1, "user-3", snapshot=snapshot
    )
    copy.delete(f"chunk_id = '{gone[0].chunk_id}'")
    after = dense_search(
        copy, fastembed, sentence_transformer, "JSON", 10, "user-3", snapshot=snapshot
    )
    assert gone[0].chunk_id not in {h.chunk_id for h in after} and len(after) == 10
