"""The conversations stage against the real embedded Postgres and a temporary LanceDB."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import lancedb
import pytest

from retrieval_assets.defs.conversations.assets import conversation_chunks, conversations
from retrieval_assets.lib.connection import connect
from retrieval_assets.lib.ingest import ingest_conversations
from retrieval_assets.lib.lancedb_store import CHUNKS_TABLE, table_ids
from retrieval_assets.lib.paths import SAMPLE_DATA_DIR
from retrieval_assets.lib.sources import Conversation, Turn

ASSETS = [conversations, conversation_chunks]


def materialize(resources: dict, raise_on_error: bool = True) -> dg.ExecuteInProcessResult:
    return dg.materialize(ASSETS, resources=resources, raise_on_error=raise_on_error)


def metadata(result: dg.ExecuteInProcessResult, key: str) -> dict:
    for mat in result.get_asset_materialization_events():
        if mat.asset_key.to_user_string() == key:
            return {k: v.value for k, v in mat.materialization.metadata.items()}
    raise KeyError(key)


def checks(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {c.check_name: c.passed for c in result.get_asset_check_evaluations()}


def pg_chunk_ids(url: str, conversation_id: str | None = None) -> set[str]:
    with connect(url) as conn:
        if conversation_id is None:
            rows = conn.execute("SELECT chunk_id FROM conversation_chunks")
        else:
            rows = conn.execute(
                "SELECT chunk_id FROM conversation_chunks k JOIN conversations c "
                "ON c.id = k.conversation_id WHERE c.external_id = %s",
                [conversation_id],
            )
        return {r[0] for r in rows}


def lance_table(uri: str):
    return lancedb.connect(uri).open_table(CHUNKS_TABLE)


def sharegpt_source(tmp_path: Path, records: list[dict]) -> Path:
    source = tmp_path / "source"
    source.mkdir(exist_ok=True)
    (source / "export.json").write_text(json.dumps(records))
    return source


def record(conv_id: str, *texts: str) -> dict:
    roles = ["user", "assistant"]
    return {
        "id": conv_id,
        "conversations": [{"from": roles[i % 2], "value": t} for i, t in enumerate(texts)],
    }


def test_every_format_lands_in_both_stores(make_resources, db, lance_uri):
    result = materialize(make_resources(SAMPLE_DATA_DIR))
    meta = metadata(result, "postgres/conversations")
    assert meta["conversations_read"] == meta["inserted"] == meta["dagster/row_count"] == 12
    assert meta["rejected"] == 0 and meta["deletions_propagated"] is True
    chunks = metadata(result, "postgres/conversation_chunks")
    assert chunks["dagster/row_count"] == chunks["chunks_added"] > 12
    assert chunks["medium_tokens_max"] <= 240
    assert "| conversation |" in chunks["preview"]
    assert (
        metadata(result, "lancedb/conversation_chunks")["dagster/row_count"]
        == (chunks["dagster/row_count"])
    )
    assert table_ids(lance_table(lance_uri)) == pg_chunk_ids(db)
    assert checks(result) == {
        "source_read_completely": True,
        "source_records_accepted": True,
        "chunks_within_token_budget": True,
        "chunk_counts_agree": True,
    }
    with connect(db) as conn:
        formats = {r[0] for r in conn.execute("SELECT DISTINCT source_format FROM conversations")}
        nulls = conn.execute(
            "SELECT count(*) FROM conversation_chunks WHERE embedding IS NOT NULL"
        ).fetchone()[0]
    assert formats == {"chatgpt", "claude", "sharegpt", "jsonl"}
    assert nulls == 0


def test_reingesting_the_same_export_changes_nothing(make_resources, db, lance_uri):
    materialize(make_resources(SAMPLE_DATA_DIR))
    ids, version = pg_chunk_ids(db), lance_table(lance_uri).version
    again = materialize(make_resources(SAMPLE_DATA_DIR))
    meta = metadata(again, "postgres/conversations")
    assert (meta["inserted"], meta["updated"], meta["unchanged"], meta["deleted"]) == (0, 0, 12, 0)
    chunk_meta = metadata(again, "postgres/conversation_chunks")
    assert chunk_meta["conversations_rechunked"] == chunk_meta["chunks_added"] == 0
    assert pg_chunk_ids(db) == ids
    assert lance_table(lance_uri).version == version  # no write at all


def test_an_edit_changes_only_the_affected_chunks_and_keeps_other_vectors(
    make_resources, db, lance_uri, tmp_path
):
    records = [
        record("keep", "unrelated question", "unrelated answer"),
        record("edit", "first question", "first answer", "second question", "old answer"),
    ]
    source = sharegpt_source(tmp_path, records)
    materialize(make_resources(source))
    keep_ids, edit_ids = pg_chunk_ids(db, "keep"), pg_chunk_ids(db, "edit")
    with connect(db) as conn:  # a vector already computed for an unaffected chunk
        conn.execute(
            "UPDATE conversation_chunks SET embedding = array_fill(0.5, ARRAY[1024])"
            "::vector, embedding_model = 'titan' WHERE conversation_id = "
            "(SELECT id FROM conversations WHERE external_id = 'keep')"
        )

    records[1] = record("edit", "first question", "first answer", "second question", "new answer")
    sharegpt_source(tmp_path, records)
    result = materialize(make_resources(source))
    meta = metadata(result, "postgres/conversations")
    assert (meta["updated"], meta["unchanged"]) == (1, 1)
    chunk_meta = metadata(result, "postgres/conversation_chunks")
    assert chunk_meta["conversations_rechunked"] == 1
    assert (chunk_meta["chunks_added"], chunk_meta["chunks_removed"]) == (1, 1)
    new_edit_ids = pg_chunk_ids(db, "edit")
    assert len(edit_ids & new_edit_ids) == len(edit_ids) - 1  # the first exchange is untouched
    assert pg_chunk_ids(db, "keep") == keep_ids
    with connect(db) as conn:
        kept = conn.execute(
            "SELECT count(*) FROM conversation_chunks k JOIN conversations c ON "
            "c.id = k.conversation_id WHERE c.external_id = 'keep' AND embedding IS NOT NULL"
        ).fetchone()[0]
    assert kept == len(keep_ids)
    assert table_ids(lance_table(lance_uri)) == pg_chunk_ids(db)


def test_a_vanished_conversation_leaves_every_store(make_resources, db, lance_uri, tmp_path):
    records = [record("stays", "hello", "hi"), record("goes", "bye", "see you")]
    source = sharegpt_source(tmp_path, records)
    materialize(make_resources(source))
    gone = pg_chunk_ids(db, "goes")
    assert gone and gone <= table_ids(lance_table(lance_uri))

    sharegpt_source(tmp_path, records[:1])
    result = materialize(make_resources(source))
    assert metadata(result, "postgres/conversations")["deleted"] == 1
    assert metadata(result, "lancedb/conversation_chunks")["rows_deleted"] == len(gone)
    assert pg_chunk_ids(db, "goes") == set()
    assert table_ids(lance_table(lance_uri)).isdisjoint(gone)
    with connect(db) as conn:
        assert (
            conn.execute(
                "SELECT count(*) FROM conversations WHERE external_id = 'goes'"
            ).fetchone()[0]
            == 0
        )


def test_a_truncated_export_keeps_good_records_and_deletes_nothing(make_resources, db, tmp_path):
    records = [record(f"c{i}", f"question {i} " * 40, f"answer {i} " * 40) for i in range(12)]
    source = sharegpt_source(tmp_path, records)
    materialize(make_resources(source))
    text = (source / "export.json").read_text()
    (source / "export.json").write_text(text[: len(text) // 2])

    result = materialize(make_resources(source))
    assert result.success
    meta = metadata(result, "postgres/conversations")
    assert 0 < meta["conversations_read"] < 12
    assert meta["errors"] == 1 and meta["deletions_propagated"] is False
    assert meta["deleted"] == 0 and meta["dagster/row_count"] == 12
    assert "export.json" in meta["problems"] and "byte" in meta["problems"]
    assert checks(result)["source_read_completely"] is False


def test_an_unchanged_source_is_not_parsed_again_until_it_or_its_stored_rows_change(
    make_resources, db, tmp_path
):
    records = [record("a", "hello", "hi"), record("b", "bye", "see you")]
    source = sharegpt_source(tmp_path, records)
    instance = dg.DagsterInstance.ephemeral()  # runs see each other's materializations

    def run(**options) -> dict:
        result = dg.materialize(
            ASSETS, resources=make_resources(source, **options), instance=instance
        )
        return {"checks": checks(result), **metadata(result, "postgres/conversations")}

    first = run()
    assert first["source_parsed"] is True and first["inserted"] == 2
    again = run()
    assert again["source_parsed"] is False
    assert (again["inserted"], again["updated"], again["deleted"]) == (0, 0, 0)
    assert again["conversations_read"] == 2 and again["dagster/row_count"] == 2
    assert again["checks"] == {
        "source_read_completely": True,
        "source_records_accepted": True,
        "chunks_within_token_budget": True,
        "chunk_counts_agree": True,
    }

    # A stored row lost by hand: the next run reads the source and restores it.
    with connect(db) as conn:
        conn.execute("DELETE FROM conversations WHERE external_id = 'b'")
    restored = run()
    assert restored["source_parsed"] is True and restored["inserted"] == 1
    assert run()["source_parsed"] is False

    # A changed file, or a setting that changes what a read gives: read again.
    sharegpt_source(tmp_path, [*records, record("c", "new", "turn")])
    grown = run()
    assert grown["source_parsed"] is True and grown["inserted"] == 1
    assert run(default_user_id="someone-else")["source_parsed"] is True


def test_a_source_read_incompletely_is_parsed_every_time(make_resources, db, tmp_path):
    records = [record(f"c{i}", f"question {i} " * 40, f"answer {i} " * 40) for i in range(12)]
    source = sharegpt_source(tmp_path, records)
    text = (source / "export.json").read_text()
    (source / "export.json").write_text(text[: len(text) // 2])
    instance = dg.DagsterInstance.ephemeral()
    for _ in range(2):
        result = dg.materialize(ASSETS, resources=make_resources(source), instance=instance)
        meta = metadata(result, "postgres/conversations")
        assert meta["source_parsed"] is True and meta["deletions_propagated"] is False
        assert checks(result)["source_read_completely"] is False


def test_an_empty_export_deletes_nothing(make_resources, db, tmp_path):
    source = sharegpt_source(tmp_path, [record("a", "hi", "hello")])
    materialize(make_resources(source))
    sharegpt_source(tmp_path, [])
    meta = metadata(materialize(make_resources(source)), "postgres/conversations")
    assert meta["deletions_propagated"] is False and meta["dagster/row_count"] == 1


def test_an_unreadable_source_fails_the_run_naming_it(make_resources, db, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "broken.json").write_text('[{"neither": "format"}, {"nor": "this"}]')
    result = materialize(make_resources(source), raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "no conversation could be read" in failure.step_failure_data.error.message
    assert str(source) in failure.step_failure_data.error.message


def test_a_failure_mid_stream_leaves_the_store_untouched(db):
    def stream():
        for i in range(5):
            if i == 3:
                raise OSError("disk went away")
            yield Conversation(
                f"s{i}", "u", None, "test", f"record {i}", (Turn("user", "text"),), None, None
            )

    with connect(db) as conn, pytest.raises(OSError):
        ingest_conversations(conn, stream(), source="s", propagate_deletions=lambda: True)
    with connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM conversations").fetchone()[0] == 0


def test_hostile_ids_and_text_are_stored_as_data(make_resources, db, lance_uri, tmp_path):
    hostile = "x'); DROP TABLE conversations; --"
    source = sharegpt_source(tmp_path, [record(hostile, "Robert'); DROP TABLE students;--", "ok")])
    materialize(make_resources(source, default_user_id="' OR 1=1 --"))
    with connect(db) as conn:
        row = conn.execute("SELECT external_id, user_id FROM conversations").fetchone()
    assert row == (hostile, "' OR 1=1 --")
    assert table_ids(lance_table(lance_uri)) == pg_chunk_ids(db, hostile)


def test_a_moved_export_directory_is_the_same_data(make_resources, db, tmp_path):
    source = sharegpt_source(tmp_path, [record("a", "hi", "hello")])
    materialize(make_resources(source))
    moved = tmp_path / "moved"
    shutil.copytree(source, moved)
    meta = metadata(materialize(make_resources(moved)), "postgres/conversations")
    # The same content from the moved export: no change, only which source it belongs to.
    assert (meta["inserted"], meta["updated"], meta["moved"], meta["deleted"]) == (0, 0, 1, 0)
    assert meta["collisions"] == 0
