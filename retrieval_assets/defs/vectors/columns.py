"""Every vector column's asset, shard backfill job, backlog sensor and checks, made from its one
declaration in lib/columns.py (adding a column adds all four).

The asset is partitioned by hash shard (the first hex digit of the content-derived chunk id), so
the UI shows each column's completeness per shard, and a shard run records that shard only. Whole
column work (the main job, a remade model, the UI's "all partitions") runs as one run over every
shard (single-run backfill policy): only such a run may create, rename or remake the column. The
column's checks run in the asset's step, after every run that writes it (and alone, without
writing, in the nightly consistency job).

The backlog sensor watches the store: it counts NULL rows per shard and launches one backfill
run per shard with work, keyed by the shard's backlog fingerprint, so that however often it
ticks, one backlog gets one run; a backlog that its runs left as it was (a model failing on those
rows) is not relaunched until it changes (the null_backlog check warns meanwhile). A column made
by another model is remade by one run over every shard, never by shards in parallel.
"""

import json
import warnings
from collections.abc import Iterator
from typing import Any

import dagster as dg

from retrieval_assets.defs.automation.jobs import retrieval_job
from retrieval_assets.defs.checked import asset_spec, checked_asset, materializing, wanted
from retrieval_assets.defs.conversations.assets import LANCEDB_CHUNKS, POSTGRES_CHUNKS
from retrieval_assets.lib.columns import VECTOR_COLUMNS, VectorColumn, fingerprint
from retrieval_assets.lib.shards import SHARD_KEYS
from retrieval_assets.lib.stores import STORES

# A single-run backfill policy is what makes a UI backfill of every shard one run (see above): a
# deliberate use of a beta parameter, said here once instead of by every process that loads it.
warnings.filterwarnings(
    "ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning, module="dagster"
)
SHARDS = dg.StaticPartitionsDefinition(list(SHARD_KEYS))
# Tags of a run over every shard (what the main job and a model change need).
ALL_SHARDS = {
    "dagster/asset_partition_range_start": SHARD_KEYS[0],
    "dagster/asset_partition_range_end": SHARD_KEYS[-1],
}
COLUMN_TAG = "retrieval/column"
CHUNKS = {"lancedb": LANCEDB_CHUNKS, "postgres": POSTGRES_CHUNKS}
MINIMUM_INTERVAL_SECONDS = 120
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]
# Figures that add up over the shards of a run that fills several one by one.
_ADDITIVE = (
    "rows_embedded",
    "rows_skipped",
    "rows_failed",
    "tokens_embedded",
    "seconds",
    "dagster/row_count",
)


def asset_key(column: VectorColumn) -> dg.AssetKey:
    return dg.AssetKey([column.store, column.asset_name])


def _store(column: VectorColumn, resources: Any) -> Any:
    store = STORES[column.store]
    return store(**{key: getattr(resources, key) for key in store.resource_keys})


def _fill(context: dg.AssetExecutionContext, column: VectorColumn) -> dict[str, Any]:
    store = _store(column, context.resources)
    embedder = getattr(context.resources, column.model_resource)
    shards = context.partition_keys
    if set(shards) == set(SHARD_KEYS):
        return store.fill(column, embedder, None, context.log)
    figures: dict[str, Any] = {}
    for shard in shards:  # some shards (a UI backfill of a range): one after another
        done = store.fill(column, embedder, shard, context.log)
        figures = {**done, **{k: figures.get(k, 0) + done[k] for k in _ADDITIVE if k in done}}
    return {**figures, "shard": ",".join(shards)}


def column_asset(column: VectorColumn) -> dg.AssetsDefinition:
    """The column's asset, with its store's checks evaluated in the same step."""
    store = STORES[column.store]
    key = asset_key(column)

    @checked_asset(
        asset_spec(
            key,
            deps=[CHUNKS[column.store]],
            description=column.description,
            group_name="vectors",
            kinds=set(column.kinds),
            tags={COLUMN_TAG: column.column},
        ),
        [
            dg.AssetCheckSpec(spec.name, asset=key, description=spec.description)
            for spec in store.checks
        ],
        partitions_def=SHARDS,
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool=column.pool,
        required_resource_keys={*store.resource_keys, column.model_resource},
    )
    def vectors(
        context: dg.AssetExecutionContext,
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        if materializing(context, key):
            yield dg.MaterializeResult(asset_key=key, metadata=_fill(context, column))
        severity = {spec.name: spec.warn for spec in store.checks}
        if not any(wanted(context, key, name) for name in severity):
            return
        outcomes = _store(column, context.resources).check(
            column, getattr(context.resources, column.model_resource)
        )
        for outcome in outcomes:
            if wanted(context, key, outcome.name):
                yield dg.AssetCheckResult(
                    asset_key=key,
                    check_name=outcome.name,
                    passed=outcome.passed,
                    severity=dg.AssetCheckSeverity.WARN
                    if severity[outcome.name]
                    else dg.AssetCheckSeverity.ERROR,
                    metadata=outcome.metadata,
                )

    return vectors


def backfill_job(column: VectorColumn) -> Any:
    return dg.define_asset_job(
        column.job_name,
        selection=dg.AssetSelection.assets(asset_key(column)),  # with its checks (and shards)
        tags={COLUMN_TAG: column.column},
        description=f"Fill NULL `{column.column}` vectors ({column.store}), one hash shard per "
        "run, or every shard in one run.",
    )


def runs_in_flight(instance: dg.DagsterInstance, column: VectorColumn) -> list[str]:
    """Runs not yet finished that write the column: its backfills, or runs materializing its
    asset (the main job, automation, a click in the UI)."""
    key = asset_key(column)
    return [
        run.run_id
        for run in instance.get_runs(dg.RunsFilter(statuses=IN_FLIGHT), limit=500)
        if run.tags.get(COLUMN_TAG) == column.column
        or (run.asset_selection is not None and key in run.asset_selection)
        or (run.asset_selection is None and run.job_name == retrieval_job.name)
    ]


def backlog_sensor(column: VectorColumn, job: Any) -> dg.SensorDefinition:
    store = STORES[column.store]

    @dg.sensor(
        name=column.sensor_name,
        job=job,
        minimum_interval_seconds=MINIMUM_INTERVAL_SECONDS,
        required_resource_keys={*store.resource_keys, column.model_resource},
        default_status=dg.DefaultSensorStatus.STOPPED,
        description=f"Launches `{column.job_name}` runs, one per hash shard, for chunks whose "
        f"`{column.column}` vector is NULL; one run over every shard when the column's model "
        "changed.",
    )
    def sensor(context: dg.SensorEvaluationContext, **_: object) -> dg.SensorResult | dg.SkipReason:
        # (**_: direct invocation passes the required resources by name; they are read from
        # context.resources either way.)
        name = column.column
        busy = runs_in_flight(context.instance, column)
        if busy:
            return dg.SkipReason(
                f"{len(busy)} run(s) writing {name} still in flight ({busy[0]}); "
                "the backlog is read again once they finish"
            )
        cursor = json.loads(context.cursor) if context.cursor else {}
        launched: dict[str, str] = cursor.get("launched", {})
        backlog = _store(column, context.resources).backlog(
            column, getattr(context.resources, column.model_resource)
        )
        state = {"rows": backlog.rows, "stale": backlog.stale}
        if backlog.empty:
            context.update_cursor(json.dumps({**state, "launched": {}}))
            return dg.SkipReason(f"{name}: every chunk has a vector; nothing to backfill")
        if backlog.stale is not None:
            key = f"{name}:migrate:{fingerprint(backlog.rows, backlog.stale, '')}"
            context.update_cursor(json.dumps({**state, "launched": {"migrate": key}}))
            if launched.get("migrate") == key:
                return dg.SkipReason(f"{backlog.stale}; its run over every shard {key} already ran")
            return dg.SensorResult(
                run_requests=[dg.RunRequest(run_key=key, tags={COLUMN_TAG: name, **ALL_SHARDS})]
            )
        todo = {s: p for s, (_, p) in backlog.shards.items() if launched.get(s) != p}
        context.update_cursor(
            json.dumps({**state, "launched": {s: p for s, (_, p) in backlog.shards.items()}})
        )
        if not todo:
            return dg.SkipReason(
                f"{name}: {backlog.rows} NULL rows, unchanged since backfill runs were launched "
                "for them; see those runs' logs (the null_backlog check warns)"
            )
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=f"{name}:{shard}:{print_}",
                    partition_key=shard,
                    tags={
                        COLUMN_TAG: name,
                        "retrieval/backlog_rows": str(backlog.shards[shard][0]),
                    },
                )
                for shard, print_ in sorted(todo.items())
            ]
        )

    return sensor


def column_definitions(column: VectorColumn) -> dg.Definitions:
    """The asset (with its checks), backfill job and backlog sensor of one declared column."""
    job = backfill_job(column)
    return dg.Definitions(
        assets=[column_asset(column)],
        jobs=[job],
        sensors=[backlog_sensor(column, job)],
    )


defs = dg.Definitions.merge(*(column_definitions(column) for column in VECTOR_COLUMNS))
