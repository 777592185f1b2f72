"""The shard backfills on celery: Redis as the broker (Debian's redis-server on loopback), Dagster's
instance storage in Postgres (dagster-postgres, a database on the embedded server), two worker
processes started by `retrieval-assets worker`, each column's backlog sensor launching one run
per shard with work.

What it shows: every chunk embedded exactly once in every vector column; a worker process
SIGKILLed in the middle of a step fails only that step's run and loses only the batch it had in
hand, which the run retry (re-execution from the failure, what run_retries does) redoes; the
`bedrock` pool (limit 1) keeps Titan steps one at a time across both workers while the other
worker runs local-model steps beside them.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from retrieval_assets.lib.columns import COARSE, FINE, TITAN, VECTOR_COLUMNS
from retrieval_assets.lib.connection import connect
from retrieval_assets.lib.lancedb_store import CHUNKS_TABLE
from retrieval_assets.lib.workers import QUEUE, worker_app_args
from tests.celery_cluster import Cluster, celery_cluster, workers

# Conversations embedded whole first (which makes the columns), then new ones: the backlog.
# Four new chunks land in three or four of the sixteen shards (the test run's size); the throughput
# benchmark backfills every shard.
FIRST = 24
NEW = int(os.environ.get("CELERY_NEW_CONVERSATIONS", "4"))
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with celery_cluster(pg_url, tmp_path_factory.mktemp("celery"), FIRST, NEW) as found:
        with workers(found, 2):
            yield found


def chunk_ids(cluster: Cluster) -> list[str]:
    with connect(cluster.env["DATABASE_URL"]) as conn:
        return [r[0] for r in conn.execute("SELECT chunk_id FROM conversation_chunks")]


def embedded_in(cluster: Cluster, column: str) -> int:
    if column == TITAN.column:
        with connect(cluster.env["DATABASE_URL"]) as conn:
            query = "SELECT count(*) FROM conversation_chunks WHERE embedding IS NOT NULL"
            return conn.execute(query).fetchone()[0]
    with cluster.lancedb.get_connection() as db:
        return db.open_table(CHUNKS_TABLE).count_rows(f"{column} IS NOT NULL")


def kill_a_step_in_flight(cluster: Cluster, job_name: str, killed: dict) -> None:
    """SIGKILL the worker process running a step of `job_name`, once one is running."""
    from celery import Celery

    app = Celery(**worker_app_args(cluster.broker))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            active = app.control.inspect(timeout=0.5).active() or {}
        except Exception:  # the broker gone: the test ended before a step was seen
            return
        for host, tasks in active.items():
            for task in tasks:
                if job_name in json.dumps(task.get("kwargs")):
                    time.sleep(0.3)  # into the step: its model loading or its batch
                    os.kill(task["worker_pid"], signal.SIGKILL)
                    killed.update(host=host, pid=task["worker_pid"])
                    return
        time.sleep(0.05)


def null_ids(cluster: Cluster) -> list[str]:
    with connect(cluster.env["DATABASE_URL"]) as conn:
        query = "SELECT chunk_id FROM conversation_chunks WHERE embedding IS NULL"
        return [r[0] for r in conn.execute(query)]


def step_key(column) -> str:
    return f"{column.store}__{column.asset_name}"


def overlaps(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_shard_backfills_on_two_celery_workers(cluster: Cluster):
    expected = chunk_ids(cluster)
    before = {c.column: embedded_in(cluster, c.column) for c in VECTOR_COLUMNS}
    assert set(before.values()) == {FIRST}, before  # one chunk per conversation
    shards = {chunk_id[0] for chunk_id in null_ids(cluster)}
    assert len(expected) == FIRST + NEW and len(shards) > 1
    columns = [c.column for c in VECTOR_COLUMNS]
    killed: dict = {}
    runs = cluster.runs(
        "backfill",
        *columns,
        on_start=lambda: kill_a_step_in_flight(cluster, FINE.job_name, killed),
    )
    # one run per shard with work, per column
    by_job = {c.job_name: [r for r in runs if r["job"] == c.job_name] for c in VECTOR_COLUMNS}
    for found in by_job.values():
        assert sorted(r["partition"] for r in found) == sorted(shards)
    assert killed, "no fine-vector step was seen running"
    failed = [r for r in runs if r["status"] != "SUCCESS"]
    assert [r["job"] for r in failed] == [FINE.job_name], failed  # only the killed step's run
    # the killed run lost only its own batch: every other shard of the column is embedded
    missing = len(expected) - embedded_in(cluster, FINE.column)
    assert 0 < missing < NEW
    # the run retry re-executes it from the failure, on a worker still standing
    (retried,) = cluster.runs("retry", failed[0]["run_id"])
    assert retried["status"] == "SUCCESS" and retried["rows_embedded"] == missing
    for column in VECTOR_COLUMNS:
        done = [r for r in runs if r["job"] == column.job_name and r["status"] == "SUCCESS"]
        if column is FINE:
            done.append(retried)
        # exactly once: the successful runs embedded every chunk between them, none twice
        backfilled = sum(r["rows_embedded"] for r in done)
        assert backfilled == len(expected) - before[column.column], column.column
        assert embedded_in(cluster, column.column) == len(expected), column.column
    with cluster.lancedb.get_connection() as db:
        ids = db.open_table(CHUNKS_TABLE).search().select(["chunk_id"]).limit(None).to_arrow()
    assert sorted(ids.column("chunk_id").to_pylist()) == sorted(expected)
    # both workers ran steps
    assert {w.split("@")[0] for r in runs for w in r["workers"]} == {"w1", "w2"}
    # the bedrock pool: never two Titan steps at once, though a worker was free beside each
    titan = [r["steps"][step_key(TITAN)] for r in by_job[TITAN.job_name]]
    local = [
        r["steps"][step_key(c)] for c in (COARSE, FINE) for r in by_job[c.job_name]
        if "end" in r["steps"].get(step_key(c), {})
    ]  # fmt: skip
    assert len(titan) == len(shards) and all("start" in s and "end" in s for s in titan)
    assert not any(overlaps(a, b) for i, a in enumerate(titan) for b in titan[i + 1 :])
    assert any(overlaps(t, s) for t in titan for s in local)  # two workers busy at once
    print(
        f"\ncelery: {len(runs)} shard runs on 2 workers, one SIGKILLed mid-step "
        f"({killed}); {missing} rows redone by the retry"
    )


def test_workers_queue_is_the_executors(cluster: Cluster):
    """The workers consume the queue the executor sends to, on the same broker."""
    from celery import Celery

    app = Celery(**worker_app_args(cluster.broker))
    queues = app.control.inspect(timeout=2).active_queues() or {}
    assert len(queues) == 2 and all(
        [q["name"] for q in found] == [QUEUE] for found in queues.values()
    )
