"""The vector columns of the LanceDB chunk table, through the verbs every store implements.

A column is created (or remade, when its model changed) by a whole-column run only; shard runs
fill in parallel and refuse a column not yet made for their model. Which model made a column is
recorded in Postgres (embedding_schema_versions), as for the Titan column.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from retrieval_assets.lib.columns import (
    Backlog,
    CheckOutcome,
    ColumnNotMigrated,
    VectorColumn,
    fingerprint,
)
from retrieval_assets.lib.lancedb_store import explain_write_errors, on_latest_version
from retrieval_assets.lib.reporting import arrow_column_schema
from retrieval_assets.lib.shards import lancedb_filter
from retrieval_assets.lib.stores.checks import (
    DIMS_MATCH,
    NORM_SAMPLE,
    SHARED_CHECKS,
    null_backlog,
    unit_norms,
)
from retrieval_assets.lib.vectors import (
    column_dims,
    ensure_vector_column,
    fill_nulls,
    registered_model,
    rename_column,
    vector_norms,
)

_log = logging.getLogger(__name__)


class LanceDBColumns:
    """Vector columns of the LanceDB chunk table (resources: postgres for the model records,
    lancedb for the table)."""

    resource_keys = frozenset({"postgres", "lancedb"})
    checks = SHARED_CHECKS

    def __init__(self, postgres: Any, lancedb: Any) -> None:
        self.postgres, self.lancedb = postgres, lancedb

    def ensure(self, column: VectorColumn, embedder: Any, log: Any = _log) -> str:
        with (
            self.postgres.get_connection() as conn,
            self.lancedb.get_connection() as db,
            explain_write_errors(self.lancedb.location),
        ):
            return self._ensure(conn, db, column, embedder, log)[0]

    def _ensure(self, conn, db, column: VectorColumn, embedder: Any, log: Any) -> tuple[str, Any]:
        # Two columns can change schema at once (their assets run in parallel): a commit conflict
        # re-opens the table and decides again on its latest version.
        renamed, table = on_latest_version(
            lambda: self.lancedb.chunks_table(db),
            lambda t: rename_column(t, conn, column.formerly, column.column),
        )
        if renamed:
            log.info(f"{column.column}: renamed from {renamed}, vectors kept")
        action, table = on_latest_version(
            lambda: self.lancedb.chunks_table(db),
            lambda t: ensure_vector_column(
                t, conn, column.column, embedder.label, lambda: embedder.dims
            ),
        )
        if action != "unchanged":
            log.info(f"{column.column}: column {action} for {embedder.label}")
        return ("renamed" if renamed and action == "unchanged" else action), table

    def backlog(self, column: VectorColumn, embedder: Any) -> Backlog:
        """NULL rows of the column, per shard; stale if another model made it (or it is not
        there yet, or still under an earlier name)."""
        import pyarrow.compute as pc

        name, label = column.column, embedder.label
        with self.postgres.get_connection() as conn, self.lancedb.get_connection() as db:
            table = self.lancedb.chunks_table(db)
            registered = registered_model(conn, name)
            dims = column_dims(table, name)
            if dims is None or registered is None or registered[0] != label:
                made_by = registered[0] if registered and dims is not None else "nothing yet"
                return Backlog(
                    name, table.count_rows(), stale=f"{name} holds {made_by}, not {label}"
                )
            grouped = table.search().where(f"{name} IS NULL").select(["chunk_id"]).limit(None)
            pending = grouped.to_arrow()
        if pending.num_rows == 0:
            return Backlog(name)
        pending = pending.append_column("shard", pc.utf8_slice_codeunits(pending["chunk_id"], 0, 1))
        stats = pending.group_by("shard").aggregate(
            [("chunk_id", "count"), ("chunk_id", "min_max")]
        )
        shards = {
            s: (n, fingerprint(n, mm["min"], mm["max"]))
            for s, n, mm in zip(
                stats["shard"].to_pylist(),
                stats["chunk_id_count"].to_pylist(),
                stats["chunk_id_min_max"].to_pylist(),
                strict=True,
            )
        }
        return Backlog(name, sum(n for n, _ in shards.values()), shards)

    def fill(
        self, column: VectorColumn, embedder: Any, shard: str | None, log: Any = _log
    ) -> dict[str, Any]:
        """Fill the column's NULL rows (of one hash `shard`, or all); returns the run's figures.

        Only a whole-column run (shard None) creates, renames or remakes the column: shard runs
        proceed in parallel and must all write the same vector space, so they refuse a column
        not yet made for their model.
        """
        name = column.column
        with (
            self.postgres.get_connection() as conn,
            self.lancedb.get_connection() as db,
            explain_write_errors(self.lancedb.location),
        ):
            if shard is None:
                action, table = self._ensure(conn, db, column, embedder, log)
            else:
                action, table = "unchanged", self.lancedb.chunks_table(db)
                registered = registered_model(conn, name)
                if (
                    column_dims(table, name) is None
                    or not registered
                    or registered[0] != embedder.label
                ):
                    raise ColumnNotMigrated(
                        f"{name} is recorded for {registered and registered[0]}, not "
                        f"{embedder.label}: materialize all of its asset's shards in one run "
                        "to make the column first"
                    )
            dims = column_dims(table, name)
            columns = arrow_column_schema(table.schema, ["chunk_id", name])
            result = fill_nulls(
                table,
                name,
                embedder.embed_documents,
                where=lancedb_filter(shard),
                write_rows=self.lancedb.write_batch_rows,
                progress=log.info,
            )
        log.info(
            f"{name}: embedded {result.embedded} rows in {result.seconds:.1f}s, "
            f"{result.skipped} already had vectors, {result.remaining} still NULL"
        )
        return {
            "model": embedder.label,
            "dims": dims,
            "column": name,
            "column_action": action,
            "shard": shard or "all",
            "rows_embedded": result.embedded,
            "rows_skipped": result.skipped,
            "rows_per_second": round(result.rate, 1),
            "tokens_embedded": result.tokens,
            "tokens_per_second": round(result.tokens / result.seconds, 1)
            if result.seconds
            else 0.0,
            "seconds": round(result.seconds, 2),
            "nulls_remaining": result.remaining,
            "dagster/row_count": result.skipped + result.embedded,  # rows with a vector
            "dagster/column_schema": columns,
        }

    def check(self, column: VectorColumn, embedder: Any) -> list[CheckOutcome]:
        with self.postgres.get_connection() as conn, self.lancedb.get_connection() as db:
            # Maintenance may compact the table while this reads it: read the latest version.
            outcomes, _ = on_latest_version(
                lambda: self.lancedb.chunks_table(db),
                lambda table: self._check(table, conn, column.column),
            )
        return outcomes

    @staticmethod
    def _check(table: Any, conn: Any, name: str) -> list[CheckOutcome]:
        stored = column_dims(table, name)
        nulls = table.count_rows(f"{name} IS NULL") if stored else table.count_rows()
        registered = registered_model(conn, name)
        declared = registered[1] if registered else None
        norms = vector_norms(table, name, NORM_SAMPLE) if stored else np.ones(0)
        worst = float(np.abs(norms - 1).max()) if len(norms) else 0.0
        return [
            null_backlog(nulls),
            CheckOutcome(
                DIMS_MATCH,
                stored is None or stored == declared,
                {
                    "stored_dims": stored or 0,
                    "declared_dims": declared or 0,
                    "model": registered[0] if registered else "none",
                },
            ),
            unit_norms(len(norms), worst),
        ]
