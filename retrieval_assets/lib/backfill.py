"""Backlogs of the vector columns, and the hash shards that a backfill fans out over.

A backlog is the set of rows whose vector is NULL (and, in Postgres, not quarantined). It is
described per shard — the first hex digit of the content-derived chunk id, so 16 shards of
near-equal size whatever the number of users — by a count and a fingerprint of its ids. The
fingerprint names one backlog: a sensor that ticks again over the same NULL rows derives the same
run key and launches nothing new. A column whose recorded model is not the configured one is
stale as a whole: it is migrated by its asset, never shard by shard.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import psycopg

from retrieval_assets.lib.connection import one
from retrieval_assets.lib.titan import PENDING_ROWS
from retrieval_assets.lib.vectors import column_dims, registered_model


def fingerprint(count: int, first: str, last: str) -> str:
    return hashlib.sha256(f"{count}:{first}:{last}".encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Backlog:
    column: str
    rows: int = 0
    shards: dict[str, tuple[int, str]] = field(default_factory=dict)  # shard -> (rows, print)
    stale: str | None = None  # why the whole column must be remade by its asset

    @property
    def empty(self) -> bool:
        return self.rows == 0 and self.stale is None


def lancedb_backlog(table: Any, conn: psycopg.Connection, column: str, label: str) -> Backlog:
    """NULL rows of a LanceDB vector column, per shard; stale if another model made it."""
    import pyarrow.compute as pc

    registered = registered_model(conn, column)
    dims = column_dims(table, column)
    if dims is None or registered is None or registered[0] != label:
        made_by = registered[0] if registered and dims is not None else "nothing yet"
        return Backlog(column, table.count_rows(), stale=f"{column} holds {made_by}, not {label}")
    grouped = table.search().where(f"{column} IS NULL").select(["chunk_id"]).limit(None).to_arrow()
    if grouped.num_rows == 0:
        return Backlog(column)
    grouped = grouped.append_column("shard", pc.utf8_slice_codeunits(grouped["chunk_id"], 0, 1))
    stats = grouped.group_by("shard").aggregate([("chunk_id", "count"), ("chunk_id", "min_max")])
    shards = {
        s: (n, fingerprint(n, mm["min"], mm["max"]))
        for s, n, mm in zip(
            stats["shard"].to_pylist(),
            stats["chunk_id_count"].to_pylist(),
            stats["chunk_id_min_max"].to_pylist(),
            strict=True,
        )
    }
    return Backlog(column, sum(n for n, _ in shards.values()), shards)


def postgres_backlog(conn: psycopg.Connection, label: str) -> Backlog:
    """Titan rows still NULL (quarantined ones excluded), per shard; stale if another model
    made the stored vectors."""
    column = "embedding"
    stale_rows = one(
        conn,
        "SELECT count(*) FROM conversation_chunks WHERE embedding IS NOT NULL "
        "AND embedding_model IS DISTINCT FROM %s",
        [label],
    )[0]
    if stale_rows:
        total = one(conn, "SELECT count(*) FROM conversation_chunks")[0]
        return Backlog(column, total, stale=f"{stale_rows} vectors were made by another model")
    rows = conn.execute(
        f"SELECT left(c.chunk_id, 1), count(*), min(c.chunk_id), max(c.chunk_id) {PENDING_ROWS} "
        "GROUP BY 1"
    ).fetchall()
    shards = {s: (n, fingerprint(n, lo, hi)) for s, n, lo, hi in rows}
    return Backlog(column, sum(n for n, _ in shards.values()), shards)
