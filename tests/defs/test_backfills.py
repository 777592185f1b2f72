"""Backlog sensors and shard backfills, against the real stores, models and local Bedrock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import dagster as dg
import pytest

from retrieval_assets.defs.conversations.assets import conversation_chunks, conversations
from retrieval_assets.defs.vectors.columns import COLUMN_TAG, SHARDS
from retrieval_assets.lib.columns import COARSE
from retrieval_assets.lib.connection import connect
from retrieval_assets.lib.lancedb_store import LanceDBResource
from retrieval_assets.lib.titan import embed_pending
from retrieval_assets.lib.vectors import count_nulls, fill_nulls
from tests.conftest import (
    ALL_SHARDS,
    COARSE_DEFS,
    TITAN_DEFS,
    coarse_vectors,
    titan_vectors,
)
from tests.conftest import write_jsonl_source as write_source

coarse_backlog_sensor = next(iter(COARSE_DEFS.sensors or []))
titan_backlog_sensor = next(iter(TITAN_DEFS.sensors or []))


def ingest(resources: dict) -> None:
    dg.materialize([conversations, conversation_chunks], resources=resources)


def tick(sensor, instance, resources, cursor=None):
    with dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor) as context:
        return sensor(context), context.cursor


def requests(result) -> list[dg.RunRequest]:
    assert isinstance(result, dg.SensorResult), result
    return list(result.run_requests or [])


def null_ids(db: str) -> set[str]:
    with connect(db) as conn:
        rows = conn.execute("SELECT chunk_id FROM conversation_chunks WHERE embedding IS NULL")
        return {r[0] for r in rows}


# Enough that every shard holds chunks and a fill takes several batches.
CONVERSATIONS = 120


@pytest.fixture
def backlog(tmp_path, make_graph_resources, make_bedrock):
    """Resources over CONVERSATIONS ingested conversations; `more(n)` ingests n more."""
    source = write_source(tmp_path / "source", range(CONVERSATIONS))
    resources = {**make_graph_resources(source), "titan_model": make_bedrock()}
    ingest(resources)

    def more(n: int) -> None:
        write_source(source, range(CONVERSATIONS + n))
        ingest(resources)

    resources["more"] = more
    return resources


def test_fastembed_sensor_fires_on_nulls_and_is_quiet_when_clean(backlog, lance_uri):
    more = backlog.pop("more")
    with dg.instance_for_test() as instance:
        # No column yet: the column must be created (a migration), so the asset is requested.
        result, cursor = tick(coarse_backlog_sensor, instance, backlog)
        [migrate] = requests(result)
        # One run over every shard (only such a run may make the column), through the backfill job.
        assert migrate.partition_key is None and migrate.job_name is None
        assert {k: migrate.tags[k] for k in ALL_SHARDS} == ALL_SHARDS
        dg.materialize([coarse_vectors], resources=backlog, instance=instance, tags=migrate.tags)
        result, cursor = tick(coarse_backlog_sensor, instance, backlog, cursor)
        assert (
            isinstance(result, dg.SkipReason) and "every chunk has a vector" in result.skip_message
        )

        more(60)
        table = LanceDBResource(uri=lance_uri)
        with table.get_connection() as db:
            chunks = table.chunks_table(db)
            pending = {
                r["chunk_id"]
                for r in chunks.search()
                .where(f"{COARSE.column} IS NULL")
                .limit(None)
                .select(["chunk_id"])
                .to_arrow()
                .to_pylist()
            }
        assert pending
        result, cursor = tick(coarse_backlog_sensor, instance, backlog, cursor)
        runs = requests(result)
        assert {r.partition_key for r in runs} == {i[0] for i in pending}
        assert all(r.job_name is None for r in runs)  # the sensor's own job: coarse_backfill
        assert coarse_backlog_sensor.job_name == "coarse_backfill"
        assert len({r.run_key for r in runs}) == len(runs)
        embedded = 0
        for run in runs:
            done = dg.materialize(
                [coarse_vectors],
                partition_key=run.partition_key,
                resources=backlog,
                instance=instance,
                tags=run.tags,
            )
            [event] = done.get_asset_materialization_events()  # that shard's only
            assert event.asset_key == coarse_vectors.key and event.partition == run.partition_key
            metadata = event.materialization.metadata
            assert metadata["shard"].value == run.partition_key
            embedded += metadata["rows_embedded"].value
        assert embedded == len(pending)  # every row once, none twice
        with table.get_connection() as db:
            assert count_nulls(table.chunks_table(db), COARSE.column) == 0
        result, _ = tick(coarse_backlog_sensor, instance, backlog, cursor)
        assert (
            isinstance(result, dg.SkipReason) and "every chunk has a vector" in result.skip_message
        )


def test_titan_sensor_launches_one_run_per_backlog_however_often_it_ticks(backlog, db):
    backlog.pop("more")
    with dg.instance_for_test() as instance:
        first, cursor = tick(titan_backlog_sensor, instance, backlog)
        runs = requests(first)
        assert {r.partition_key for r in runs} == {i[0] for i in null_ids(db)}
        # The same backlog: the next tick launches nothing, and says why.
        again, _ = tick(titan_backlog_sensor, instance, backlog, cursor)
        assert isinstance(again, dg.SkipReason) and "unchanged" in again.skip_message
        # A lost cursor derives the same run keys, which Dagster launches once.
        fresh, _ = tick(titan_backlog_sensor, instance, backlog)
        assert {r.run_key for r in requests(fresh)} == {r.run_key for r in runs}

        # While a run writing the column is in flight, nothing is launched.
        job = dg.Definitions.merge(TITAN_DEFS, dg.Definitions(resources=backlog)).resolve_job_def(
            "titan_backfill"
        )
        instance.create_run_for_job(
            job_def=job,
            status=dg.DagsterRunStatus.STARTED,
            tags={COLUMN_TAG: "embedding", "dagster/partition": "0"},
        )
        busy, _ = tick(titan_backlog_sensor, instance, backlog)
        assert isinstance(busy, dg.SkipReason) and "in flight" in busy.skip_message


def test_titan_shard_runs_drain_the_backlog_exactly(backlog, db):
    backlog.pop("more")
    total = len(null_ids(db))
    with dg.instance_for_test() as instance:
        embedded = 0
        for shard in SHARDS.get_partition_keys():
            result = dg.materialize(
                [titan_vectors], partition_key=shard, resources=backlog, instance=instance
            )
            [event] = result.get_asset_materialization_events()
            metadata = {k: v.value for k, v in event.materialization.metadata.items()}
            assert metadata["nulls_remaining"] == 0 and metadata["bulk_load"] is False
            embedded += metadata["rows_embedded"]
        assert embedded == total and not null_ids(db)
        result, _ = tick(titan_backlog_sensor, instance, backlog)
        assert isinstance(result, dg.SkipReason)


class InsertingWhileEmbedding:
    """The real Bedrock resource, plus another writer adding chunks during the first calls."""

    def __init__(self, bedrock, db: str, inserts: int) -> None:
        self.bedrock, self.db, self.inserts, self.added = bedrock, db, inserts, 0
        self.label = bedrock.label

    def embed_many(self, texts, count_tokens=None):
        if self.inserts:
            self.inserts -= 1
            with connect(self.db) as conn:  # a separate connection, committed at once
                self.added += conn.execute(
                    "INSERT INTO conversation_chunks (chunk_id, user_id, conversation_id, tier, "
                    "chunk_index, turn_start, turn_end, roles, content, content_hash, "
                    "token_count) SELECT md5(chunk_id || %s), user_id, conversation_id, tier, "
                    "chunk_index, turn_start, turn_end, roles, content || ' (edited)', "
                    "content_hash, token_count FROM conversation_chunks ORDER BY random() "
                    "LIMIT 25",
                    [str(self.inserts)],
                ).rowcount
        return self.bedrock.embed_many(texts, count_tokens)


def test_titan_backfill_picks_up_rows_inserted_while_it_runs(backlog, db):
    before = len(null_ids(db))
    writer = InsertingWhileEmbedding(backlog["titan_model"], db, inserts=4)
    with connect(db, autocommit=True) as conn:
        stats = embed_pending(conn, writer, batch_size=32, progress=lambda _: None)
    assert writer.added == 100
    assert stats.embedded == before + writer.added and stats.failed == 0
    assert not null_ids(db)


def test_lancedb_fill_picks_up_rows_inserted_while_it_runs(backlog, lance_uri, fastembed):
    dg.materialize([coarse_vectors], resources=backlog, tags=ALL_SHARDS)  # makes the column
    store = LanceDBResource(uri=lance_uri)
    with store.get_connection() as db:
        chunks = store.chunks_table(db)
        chunks.update(values_sql={COARSE.column: "NULL"})  # a backlog of every row
        before = chunks.count_rows()
        template = chunks.search().limit(50).to_arrow().drop_columns([COARSE.column])
        added = []

        def embed(texts, lengths):
            if len(added) < 3:  # another writer adds 50 new chunks during each early batch
                fresh_ids = [f"{len(added):x}{i:031x}" for i in range(50)]
                new = template.set_column(0, "chunk_id", [fresh_ids])
                chunks.add(new)
                added.append(new.num_rows)
            return fastembed.embed_documents(texts, lengths)

        result = fill_nulls(chunks, COARSE.column, embed, write_rows=100, progress=lambda _: None)
        assert result.embedded == before + sum(added) == chunks.count_rows()
        assert result.remaining == 0 == count_nulls(chunks, COARSE.column)


KILLED_TITAN_RUN = textwrap.dedent(
    """
    import sys
    from retrieval_assets.lib.bedrock import BedrockResource, LocalFaults
    from retrieval_assets.lib.connection import connect
    from retrieval_assets.lib.titan import embed_pending, ensure_titan_model

    bedrock = BedrockResource(use_local_endpoint=True, data_dir=sys.argv[2],
                              local_model="sentence-transformers/all-MiniLM-L6-v2",
                              local_faults=LocalFaults(latency_ms=40), max_concurrency=4)
    with connect(sys.argv[1], autocommit=True) as conn:
        ensure_titan_model(conn, bedrock.label, bedrock.dimensions)
        embed_pending(conn, bedrock, batch_size=16, progress=lambda m: print(m, flush=True))
    """
)


def test_a_backfill_killed_mid_batch_then_rerun_embeds_every_row_once(
    backlog, db, model_dir, make_bedrock
):
    total = len(null_ids(db))
    worker = subprocess.Popen(
        [sys.executable, "-c", KILLED_TITAN_RUN, db, model_dir],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for line in worker.stdout:
        if line.startswith("titan batch 3:"):  # three batches committed, the fourth in flight
            worker.send_signal(signal.SIGKILL)
            break
    worker.wait(timeout=60)
    assert worker.returncode == -signal.SIGKILL
    left = len(null_ids(db))
    assert 0 < left < total - 16 * 3 + 1
    bedrock = make_bedrock()
    result = dg.materialize(
        [titan_vectors], resources={**backlog, "titan_model": bedrock}, tags=ALL_SHARDS
    )
    event = result.get_asset_materialization_events()[0]  # one per shard, the same figures
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    assert metadata["rows_embedded"] == left and metadata["nulls_remaining"] == 0
    assert metadata["local_endpoint_ok"] == left  # no row done before the kill was redone
    with connect(db) as conn:
        assert conn.execute(
            "SELECT count(*), count(embedding) FROM conversation_chunks"
        ).fetchone() == (total, total)
