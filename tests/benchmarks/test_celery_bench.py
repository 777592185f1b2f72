"""Benchmark: shard backfills on 1, 2 and 4 celery workers, as ratios, in one run.

Run with `./dev bench -k celery` (not part of `./dev test`). The deployment of
tests/test_celery.py (Redis, Postgres instance storage, the stores); CELERY_BENCH_CONVERSATIONS
new conversations (one chunk each, default 4,800) wait in every shard of the fine column. For each
worker count the column is cleared, the `local_models` pool is set to the worker count (with the
default of 1 a second worker would only wait), the backlog sensor launches one run per shard, and
the time from the tick to the last run's end is measured. Every count embeds the same rows.

The ceiling is the machine: each worker's model already uses every core it finds, so on two cores
more workers mostly share the same two cores; the figure shows the overhead of spreading a
backfill over workers and what is left to gain, not a cluster's scaling. Nothing asserts a time.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from retrieval_assets.lib.columns import FINE
from retrieval_assets.lib.lancedb_store import CHUNKS_TABLE
from tests.celery_cluster import BIN, celery_cluster, workers

pytestmark = pytest.mark.benchmark
NEW = int(os.environ.get("CELERY_BENCH_CONVERSATIONS", "4800"))
COUNTS = (1, 2, 4)


def test_shard_backfill_throughput_on_1_2_4_workers(pg_url, tmp_path):
    rows: list[tuple[int, float, int, int]] = []
    with celery_cluster(pg_url, tmp_path, first=24, new=NEW) as cluster:
        for count in COUNTS:
            with cluster.lancedb.get_connection() as db:
                db.open_table(CHUNKS_TABLE).update(values_sql={FINE.column: "NULL"})
            pool = subprocess.run(
                [
                    str(BIN / "dagster"),
                    "instance",
                    "concurrency",
                    "set",
                    "local_models",
                    str(count),
                ],
                env=cluster.env,
                capture_output=True,
                text=True,
            )
            assert pool.returncode == 0, pool.stderr
            with workers(cluster, count):
                started = time.monotonic()
                runs = cluster.runs("backfill", FINE.column)
                seconds = time.monotonic() - started
            assert all(r["status"] == "SUCCESS" for r in runs)
            embedded = sum(r["rows_embedded"] for r in runs)
            assert embedded == 24 + NEW  # every row, once, at every count
            rows.append((count, seconds, len(runs), embedded))
    base = rows[0][1]
    print(
        f"\nShard backfill of {FINE.column} ({24 + NEW:,} rows, MiniLM), celery + Redis, "
        f"{os.cpu_count()} cores\n"
        "| workers | runs | rows | seconds | rows/s | speed-up vs 1 worker |\n"
        "|---|---|---|---|---|---|"
    )
    for count, seconds, runs, embedded in rows:
        print(
            f"| {count} | {runs} | {embedded:,} | {seconds:.1f} | {embedded / seconds:.0f} "
            f"| {base / seconds:.2f}x |"
        )
