"""Store-level checks of the LanceDB vector columns: backlog, dimensions, norms."""

from collections.abc import Iterator

import dagster as dg
import numpy as np

from retrieval_assets.defs.local_embeddings.assets import FASTEMBED_VECTORS, ST_VECTORS
from retrieval_assets.lib.lancedb_store import LanceDBResource, on_latest_version
from retrieval_assets.lib.postgres import PostgresResource
from retrieval_assets.lib.vectors import (
    FASTEMBED_COLUMN,
    ST_COLUMN,
    column_dims,
    registered_model,
    vector_norms,
)

NULL_BACKLOG = "null_backlog"
DIMS_MATCH = "dims_match_declared"
UNIT_NORMS = "unit_norms"
NULL_BACKLOG_WARN_ROWS = 1_000  # past this, the backfill sensor is off or failing
NORM_TOLERANCE = 1e-3
NORM_SAMPLE = 1_000
COLUMNS = {FASTEMBED_VECTORS: FASTEMBED_COLUMN, ST_VECTORS: ST_COLUMN}


@dg.multi_asset_check(
    specs=[
        spec
        for key in COLUMNS
        for spec in (
            dg.AssetCheckSpec(
                NULL_BACKLOG,
                asset=key,
                description=f"Fewer than {NULL_BACKLOG_WARN_ROWS} chunks wait for a vector.",
            ),
            dg.AssetCheckSpec(
                DIMS_MATCH,
                asset=key,
                description="The column's stored size equals the dims recorded for its model "
                "in embedding_schema_versions.",
            ),
            dg.AssetCheckSpec(
                UNIT_NORMS,
                asset=key,
                description=f"A sample of {NORM_SAMPLE} vectors has L2 norm 1 "
                f"(± {NORM_TOLERANCE}).",
            ),
        )
    ],
    # Materializing one vector asset runs its checks only (the UI and CLI select them with it).
    can_subset=True,
)
def local_vector_checks(
    context: dg.AssetCheckExecutionContext, postgres: PostgresResource, lancedb: LanceDBResource
) -> Iterator[dg.AssetCheckResult]:
    selected = context.selected_asset_check_keys
    columns = {k: c for k, c in COLUMNS.items() if any(s.asset_key == k for s in selected)}
    with postgres.get_connection() as conn, lancedb.get_connection() as db:
        # Maintenance may compact the table while these read it: read the latest version.
        results, _ = on_latest_version(
            lambda: lancedb.chunks_table(db),
            lambda table: list(_column_checks(table, conn, columns)),
        )
    yield from only_selected(context, results)


def only_selected(
    context: dg.AssetCheckExecutionContext, results: list[dg.AssetCheckResult]
) -> Iterator[dg.AssetCheckResult]:
    """The results of the checks this run selected (a subsettable multi-check yields no other)."""
    selected = context.selected_asset_check_keys
    return (
        r
        for r in results
        if r.asset_key and r.check_name and dg.AssetCheckKey(r.asset_key, r.check_name) in selected
    )


def _column_checks(table, conn, columns: dict[dg.AssetKey, str]) -> Iterator[dg.AssetCheckResult]:
    for key, column in columns.items():
        stored = column_dims(table, column)
        nulls = table.count_rows(f"{column} IS NULL") if stored else table.count_rows()
        yield null_backlog_result(key, nulls)
        registered = registered_model(conn, column)
        declared = registered[1] if registered else None
        yield dg.AssetCheckResult(
            asset_key=key,
            check_name=DIMS_MATCH,
            passed=stored is None or stored == declared,
            metadata={
                "stored_dims": stored or 0,
                "declared_dims": declared or 0,
                "model": registered[0] if registered else "none",
            },
        )
        norms = vector_norms(table, column, NORM_SAMPLE) if stored else np.ones(0)
        worst = float(np.abs(norms - 1).max()) if len(norms) else 0.0
        yield unit_norms_result(key, len(norms), worst)


def null_backlog_result(key: dg.AssetKey, nulls: int) -> dg.AssetCheckResult:
    """The NULL-backlog check of a vector column (both stores): WARN past the threshold."""
    return dg.AssetCheckResult(
        asset_key=key,
        check_name=NULL_BACKLOG,
        passed=nulls < NULL_BACKLOG_WARN_ROWS,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"null_rows": nulls, "warn_at": NULL_BACKLOG_WARN_ROWS},
    )


def unit_norms_result(key: dg.AssetKey, sampled: int, worst: float) -> dg.AssetCheckResult:
    """The unit-norm check of a vector column (both stores), from the worst sampled deviation."""
    return dg.AssetCheckResult(
        asset_key=key,
        check_name=UNIT_NORMS,
        passed=worst <= NORM_TOLERANCE,
        metadata={"sampled": sampled, "max_norm_deviation": worst},
    )
