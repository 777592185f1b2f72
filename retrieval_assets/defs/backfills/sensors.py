"""Backlog sensors: one per vector column, watching the stores for rows that still need a vector.

Each tick counts the column's NULL rows per hash shard (a stale column — made by another model —
counts whole). It launches nothing while a run that writes the column is in flight; otherwise one
backfill run per shard with work, keyed by the shard's backlog fingerprint so that however often
it ticks, one backlog gets one run. A backlog that its runs left as it was (a model failing on
those rows) is not relaunched until it changes: the NULL-backlog checks report it meanwhile. A
stale column is migrated by materializing its asset, never by shards in parallel.
"""

import json
from collections.abc import Callable

import dagster as dg

from retrieval_assets.defs.backfills.jobs import BACKFILL_JOBS, COLUMN_TAG
from retrieval_assets.defs.jobs import retrieval_job
from retrieval_assets.defs.local_embeddings.assets import FASTEMBED_VECTORS, ST_VECTORS
from retrieval_assets.defs.titan_embeddings.assets import TITAN_EMBEDDINGS
from retrieval_assets.lib.backfill import Backlog, fingerprint, lancedb_backlog, postgres_backlog
from retrieval_assets.lib.vectors import FASTEMBED_COLUMN, ST_COLUMN

MINIMUM_INTERVAL_SECONDS = 120
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def runs_in_flight(instance: dg.DagsterInstance, column: str, asset_key: dg.AssetKey) -> list[str]:
    """Runs not yet finished that write `column`: its backfills, or runs materializing its
    asset (the main job, automation, a click in the UI)."""
    return [
        run.run_id
        for run in instance.get_runs(dg.RunsFilter(statuses=IN_FLIGHT), limit=500)
        if run.tags.get(COLUMN_TAG) == column
        or (run.asset_selection is not None and asset_key in run.asset_selection)
        or (run.asset_selection is None and run.job_name == retrieval_job.name)
    ]


def _read_lancedb(column: str, model_key: str) -> Callable[[dg.SensorEvaluationContext], Backlog]:
    def read(context: dg.SensorEvaluationContext) -> Backlog:
        postgres, lancedb = context.resources.postgres, context.resources.lancedb
        with postgres.get_connection() as conn, lancedb.get_connection() as db:
            label = getattr(context.resources, model_key).label
            return lancedb_backlog(lancedb.chunks_table(db), conn, column, label)

    return read


def _read_postgres(context: dg.SensorEvaluationContext) -> Backlog:
    with context.resources.postgres.get_connection() as conn:
        return postgres_backlog(conn, context.resources.bedrock.label)


def backlog_sensor(
    name: str,
    column: str,
    asset_key: dg.AssetKey,
    resource_keys: set[str],
    read: Callable[[dg.SensorEvaluationContext], Backlog],
) -> dg.SensorDefinition:
    backfill_job = BACKFILL_JOBS[column]

    @dg.sensor(
        name=f"{name}_backlog_sensor",
        jobs=[backfill_job, retrieval_job],
        minimum_interval_seconds=MINIMUM_INTERVAL_SECONDS,
        required_resource_keys=resource_keys,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description=f"Launches `{backfill_job.name}` runs, one per hash shard, for chunks whose "
        f"`{column}` vector is NULL; re-materializes the asset when the column's model changed.",
    )
    def sensor(context: dg.SensorEvaluationContext, **_: object) -> dg.SensorResult | dg.SkipReason:
        # (**_: direct invocation passes the required resources by name; they are read from
        # context.resources either way.)
        busy = runs_in_flight(context.instance, column, asset_key)
        if busy:
            return dg.SkipReason(
                f"{len(busy)} run(s) writing {column} still in flight ({busy[0]}); "
                "the backlog is read again once they finish"
            )
        cursor = json.loads(context.cursor) if context.cursor else {}
        launched: dict[str, str] = cursor.get("launched", {})
        backlog = read(context)
        state = {"rows": backlog.rows, "stale": backlog.stale}
        if backlog.empty:
            context.update_cursor(json.dumps({**state, "launched": {}}))
            return dg.SkipReason(f"{column}: every chunk has a vector; nothing to backfill")
        if backlog.stale is not None:
            key = f"{column}:migrate:{fingerprint(backlog.rows, backlog.stale, '')}"
            context.update_cursor(json.dumps({**state, "launched": {"migrate": key}}))
            if launched.get("migrate") == key:
                return dg.SkipReason(f"{backlog.stale}; its migration run {key} already ran")
            return dg.SensorResult(
                run_requests=[
                    dg.RunRequest(
                        run_key=key,
                        job_name=retrieval_job.name,
                        asset_selection=[asset_key],
                        tags={COLUMN_TAG: column},
                    )
                ],
            )
        todo = {s: p for s, (_, p) in backlog.shards.items() if launched.get(s) != p}
        context.update_cursor(
            json.dumps({**state, "launched": {s: p for s, (_, p) in backlog.shards.items()}})
        )
        if not todo:
            return dg.SkipReason(
                f"{column}: {backlog.rows} NULL rows, unchanged since backfill runs were launched "
                "for them; see those runs' logs (the null_backlog check warns)"
            )
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=f"{column}:{shard}:{print_}",
                    job_name=backfill_job.name,
                    partition_key=shard,
                    tags={
                        COLUMN_TAG: column,
                        "retrieval/backlog_rows": str(backlog.shards[shard][0]),
                    },
                )
                for shard, print_ in sorted(todo.items())
            ]
        )

    return sensor


fastembed_backlog_sensor = backlog_sensor(
    "fastembed",
    FASTEMBED_COLUMN,
    FASTEMBED_VECTORS,
    {"postgres", "lancedb", "fastembed"},
    _read_lancedb(FASTEMBED_COLUMN, "fastembed"),
)
sentence_transformer_backlog_sensor = backlog_sensor(
    "sentence_transformer",
    ST_COLUMN,
    ST_VECTORS,
    {"postgres", "lancedb", "sentence_transformer"},
    _read_lancedb(ST_COLUMN, "sentence_transformer"),
)
titan_backlog_sensor = backlog_sensor(
    "titan", "embedding", TITAN_EMBEDDINGS, {"postgres", "bedrock"}, _read_postgres
)
