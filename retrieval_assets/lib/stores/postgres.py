"""The Titan vector column in Postgres, through the verbs every store implements.

The column's SQL lives in lib/titan.py (writes, failures, quarantine, the HNSW index) and
lib/schema.py (its type and size, changed only by a migration). A whole-column run whose backlog
is most of the table takes the bulk path: the HNSW index is dropped while the rows are filled and
built once at the end; shard runs proceed in parallel and keep the index.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from retrieval_assets.lib.columns import Backlog, CheckOutcome, CheckSpec, VectorColumn, fingerprint
from retrieval_assets.lib.connection import one
from retrieval_assets.lib.reporting import postgres_column_schema
from retrieval_assets.lib.schema import EMBEDDING_TYPE, embedding_dims
from retrieval_assets.lib.stores.checks import (
    DIMS_MATCH,
    NORM_SAMPLE,
    SHARED_CHECKS,
    null_backlog,
    unit_norms,
)
from retrieval_assets.lib.titan import (
    PENDING_ROWS,
    backlog,
    build_hnsw,
    bulk_load,
    check_dimensions,
    drop_hnsw,
    embed_pending,
    embedded,
    ensure_titan_model,
    quarantined,
)

NO_QUARANTINE = "no_quarantined_rows"
TITAN_COLUMNS = ("chunk_id", "embedding", "embedding_model", "embedded_at")
QUARANTINE_AFTER = 3  # failed runs before a chunk is set aside (replay-quarantine retries it)
_log = logging.getLogger(__name__)


class PostgresColumns:
    """The Titan column of conversation_chunks (resources: postgres, and chunker for the token
    counts Titan's input limit is measured in)."""

    resource_keys = frozenset({"postgres", "chunker"})
    checks = (
        *SHARED_CHECKS,
        CheckSpec(
            NO_QUARANTINE,
            "No chunk is quarantined after repeated Titan failures "
            "(replay with `retrieval-assets replay-quarantine`).",
            warn=True,
        ),
    )

    def __init__(self, postgres: Any, chunker: Any) -> None:
        self.postgres, self.chunker = postgres, chunker

    @staticmethod
    def _served(column: VectorColumn) -> None:
        # One vector column lives here, and lib/titan.py's SQL names it; a second one would
        # take that SQL parameterized by column first.
        if column.column != "embedding":
            raise ValueError(f"the Postgres store holds only `embedding`, not {column.column!r}")

    def ensure(self, column: VectorColumn, embedder: Any, log: Any = _log) -> str:
        return "migrated" if self._ensure(column, embedder, log) else "unchanged"

    def _ensure(self, column: VectorColumn, embedder: Any, log: Any) -> int:
        """The column's size checked and its model recorded; returns the vectors cleared
        because another model made them."""
        self._served(column)
        with self.postgres.get_connection() as conn:
            check_dimensions(conn, embedder.dimensions)
            cleared = ensure_titan_model(conn, embedder.label, embedder.dimensions)
        if cleared:
            log.warning(
                f"{cleared} vectors from another model were cleared; "
                f"re-embedding with {embedder.label}"
            )
        return cleared

    def backlog(self, column: VectorColumn, embedder: Any) -> Backlog:
        """Rows still NULL (quarantined ones excluded), per shard; stale if another model made
        the stored vectors."""
        self._served(column)
        name = column.column
        with self.postgres.get_connection() as conn:
            stale_rows = one(
                conn,
                "SELECT count(*) FROM conversation_chunks WHERE embedding IS NOT NULL "
                "AND embedding_model IS DISTINCT FROM %s",
                [embedder.label],
            )[0]
            if stale_rows:
                total = one(conn, "SELECT count(*) FROM conversation_chunks")[0]
                return Backlog(
                    name, total, stale=f"{stale_rows} vectors were made by another model"
                )
            rows = conn.execute(
                f"SELECT left(c.chunk_id, 1), count(*), min(c.chunk_id), max(c.chunk_id) "
                f"{PENDING_ROWS} GROUP BY 1"
            ).fetchall()
        shards = {s: (n, fingerprint(n, lo, hi)) for s, n, lo, hi in rows}
        return Backlog(name, sum(n for n, _ in shards.values()), shards)

    def fill(
        self, column: VectorColumn, embedder: Any, shard: str | None, log: Any = _log
    ) -> dict[str, Any]:
        """Embed the pending rows (of one hash `shard`, or all); returns the run's figures."""
        started = time.monotonic()
        source = "local Bedrock endpoint" if embedder.is_local else "Amazon Bedrock"
        cleared = self._ensure(column, embedder, log)
        with self.postgres.get_connection() as conn:
            conn.autocommit = True  # each batch commits on its own (see embed_pending)
            bulk = shard is None and bulk_load(conn, backlog(conn))
            if bulk:
                log.info(
                    "bulk load: the HNSW index is dropped while the rows are filled and "
                    "built once at the end (Postgres searches scan exactly meanwhile)"
                )
                drop_hnsw(conn)
            build_seconds = 0.0
            try:
                stats = embed_pending(
                    conn,
                    embedder,
                    batch_size=self.postgres.write_batch_rows,
                    count_tokens=self.chunker.chunker.count_tokens,
                    quarantine_after=QUARANTINE_AFTER,
                    progress=log.info,
                    shard=shard,
                )
            finally:
                if bulk:  # whatever happened, searches get their index back
                    build_started = time.monotonic()
                    build_hnsw(conn)
                    build_seconds = time.monotonic() - build_started
                    log.info(f"HNSW index rebuilt in {build_seconds:.1f}s")
            remaining, in_quarantine = backlog(conn, shard), quarantined(conn)
            stored = embedded(conn, shard)
            columns = postgres_column_schema(conn, "conversation_chunks", TITAN_COLUMNS)
        seconds = time.monotonic() - started
        log.info(
            f"{stats.embedded} chunks embedded by {source} in {seconds:.1f}s; "
            f"{stats.failed} failed, {in_quarantine} quarantined, {remaining} pending"
        )
        return {
            "model": embedder.label,
            "vector_source": source,
            "dims": embedder.dimensions,
            "stored_as": f"{EMBEDDING_TYPE}({embedder.dimensions})",
            "shard": shard or "all",
            "rows_embedded": stats.embedded,
            "rows_failed": stats.failed,
            "rows_truncated": stats.truncated,
            "invoke_attempts": stats.attempts,
            "retries": max(stats.attempts - stats.embedded - stats.failed, 0),
            "newly_quarantined": stats.newly_quarantined,
            "quarantined": in_quarantine,
            "cleared_other_model": cleared,
            "rows_per_second": round(stats.embedded / seconds, 1) if seconds else 0.0,
            "tokens_embedded": stats.tokens,
            "tokens_per_second": round(stats.tokens / seconds, 1) if seconds else 0.0,
            "nulls_remaining": remaining,
            "dagster/row_count": stored,  # rows with a vector (in the shard)
            "dagster/column_schema": columns,
            "bulk_load": bulk,
            "hnsw_build_seconds": round(build_seconds, 1),
            **{f"local_endpoint_{k}": v for k, v in embedder.endpoint_counts().items()},
        }

    def check(self, column: VectorColumn, embedder: Any) -> list[CheckOutcome]:
        self._served(column)
        with self.postgres.get_connection() as conn:
            pending, in_quarantine, stored = backlog(conn), quarantined(conn), embedding_dims(conn)
            lo, hi, sampled = one(
                conn,
                "SELECT coalesce(min(n), 1), coalesce(max(n), 1), count(*) FROM (SELECT "
                "l2_norm(embedding) AS n FROM conversation_chunks WHERE embedding IS NOT NULL "
                "LIMIT %s) s",
                [NORM_SAMPLE],
            )
        return [
            null_backlog(pending),
            CheckOutcome(
                DIMS_MATCH,
                stored == embedder.dimensions,
                {"stored_dims": stored, "declared_dims": embedder.dimensions},
            ),
            unit_norms(sampled, float(max(abs(lo - 1), abs(hi - 1)))),
            CheckOutcome(NO_QUARANTINE, in_quarantine == 0, {"quarantined": in_quarantine}),
        ]
