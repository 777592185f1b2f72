"""Vector columns in the LanceDB chunk table: creation, model changes, filling NULLs, the index.

A column holds one vector space. `embedding_schema_versions` (Postgres) records which model made
it; when the configured model or its dimensions differ, the column is dropped and re-added empty
(LanceDB first, then the record, so a crash in between only repeats the harmless drop) and the
embedding assets refill it. Rows are never mixed across models.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg

from retrieval_assets.lib.columns import COARSE
from retrieval_assets.lib.lancedb_store import (
    CHUNKS_TABLE,
    ROW_VERSION,
    ROWS_UNCHANGED,
    bump_row_versions,
    ensure_row_version,
    next_row_versions,
    quote_ids,
)
from retrieval_assets.lib.memory import release_freed_memory

_log = logging.getLogger(__name__)


def vector_field(column: str, dims: int):
    import pyarrow as pa

    return pa.field(column, pa.list_(pa.float32(), dims), nullable=True)


def column_dims(table: Any, column: str) -> int | None:
    if column not in table.schema.names:
        return None
    return table.schema.field(column).type.list_size


def registered_model(conn: psycopg.Connection, column: str) -> tuple[str, int | None] | None:
    return conn.execute(
        "SELECT model, dims FROM embedding_schema_versions WHERE store = 'lancedb' "
        "AND table_name = %s AND column_name = %s AND retired_at IS NULL",
        [CHUNKS_TABLE, column],
    ).fetchone()


def ensure_vector_column(
    table: Any, conn: psycopg.Connection, column: str, label: str, dims: int | Callable[[], int]
) -> str:
    """Make `column` hold `label`'s vectors; returns created | migrated | unchanged.

    `dims` may be a callable (loading the model): it is only called when the column is absent,
    unrecorded or recorded for another model, so a steady-state run loads no model.
    """
    registered = registered_model(conn, column)
    present = column_dims(table, column)
    known = callable(dims) or dims == present  # a lazy size is trusted to the record
    if present is not None and registered == (label, present) and known:
        return "unchanged"
    dims = dims() if callable(dims) else dims
    if present == dims and registered is not None and registered[0] == label:
        _record(conn, column, label, dims, retire=False)  # a seeded row learns its dims
        return "unchanged"
    action = "created" if present is None else "migrated"
    if present is not None:
        _log.warning(
            "%s: model %s (%s dims) replaced by %s (%d dims); the column is cleared "
            "and re-embedded",
            column,
            registered and registered[0],
            present,
            label,
            dims,
        )
        ensure_row_version(table)
        table.drop_columns([column])
        # Between the drop and the add: whole rows read before the drop (holding the old model's
        # vectors) then no longer apply, and rows read after it lack the column altogether.
        bump_row_versions(table)
    table.add_columns(vector_field(column, dims))
    same_seed = registered is not None and registered[0] == label and registered[1] is None
    _record(conn, column, label, dims, retire=not same_seed)
    return action


def rename_column(
    table: Any, conn: psycopg.Connection, formerly: tuple[str, ...], name: str
) -> str | None:
    """A column still under an earlier name (and absent under `name`) is renamed in place, its
    vectors kept, and its model records with it; returns the earlier name, or None."""
    names = table.schema.names
    old = next((n for n in formerly if n in names), None)
    if name in names or old is None:
        return None
    table.alter_columns({"path": old, "rename": name})
    with conn.transaction():  # already done by revision 0008 for the columns it knew
        conn.execute(
            "UPDATE embedding_schema_versions SET column_name = %s WHERE store = 'lancedb' "
            "AND table_name = %s AND column_name = %s",
            [name, CHUNKS_TABLE, old],
        )
    return old


def _record(conn: psycopg.Connection, column: str, label: str, dims: int, retire: bool) -> None:
    with conn.transaction():
        if retire:
            conn.execute(
                "UPDATE embedding_schema_versions SET retired_at = now() WHERE store = 'lancedb' "
                "AND table_name = %s AND column_name = %s AND retired_at IS NULL",
                [CHUNKS_TABLE, column],
            )
            conn.execute(
                "INSERT INTO embedding_schema_versions (store, table_name, column_name, model, "
                "dims) VALUES ('lancedb', %s, %s, %s, %s)",
                [CHUNKS_TABLE, column, label, dims],
            )
        else:
            conn.execute(
                "UPDATE embedding_schema_versions SET dims = %s WHERE store = 'lancedb' "
                "AND table_name = %s AND column_name = %s AND retired_at IS NULL",
                [dims, CHUNKS_TABLE, column],
            )


def count_nulls(table: Any, column: str) -> int:
    return table.count_rows(f"{column} IS NULL")


@dataclass
class FillResult:
    embedded: int = 0
    tokens: int = 0  # in the chunker's tokenizer, of the rows embedded
    skipped: int = 0
    seconds: float = 0.0
    batches: int = 0
    remaining: int = 0

    @property
    def rate(self) -> float:
        return self.embedded / self.seconds if self.seconds else 0.0


def fill_nulls(
    table: Any,
    column: str,
    embed: Callable[[list[str], list[int]], np.ndarray],
    *,
    where: str | None = None,
    write_rows: int = 4_096,
    max_passes: int = 10,
    progress: Callable[[str], None] = _log.info,
) -> FillResult:
    """Embed every row whose `column` is NULL (within `where`), in bounded batches.

    A pass reads the ids of the NULL rows (ids and token counts only), orders them by length so
    each model batch pads little, and writes each batch back with one merge by chunk id: a crash
    loses at most the batch in flight, and the next run picks up exactly the rows still NULL.
    Batches are addressed by id, never by position in the shrinking NULL set. When a pass ends,
    another one picks up rows inserted meanwhile, until a pass finds nothing (or `max_passes`).

    Each merge carries whole rows: LanceDB joins a merge that carries only some columns by
    holding every row of the table in memory (lance-format/lance#7630), so memory would grow with
    the table. Whole rows must not undo what another writer did meanwhile (the run filling the
    other vector column may be working beside this one), so each merge bumps the rows' version
    and applies only to rows whose version is unchanged since they were read; a row skipped so
    stays NULL for the next pass.
    """
    import pyarrow as pa

    started = time.monotonic()
    scope = f"{column} IS NULL" + (f" AND ({where})" if where else "")
    result = FillResult(skipped=table.count_rows(where) - table.count_rows(scope))
    for _ in range(max_passes):
        pending = (
            table.search().where(scope).select(["chunk_id", "token_count"]).limit(None).to_arrow()
        )
        if pending.num_rows == 0:
            break
        order = np.argsort(pending.column("token_count").to_numpy(), kind="stable")
        ids = pending.column("chunk_id").to_numpy(zero_copy_only=False)[order]
        ensure_row_version(table)
        schema = table.schema
        field = schema.field(column)
        for start in range(0, len(ids), write_rows):
            batch = ids[start : start + write_rows]
            # Filtered by id only, then for NULL here: the scan then filters on the id column
            # alone and reads the vector columns only for the rows it returns.
            rows = (
                table.search()
                .where(f"chunk_id IN ({quote_ids(batch)})")
                .select(schema.names)
                .limit(None)
                .to_arrow()
            )
            rows = rows.filter(rows.column(column).is_null())
            if rows.num_rows == 0:  # deleted, or filled by another run, since the scan
                continue
            vectors = embed(
                rows.column("content").to_pylist(), rows.column("token_count").to_pylist()
            )
            bad = ~np.isfinite(vectors).all(axis=1)
            if bad.any():
                raise ValueError(
                    f"{column}: the model returned non-finite vectors for chunk(s) "
                    f"{rows.column('chunk_id').filter(pa.array(bad)).to_pylist()[:5]}; "
                    "nothing of this batch was written"
                )
            update = rows.set_column(
                rows.schema.get_field_index(column),
                field,
                pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]).cast(
                    field.type
                ),
            )
            update = update.set_column(
                update.schema.get_field_index(ROW_VERSION),
                schema.field(ROW_VERSION),
                next_row_versions(rows),
            )
            merged = (
                table.merge_insert("chunk_id")
                .when_matched_update_all(where=ROWS_UNCHANGED)
                # LanceDB calls a NULL vector "bad"; the other vector columns may hold NULLs.
                .execute(update, on_bad_vectors="null")
            )
            result.embedded += merged.num_updated_rows
            result.tokens += sum(rows.column("token_count").to_pylist())  # the model's work
            result.batches += 1
            read = rows.num_rows
            del rows, update, vectors
            release_freed_memory()
            elapsed = time.monotonic() - started
            progress(
                f"{column}: batch {result.batches}, {result.embedded} rows embedded "
                f"({result.embedded / elapsed:.0f} rows/s), {len(ids) - start - read} "
                "left in this pass"
            )
    result.seconds = time.monotonic() - started
    result.remaining = table.count_rows(scope)
    return result


# ----------------------------------------------------------------------------- the coarse index

INDEX_MIN_ROWS = 10_000  # below this an exact scan is fast enough and needs no upkeep
REBUILD_UNINDEXED_FRACTION = 0.2
USER_INDEX = "user_id_idx"
VECTORS_PER_PARTITION = 1_000_000


@dataclass
class IndexResult:
    action: str  # none | built | rebuilt | refreshed | unchanged
    indexed_rows: int
    unindexed_rows: int
    seconds: float


def index_name(column: str) -> str:
    return f"{column}_idx"


def ensure_coarse_index(
    table: Any, column: str = COARSE.column, *, min_rows: int = INDEX_MIN_ROWS
) -> IndexResult:
    """Keep the ANN index over `column` in step with the table.

    Policy: below `min_rows` vectors, no index (searches scan exactly). Otherwise build an
    IVF_HNSW_SQ index (cosine, one partition per million vectors) when there is none or its
    dimensions no longer match; rebuild it when more than 20% of the vectors arrived after it was
    trained (its partitions no longer describe the data); else fold new rows into it with
    `optimize()`. Rows not yet indexed are
    still searched (by a flat scan of the unindexed part), so results stay complete.
    """
    from datetime import timedelta

    from lancedb.index import BTree, IvfHnswSq

    started = time.monotonic()
    vectors = table.count_rows(f"{column} IS NOT NULL")
    name = index_name(column)
    existing = {i.name: i for i in table.list_indices()}
    if vectors < min_rows:
        if name in existing:
            table.drop_index(name)
        return IndexResult("none", 0, vectors, time.monotonic() - started)
    stats = table.index_stats(name) if name in existing else None
    stale = stats is not None and (
        column not in existing[name].columns
        or stats.num_unindexed_rows > REBUILD_UNINDEXED_FRACTION * max(stats.num_indexed_rows, 1)
    )
    if stats is None or stale:
        # One IVF partition per million vectors: a single HNSW graph answered top-100 over 250,000
        # rows in 6 ms at recall 0.99, where ~125 partitions probed 40 at a time took 21 ms.
        partitions = max(1, round(vectors / VECTORS_PER_PARTITION))
        table.create_index(
            column,
            config=IvfHnswSq(distance_type="cosine", num_partitions=partitions),
            replace=True,
            name=name,
            wait_timeout=timedelta(minutes=30),
        )
        action = "rebuilt" if stats is not None else "built"
    elif stats.num_unindexed_rows:
        table.optimize(cleanup_older_than=None)
        action = "refreshed"
    else:
        action = "unchanged"
    if USER_INDEX not in {i.name for i in table.list_indices()}:
        # Per-user searches prefilter on user_id; a B-tree finds a user's rows without a scan.
        table.create_index("user_id", config=BTree(), name=USER_INDEX)
    stats = table.index_stats(name)
    return IndexResult(
        action, stats.num_indexed_rows, stats.num_unindexed_rows, time.monotonic() - started
    )


def vector_norms(table: Any, column: str, sample: int) -> np.ndarray:
    """L2 norms of up to `sample` stored vectors of `column`."""
    rows = table.search().where(f"{column} IS NOT NULL").select([column]).limit(sample).to_arrow()
    if rows.num_rows == 0:
        return np.ones(0, dtype=np.float32)
    flat = rows.column(column).combine_chunks().flatten().to_numpy()
    return np.linalg.norm(flat.reshape(rows.num_rows, -1), axis=1)
