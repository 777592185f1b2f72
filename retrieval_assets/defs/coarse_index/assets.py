"""The ANN index over the coarse (FastEmbed) vectors, kept in step with the table."""

import dagster as dg

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
from retrieval_assets.lib.vectors import ensure_coarse_index

COARSE_INDEX = dg.AssetKey(["lancedb", "coarse_index"])
RECALL_CHECK = "coarse_recall_at_10"
RECALL_THRESHOLD = 0.9


@dg.asset(
    key=COARSE_INDEX,
    # After the full-text index: both commit index changes to the table, one at a time.
    deps=[asset_key(COARSE), LANCEDB_LEXICAL],
    group_name="coarse_index",
    kinds={"lancedb"},
    owners=["team:data-platform"],
    code_version="1",
    automation_condition=dg.AutomationCondition.eager(),
)
def coarse_index(
    context: dg.AssetExecutionContext, lancedb: LanceDBResource
) -> dg.MaterializeResult:
    """The IVF_HNSW_SQ (cosine) index over the coarse vectors that serves the top-100 coarse
    search. Built once the table has 10,000 vectors, rebuilt when over 20% of the vectors arrived
    after it was trained, otherwise refreshed incrementally; smaller tables are searched exactly."""
    with lancedb.get_connection() as db:
        table = lancedb.chunks_table(db)
        result = ensure_coarse_index(table)
        columns = arrow_column_schema(table.schema, ["chunk_id", COARSE.column])
    context.log.info(
        f"coarse index {result.action}: {result.indexed_rows} rows indexed, "
        f"{result.unindexed_rows} scanned exactly"
    )
    return dg.MaterializeResult(
        metadata={
            "action": result.action,
            "index_type": "IVF_HNSW_SQ" if result.indexed_rows else "none (exact scan)",
            "indexed_rows": result.indexed_rows,
            "unindexed_rows": result.unindexed_rows,
            "dagster/row_count": result.indexed_rows + result.unindexed_rows,  # vectors searched
            "dagster/column_schema": columns,
            "seconds": round(result.seconds, 2),
        }
    )


@dg.asset_check(
    asset=COARSE_INDEX,
    name=RECALL_CHECK,
    description=f"ANN recall@10 vs exact search on {PROBE_QUERIES} sampled queries is at least "
    f"{RECALL_THRESHOLD} (measured once per table version; repeated while the table stays there).",
)
def coarse_recall(
    context: dg.AssetCheckExecutionContext,
    lancedb: LanceDBResource,
    coarse_model: FastEmbedResource,
) -> dg.AssetCheckResult:
    with lancedb.get_connection() as db:
        version = lancedb.chunks_table(db).version
        repeated = measured_before(context, version)
        if repeated is not None:
            return repeated
        recall, table = on_latest_version(
            lambda: lancedb.chunks_table(db), lambda table: sample_recall(table, coarse_model)
        )
    return dg.AssetCheckResult(
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


@dg.asset(
    key=SEARCH_SNAPSHOT,
    deps=[CHUNK_TABLE_MAINTENANCE],
    group_name="coarse_index",
    kinds={"lancedb", "usearch"},
    owners=["team:data-platform"],
    code_version="1",
    automation_condition=dg.AutomationCondition.eager(),
)
def search_snapshot(
    context: dg.AssetExecutionContext, lancedb: LanceDBResource
) -> dg.MaterializeResult:
    """The chunk table's current version as searches read it fastest: its coarse vectors in an
    in-process HNSW (usearch, f16), its fine vectors and result columns memory-mapped beside them.
    An unfiltered search uses it while the table stays at that version and LanceDB's index
    otherwise (after any write, until this asset runs again). Each run updates the previous
    graph with the chunks that changed (action "updated"), rebuilding it only when removed
    entries pass 20 % of the rows."""
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
        }
    )


@dg.asset_check(
    asset=SEARCH_SNAPSHOT,
    name=SNAPSHOT_RECALL_CHECK,
    description=f"The snapshot's recall@10 vs exact search on {PROBE_QUERIES} sampled queries is "
    f"at least {RECALL_THRESHOLD} (skipped when no snapshot serves the table's version; measured "
    "once per version).",
)
def search_snapshot_recall(
    context: dg.AssetCheckExecutionContext,
    lancedb: LanceDBResource,
    coarse_model: FastEmbedResource,
) -> dg.AssetCheckResult:
    with lancedb.get_connection() as db:
        table = lancedb.chunks_table(db)
        snapshot = current(lancedb.snapshot_root)
        if snapshot is None or not snapshot.serves(table):
            return dg.AssetCheckResult(
                passed=True,
                metadata={"skipped": "the table changed since the snapshot; LanceDB serves"},
            )
        repeated = measured_before(context, snapshot.version)
        if repeated is not None:
            return repeated
        recall = sample_recall(table, coarse_model, snapshot=snapshot)
    return dg.AssetCheckResult(
        passed=recall >= RECALL_THRESHOLD,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "recall_at_10": recall,
            "table_version": snapshot.version,
            "threshold": RECALL_THRESHOLD,
        },
    )


def measured_before(
    context: dg.AssetCheckExecutionContext, version: int
) -> dg.AssetCheckResult | None:
    """This recall check's last result, given again, where it measured this same table version
    at the same threshold: the sampled rows, the index and the snapshot of one version do not
    change, so a run with nothing new does not load a query model to find the same figure."""
    key = context.check_specs[0].key
    # The last evaluation that completed (this run's own execution is recorded as planned, and a
    # run that died leaves one so too).
    history = context.instance.event_log_storage.get_asset_check_execution_history(key, limit=5)
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
) -> dg.AssetCheckResult:
    with lancedb.get_connection() as db, postgres.get_connection() as conn:
        table = lancedb.chunks_table(db)
        snapshot = current(lancedb.snapshot_root)
        found = {
            "lancedb": canary_hit_at_5(
                lambda text, user: search(
                    table, coarse_model, fine_model, text, 5, user, snapshot=snapshot
                )
            ),
            "postgres": canary_hit_at_5(
                lambda text, user: postgres_search(conn, titan_model, text, 5, user)
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
