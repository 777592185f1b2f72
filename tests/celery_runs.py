"""Runs launched as the daemon would, in a process whose environment names the celery broker, the
Postgres instance storage and the stores (tests/test_celery.py starts it):

    python -m tests.celery_runs backfill <column>...   each column's backlog sensor ticks once;
                                                       its run requests run at once, each run's
                                                       orchestrator in a process of a pool
    python -m tests.celery_runs ingest [--with-vectors] the conversations and chunks (both stores),
                                                       every vector column too if asked
    python -m tests.celery_runs retry <run_id>         re-execute a failed run from its failure,
                                                       as run_retries does

Every run's steps go to the celery workers (the definitions' executor when CELERY_BROKER_URL is
set). Prints one JSON line per finished run: what the test checks.

The orchestrators are processes forked from this one, not threads: Dagster configures Python's
logging for each run it starts (logging.config.dictConfig), which deadlocks between threads.
The pool forks before anything here opens LanceDB (its threads are not fork-safe); the sensors
tick in one of its processes.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from typing import Any

import dagster as dg

from retrieval_assets import cli
from retrieval_assets.definitions import build_definitions
from retrieval_assets.defs.conversations.assets import (
    CONVERSATIONS,
    LANCEDB_CHUNKS,
    POSTGRES_CHUNKS,
)
from retrieval_assets.defs.resources import resources_from_environment
from retrieval_assets.defs.vectors.columns import ALL_SHARDS
from retrieval_assets.lib.columns import VECTOR_COLUMNS


def job(name: str) -> dg.JobDefinition:
    return build_definitions().resolve_job_def(name)


def _report(instance: dg.DagsterInstance, run_id: str, job_name: str) -> dict[str, Any]:
    """The run's outcome, its steps' start and end times, the celery workers that ran them, and
    the rows each materialization embedded."""
    run = instance.get_run_by_id(run_id)
    assert run is not None
    steps: dict[str, dict[str, float]] = {}
    workers, embedded = set(), 0
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None:
            continue
        key = event.step_key
        if event.event_type_value == "STEP_START":
            steps.setdefault(key, {})["start"] = record.timestamp
        elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE"):
            steps.setdefault(key, {})["end"] = record.timestamp
        elif event.event_type_value == "ENGINE_EVENT" and event.engine_event_data:
            host = event.engine_event_data.metadata.get("Celery worker")
            if host is not None:
                workers.add(host.value)
        elif event.event_type_value == "ASSET_MATERIALIZATION":
            metadata = event.step_materialization_data.materialization.metadata
            if "rows_embedded" in metadata:
                embedded += metadata["rows_embedded"].value
    return {
        "run_id": run_id,
        "job": job_name,
        "partition": run.tags.get("dagster/partition"),
        "status": run.status.value,
        "steps": steps,
        "workers": sorted(workers),
        "rows_embedded": embedded,
    }


def _execute(job_name: str, tags: dict[str, str], retry_of: str | None = None) -> None:
    recon = dg.build_reconstructable_job(
        "tests.celery_runs", "job", reconstructable_args=(job_name,)
    )
    with dg.DagsterInstance.get() as instance:
        options = dg.ReexecutionOptions.from_failure(retry_of, instance) if retry_of else None
        with dg.execute_job(
            recon, instance=instance, tags=tags, raise_on_error=False, reexecution_options=options
        ) as result:
            run_id = result.run_id
        print(json.dumps(_report(instance, run_id, job_name)), flush=True)


def _requests(columns: list[str]) -> list[tuple[str, dict[str, str]]]:
    """Each column's sensor, ticked once: the runs it asks for (job, tags)."""
    resources = resources_from_environment()
    defs = build_definitions()
    launches = []
    with dg.DagsterInstance.get() as instance:
        for column in (c for c in VECTOR_COLUMNS if c.column in columns):
            sensor = defs.get_sensor_def(column.sensor_name)
            needed = {key: resources[key] for key in sensor.required_resource_keys}
            with dg.build_sensor_context(instance=instance, resources=needed) as context:
                result = sensor(context)
            assert isinstance(result, dg.SensorResult), result
            for request in result.run_requests or []:
                assert request.partition_key, request  # a shard run, not a whole-column one
                tags = {**request.tags, "dagster/partition": request.partition_key}
                launches.append((column.job_name, tags))
    return launches


def backfill(columns: list[str]) -> None:
    build_definitions()  # once, before the pool forks
    with multiprocessing.get_context("fork").Pool(16) as pool:
        launches = pool.apply(_requests, (columns,))
        print(json.dumps({"launching": len(launches)}), flush=True)
        pool.starmap(_execute, launches, chunksize=1)


def ingest(with_vectors: bool) -> None:
    """The conversations and chunks in both stores, in this process; with every vector column
    filled whole as well (so later chunks are the sensors' shard backfills)."""
    defs = build_definitions()
    keys = [CONVERSATIONS, POSTGRES_CHUNKS, LANCEDB_CHUNKS]
    if with_vectors:
        keys += [dg.AssetKey([c.store, c.asset_name]) for c in VECTOR_COLUMNS]
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize(
            [defs.get_assets_def(key) for key in keys],
            resources=resources_from_environment(),
            instance=instance,
            tags=ALL_SHARDS,
        )
    assert result.success


def retry(run_id: str) -> None:
    with dg.DagsterInstance.get() as instance:
        run = instance.get_run_by_id(run_id)
        assert run is not None
        # the same shard and column (the run retry keeps the run's own tags, as here)
        kept = {k: v for k, v in run.tags.items() if not k.startswith("dagster/")}
        if "dagster/partition" in run.tags:
            kept["dagster/partition"] = run.tags["dagster/partition"]
    _execute(run.job_name, kept, run_id)


if __name__ == "__main__":
    cli._ensure_dagster_home()
    command, *args = sys.argv[1:]
    if command == "backfill":
        backfill(args)
    elif command == "ingest":
        ingest(with_vectors="--with-vectors" in args)
    else:
        retry(args[0])
    cli.exit_without_teardown(0)  # as the command does: the teardown only costs the test time
