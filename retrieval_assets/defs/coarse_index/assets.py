"""The ANN index over the coarse (FastEmbed) vectors, kept in step with the table."""

from collections.abc import Iterator
from typing import Any

import dagster as dg

from retrieval_assets.defs.checked import asset_spec, checked_asset, materializing, wanted
from retrieval_assets.defs.lexical.assets import LANCEDB_LEXICAL
from retrieval_assets.defs.vectors.columns import asset_key
from retrieval_assets.lib.bedrock import BedrockResource
from retrieval_assets.lib.canary import PROBES, RECORDED_HIT_AT_5, canary_hit_at_5
from retrieval_assets.lib.columns import COARSE, FINE
from retrieval_assets.lib.embedders import FastEmbedResource, SentenceTransformerResource
from retrieval_assets.lib.lancedb_store import LanceDBResource, maintain, on_latest_version
from retrieval_assets.lib.postgres import PostgresResource
from retrieval_assets.lib.reporting import arrow_column_schema
from retrieval_assets.lib.search import (
    PROBE_QUERIES,
    RESULT_COLUMNS,
    postgres_search,
    sample_recall,
    search,
)
from retrieval_assets.lib.search_snapshot import build, current
from retrieval_assets.lib.sources import ConversationSourceResource
from retrieval_assets.lib.vectors import ensure_coarse_index

COARSE_INDEX = dg.AssetKey(["lancedb", "coarse_index"])
RECALL_CHECK = "coarse_recall_at_10"
RECALL_THRESHOLD = 0.9


@checked_asset(
    asset_spec(
        COARSE_INDEX,
        # After the full-text index: both commit index changes to the table, one at a time.
        deps=[asset_key(COARSE), LANCEDB_LEXICAL],
        group_name="coarse_index",
        kinds={"lancedb"},
        description="The IVF_HNSW_SQ (cosine) index over the coarse vectors that serves the "
        "top-100 coarse search. Built once the table has 10,000 vectors, rebuilt when over 20% of "
        "the vectors arrived after it was trained, otherwise refreshed incrementally; smaller "
        "tables are searched exactly.",
    ),
    [
        dg.AssetCheckSpec(
            RECALL_CHECK,
            asset=COARSE_INDEX,
            description=f"ANN recall@10 vs exact search on {PROBE_QUERIES} sampled queries is at "
            f"least {RECALL_THRESHOLD} (measured once per table version; repeated while the table "
            "stays there).",
        )
    ],
)
def coarse_index(
    context: dg.AssetExecutionContext,
    lancedb: LanceDBResource,
    coarse_model: FastEmbedResource,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    with lancedb.get_connection() as db:
        if materializing(context, COARSE_INDEX):
            table = lancedb.chunks_table(db)
            result = ensure_coarse_index(table)
            columns = arrow_column_schema(table.schema, ["chunk_id", COARSE.column])
            context.log.info(
                f"coarse index {result.action}: {result.indexed_rows} rows indexed, "
                f"{result.unindexed_rows} scanned exactly"
            )
            yield dg.MaterializeResult(
                asset_key=COARSE_INDEX,
                metadata={
                    "action": result.action,
                    "index_type": "IVF_HNSW_SQ" if result.indexed_rows else "none (exact scan)",
                    "indexed_rows": result.indexed_rows,
                    "unindexed_rows": result.unindexed_rows,
                    # vectors searched
                    "dagster/row_count": result.indexed_rows + result.unindexed_rows,
                    "dagster/column_schema": columns,
                    "seconds": round(result.seconds, 2),
                },
            )
        if wanted(context, COARSE_INDEX, RECALL_CHECK):
            yield _coarse_recall(context.instance, lancedb, db, coarse_model)


def _coarse_recall(
    instance: dg.DagsterInstance, lancedb: LanceDBResource, db: Any, coarse_model: FastEmbedResource
) -> dg.AssetCheckResult:
    key = dg.AssetCheckKey(COARSE_INDEX, RECALL_CHECK)
    repeated = measured_before(instance, key, lancedb.chunks_table(db).version)
    if repeated is not None:
        return repeated
    recall, table = on_latest_version(
        lambda: lancedb.chunks_table(db), lambda table: sample_recall(table, coarse_model)
    )
    return dg.AssetCheckResult(
        asset_key=COARSE_INDEX,
        check_name=RECALL_CHECK,
        passed=recall >= RECALL_THRESHOLD,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "recall_at_10": recall,
            "table_version": table.version,
            "threshold": RECALL_THRESHOLD,
            **coarse_model.query_cache.stats(),
        },
    )


CHUNK_TABLE_MAINTENANCE = dg.AssetKey(["lancedb", "chunk_table_maintenance"])


@dg.asset(
    key=CHUNK_TABLE_MAINTENANCE,
    deps=[COARSE_INDEX, asset_key(FINE)],
    group_name="coarse_index",
    kinds={"lancedb"},
    owners=["team:data-platform"],
    code_version="1",
    automation_condition=dg.AutomationCondition.eager(),
)
def chunk_table_maintenance(
    context: dg.AssetExecutionContext, lancedb: LanceDBResource
) -> dg.MaterializeResult:
    """The LanceDB chunk table kept compact: after the vectors and the index are written, small
    files are compacted, new rows folded into the indices and versions older than the retention
    (LANCEDB_KEEP_VERSIONS_MINUTES) removed, so incremental runs do not pile up versions."""
    with lancedb.get_connection() as db:
        table = lancedb.chunks_table(db)
        result = maintain(table, lancedb.keep_versions_minutes)
        rows, columns = table.count_rows(), arrow_column_schema(table.schema)
    context.log.info(
        f"chunk table: {result['versions_before']} -> {result['versions_after']} versions, "
        f"{result['fragments_before']} -> {result['fragments_after']} fragments"
    )
    return dg.MaterializeResult(
        metadata={**result, "dagster/row_count": rows, "dagster/column_schema": columns}
    )


SEARCH_SNAPSHOT = dg.AssetKey(["lancedb", "search_snapshot"])
SNAPSHOT_RECALL_CHECK = "search_snapshot_recall_at_10"


@checked_asset(
    asset_spec(
        SEARCH_SNAPSHOT,
        deps=[CHUNK_TABLE_MAINTENANCE],
        group_name="coarse_index",
        kinds={"lancedb", "usearch"},
        description="The chunk table's current version as searches read it fastest: its coarse "
        "vectors in an in-process HNSW (usearch, f16), its fine vectors and result columns "
        "memory-mapped beside them. An unfiltered search uses it while the table stays at that "
        "version and LanceDB's index otherwise (after any write, until this asset runs again). "
        'Each run updates the previous graph with the chunks that changed (action "updated"), '
        "rebuilding it only when removed entries pass 20 % of the rows.",
    ),
    [
        dg.AssetCheckSpec(
            SNAPSHOT_RECALL_CHECK,
            asset=SEARCH_SNAPSHOT,
            description=f"The snapshot's recall@10 vs exact search on {PROBE_QUERIES} sampled "
            f"queries is at least {RECALL_THRESHOLD} (skipped when no snapshot serves the table's "
            "version; measured once per version).",
        )
    ],
)
def search_snapshot(
    context: dg.AssetExecutionContext,
    lancedb: LanceDBResource,
    coarse_model: FastEmbedResource,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    if materializing(context, SEARCH_SNAPSHOT):
        yield _publish_snapshot(context, lancedb)
    if wanted(context, SEARCH_SNAPSHOT, SNAPSHOT_RECALL_CHECK):
        yield _snapshot_recall(context.instance, lancedb, coarse_model)


def _publish_snapshot(
    context: dg.AssetExecutionContext, lancedb: LanceDBResource
) -> dg.MaterializeResult:
    with lancedb.get_connection() as db:
        table = lancedb.chunks_table(db)
        published = current(lancedb.snapshot_root)
        if published is not None and published.serves(table):
            action, rows, seconds, inserted = "current", published.rows, 0.0, 0
        else:
            built = build(table, lancedb.snapshot_root, RESULT_COLUMNS)
            action, rows, seconds, inserted = (
                built.action,
                built.rows,
                built.seconds,
                built.inserted,
            )
            published = current(lancedb.snapshot_root)
            if published is None:
                raise RuntimeError(f"no search snapshot in {lancedb.snapshot_root} after a build")
        # What a search reads from it: the result columns and both vectors (f16 on disk).
        columns = arrow_column_schema(table.schema, [*RESULT_COLUMNS, COARSE.column, FINE.column])
    context.log.info(
        f"search snapshot {action}: version {published.version}, {rows} rows, "
        f"{inserted} inserted into the graph in {seconds:.1f} s"
    )
    size = sum(f.stat().st_size for f in published.path.iterdir())
    return dg.MaterializeResult(
        asset_key=SEARCH_SNAPSHOT,
        metadata={
            "action": action,
            "table_version": published.version,
            "dagster/row_count": rows,
            "dagster/column_schema": columns,
            "graph_inserts": inserted,
            "graph_tombstones": published.tombstones,
            "seconds": round(seconds, 2),
            "size_mb": round(size / 1e6, 1),
            "path": dg.MetadataValue.path(str(published.path)),
        },
    )


def _snapshot_recall(
    instance: dg.DagsterInstance, lancedb: LanceDBResource, coarse_model: FastEmbedResource
) -> dg.AssetCheckResult:
    with lancedb.get_connection() as db:
        table = lancedb.chunks_table(db)
        snapshot = current(lancedb.snapshot_root)
        if snapshot is None or not snapshot.serves(table):
            return dg.AssetCheckResult(
                asset_key=SEARCH_SNAPSHOT,
                check_name=SNAPSHOT_RECALL_CHECK,
                passed=True,
                metadata={"skipped": "the table changed since the snapshot; LanceDB serves"},
            )
        key = dg.AssetCheckKey(SEARCH_SNAPSHOT, SNAPSHOT_RECALL_CHECK)
        repeated = measured_before(instance, key, snapshot.version)
        if repeated is not None:
            return repeated
        recall = sample_recall(table, coarse_model, snapshot=snapshot)
    return dg.AssetCheckResult(
        asset_key=SEARCH_SNAPSHOT,
        check_name=SNAPSHOT_RECALL_CHECK,
        passed=recall >= RECALL_THRESHOLD,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "recall_at_10": recall,
            "table_version": snapshot.version,
            "threshold": RECALL_THRESHOLD,
        },
    )


def measured_before(
    instance: dg.DagsterInstance, key: dg.AssetCheckKey, version: int
) -> dg.AssetCheckResult | None:
    """This recall check's last result, given again, where it measured this same table version
    at the same threshold: the sampled rows, the index and the snapshot of one version do not
    change, so a run with nothing new does not load a query model to find the same figure."""
    # The last evaluation that completed (this run's own execution is recorded as planned, and a
    # run that died leaves one so too).
    history = instance.event_log_storage.get_asset_check_execution_history(key, limit=5)
    evaluated = (
        (r.run_id, r.event.asset_check_evaluation)
        for r in history
        if r.event and r.event.asset_check_evaluation
    )
    run_id, last = next(evaluated, (None, None))
    if last is None:
        return None
    meta = {k: v.value for k, v in last.metadata.items()}
    if meta.get("table_version") != version or meta.get("threshold") != RECALL_THRESHOLD:
        return None
    return dg.AssetCheckResult(
        asset_key=key.asset_key,
        check_name=key.name,
        passed=last.passed,
        severity=last.severity,
        metadata={"measured_in_run": run_id, **last.metadata},
    )


QUALITY_CHECK = "retrieval_quality"


@dg.asset_check(
    asset=SEARCH_SNAPSHOT,
    name=QUALITY_CHECK,
    description=f"Hybrid search answers the {len(PROBES)} labelled canary questions over the "
    f"sample conversations in its top 5, in LanceDB and in Postgres, at least as often as "
    f"recorded ({RECORDED_HIT_AT_5:.2f}); warns when a model or setting change degrades search. "
    "Passes with nothing measured where the sample conversations are not stored.",
)
def retrieval_quality(
    lancedb: LanceDBResource,
    postgres: PostgresResource,
    coarse_model: FastEmbedResource,
    fine_model: SentenceTransformerResource,
    titan_model: BedrockResource,
    conversation_source: ConversationSourceResource,
) -> dg.AssetCheckResult:
    user = conversation_source.default_user_id  # the samples' records that name no user
    with lancedb.get_connection() as db, postgres.get_connection() as conn:
        table = lancedb.chunks_table(db)
        snapshot = current(lancedb.snapshot_root)
        found = {
            "lancedb": canary_hit_at_5(
                lambda text, user: search(
                    table, coarse_model, fine_model, text, 5, user, snapshot=snapshot
                ),
                user,
            ),
            "postgres": canary_hit_at_5(
                lambda text, user: postgres_search(conn, titan_model, text, 5, user),
                user,
            ),
        }
    measured = {store: v for store, v in found.items() if v is not None}
    return dg.AssetCheckResult(
        passed=all(v >= RECORDED_HIT_AT_5 for v in measured.values()),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            **{f"{store}_hybrid_hit_at_5": v for store, v in measured.items()},
            "recorded_hit_at_5": RECORDED_HIT_AT_5,
            "probes": len(PROBES),
            **({} if measured else {"skipped": "the sample conversations are not stored"}),
        },
    )
