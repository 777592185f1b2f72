"""The LanceDB resource and the chunk table it holds.

LanceDB's `conversation_chunks` mirrors the Postgres chunk rows (without the Titan vector) and adds
the local vector columns. Postgres is the source of truth for which chunks exist; `mirror_chunks`
makes LanceDB agree by chunk id, so a crashed or partial write heals on the next run.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import dagster as dg
from pydantic import Field

from retrieval_assets.lib.memory import tune_malloc
from retrieval_assets.lib.paths import DEFAULT_DATA_DIR

if TYPE_CHECKING:
    import lancedb
    import pyarrow as pa

T = TypeVar("T")
CHUNKS_TABLE = "conversation_chunks"
# Chunk ids are our own hex digests; anything else must never reach a filter string.
_CHUNK_ID = re.compile(r"^[0-9a-f]{32}$")
_DELETE_BATCH = 2_000


def chunk_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("chunk_id", pa.string(), nullable=False),
            pa.field("user_id", pa.string(), nullable=False),
            pa.field("conversation_id", pa.string(), nullable=False),
            pa.field("tier", pa.string(), nullable=False),
            pa.field("chunk_index", pa.int32(), nullable=False),
            pa.field("turn_start", pa.int32(), nullable=False),
            pa.field("turn_end", pa.int32(), nullable=False),
            pa.field("roles", pa.list_(pa.string()), nullable=False),
            pa.field("content", pa.string(), nullable=False),
            pa.field("content_hash", pa.string(), nullable=False),
            pa.field("token_count", pa.int32(), nullable=False),
            pa.field("created_at", pa.timestamp("us", tz="UTC")),
        ]
    )


CHUNK_COLUMNS = tuple(chunk_schema().names)


class LanceDBResource(dg.ConfigurableResource):
    """LanceDB: chunks with FastEmbed (coarse) and sentence-transformers (fine) vectors."""

    uri: str = Field(
        default="",
        description="LanceDB URI: a local directory, or object storage such as s3://bucket/path. "
        "Empty: data_dir/lancedb.",
    )
    data_dir: str = Field(
        default=str(DEFAULT_DATA_DIR),
        description="The project's data directory (used without uri).",
    )
    write_batch_rows: int = Field(
        default=4_096,
        description="Rows embedded and committed per merge when filling a vector column: a crash "
        "loses at most this many rows of work; smaller means more table versions.",
    )
    keep_versions_minutes: int = Field(
        default=60,
        description="Table versions older than this are removed by the maintenance step (after "
        "compaction); readers pinned to an older version within it keep working.",
    )
    storage_options: str = Field(
        default="",
        description="Object-store options for lancedb.connect, a JSON object of strings (region, "
        "endpoint, keys; README: Running on a cluster). Empty: the store's own environment "
        "(AWS_* variables, an instance role).",
    )

    @contextmanager
    def get_connection(self) -> Iterator[lancedb.DBConnection]:
        import json

        import lancedb

        tune_malloc()  # before LanceDB's threads start
        options = json.loads(self.storage_options) if self.storage_options else None
        yield lancedb.connect(self.location, storage_options=options)

    @property
    def location(self) -> str:
        """The URI in use: `uri`, or data_dir/lancedb."""
        return self.uri or str(Path(self.data_dir) / "lancedb")

    @property
    def snapshot_root(self) -> Path:
        """Where search snapshots of the chunk table are kept, on the machine that builds them and
        searches with them: beside the tables of a local LanceDB directory; for object storage,
        under the data directory, per URI."""
        if "://" not in self.location:
            return Path(self.location) / "_search_snapshot"
        digest = hashlib.sha256(self.location.encode()).hexdigest()[:12]
        return Path(self.data_dir) / "search_snapshot" / digest

    def chunks_table(self, db: lancedb.DBConnection) -> lancedb.table.Table:
        """The chunk table, created empty on first use (later it also holds vector columns)."""
        table = self.existing_chunks_table(db)
        if table is None:  # not `or`: a table's truth is its row count, a scan
            table = db.create_table(CHUNKS_TABLE, schema=chunk_schema(), exist_ok=True)
        return table

    def existing_chunks_table(self, db: lancedb.DBConnection) -> lancedb.table.Table | None:
        """The chunk table, or None before the graph has written it (readers create nothing)."""
        if CHUNKS_TABLE in db.list_tables().tables:
            return db.open_table(CHUNKS_TABLE)
        return None


# A per-row version for optimistic concurrency: every write that rewrites whole rows bumps it, and
# applies only where it is unchanged since the rows were read. NULL (rows inserted by the chunk
# step, or before the column existed) counts as 0.
ROW_VERSION = "row_version"


def ensure_row_version(table: Any) -> None:
    """Add the row-version column to a table that predates it (all NULL: no rewrite).

    Both vector fills start together on a fresh table: another writer's commit (its vector
    column, this column, a merge) may land first. on_latest_version then looks again on the
    latest version of `table` and adds the column there if it is still missing.
    """
    import pyarrow as pa

    def add_if_missing(latest: Any) -> None:
        if ROW_VERSION in latest.schema.names:
            return
        try:
            latest.add_columns(pa.field(ROW_VERSION, pa.int64()))
        except ValueError:  # another process added it between the look and the commit
            latest.checkout_latest()
            if ROW_VERSION not in latest.schema.names:
                raise

    def latest() -> Any:
        table.checkout_latest()
        return table

    on_latest_version(latest, add_if_missing)


def next_row_versions(rows: pa.Table) -> pa.Array:
    """The versions whole-row writes of `rows` (as read) carry."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.add(pc.coalesce(rows.column(ROW_VERSION), 0), 1).cast(pa.int64())


# The merge condition for rows carrying next_row_versions(): nobody wrote them in between.
# (Lance's merge condition does not resolve `target.` columns inside function calls.)
ROWS_UNCHANGED = (
    f"(target.{ROW_VERSION} IS NULL AND source.{ROW_VERSION} = 1) "
    f"OR target.{ROW_VERSION} + 1 = source.{ROW_VERSION}"
)


def bump_row_versions(table: Any) -> None:
    """Mark every row changed: whole-row writes prepared from earlier reads no longer apply."""
    table.update(values_sql={ROW_VERSION: f"coalesce({ROW_VERSION}, 0) + 1"})


def table_ids(table: Any, column: str = "chunk_id") -> set[str]:
    ids = table.search().select([column]).limit(None).to_arrow().column(column)
    return set(ids.to_pylist())


def rows_to_arrow(rows: Iterable[tuple]) -> pa.Table:
    """Postgres rows in CHUNK_COLUMNS order → an Arrow table of the chunk schema."""
    import pyarrow as pa

    columns: list = list(zip(*rows, strict=True)) or [[] for _ in CHUNK_COLUMNS]
    schema = chunk_schema()
    return pa.table(
        [pa.array(list(c), type=f.type) for c, f in zip(columns, schema, strict=True)],
        schema=schema,
    )


def insert_missing(table: Any, batch: pa.Table) -> None:
    """Insert rows whose chunk_id is not in the table yet; existing rows (and vectors) stay.

    The batch is widened to the table's whole schema first, with NULL in the columns it lacks (the
    vector columns, the row version): LanceDB joins a merge that carries only some columns by
    holding every row of the table in memory (lance-format/lance#7630); inserting 1,000 chunks
    into a 100,000-row table so peaked at 821 MB. LanceDB calls a NULL vector "bad", hence
    on_bad_vectors="null".
    """
    import pyarrow as pa

    if not batch.num_rows:
        return
    schema = table.schema
    whole = pa.table(
        [
            batch.column(f.name) if f.name in batch.schema.names else pa.nulls(len(batch), f.type)
            for f in schema
        ],
        schema=schema,
    )
    table.merge_insert("chunk_id").when_not_matched_insert_all().execute(
        whole, on_bad_vectors="null"
    )


def quote_ids(ids: Iterable[str]) -> str:
    """A SQL list of chunk ids for a LanceDB filter; anything but our hex ids is refused."""
    ids = list(ids)
    for chunk_id in ids:
        if not isinstance(chunk_id, str) or not _CHUNK_ID.match(chunk_id):
            raise ValueError(f"refusing to filter by malformed chunk id {chunk_id!r}")
    return ", ".join(f"'{c}'" for c in ids)


def quote_literal(value: str) -> str:
    """A string literal for a LanceDB (DataFusion SQL) filter: quotes doubled, so it is data."""
    return "'" + value.replace("'", "''") + "'"


def delete_ids(table: Any, ids: Iterable[str]) -> int:
    """Delete rows by chunk id, in batches; returns how many ids were asked for."""
    pending = sorted(ids)
    for i in range(0, len(pending), _DELETE_BATCH):
        table.delete(f"chunk_id IN ({quote_ids(pending[i : i + _DELETE_BATCH])})")
    return len(pending)


# What another process can do to the version a table handle holds: commit first (a retryable
# conflict), or compact and clean up, so that files of the old version are gone ("Not found").
def _stale_table(reason: str) -> bool:
    return "commit conflict" in reason or ("lance" in reason and "not found" in reason)


def on_latest_version(
    open_table: Callable[[], Any], work: Callable[[Any], T], attempts: int = 8
) -> tuple[T, Any]:
    """Do `work` on a freshly opened table; if another process moved the table on underneath it
    (a writer committed first, or maintenance removed the version being read), re-open the table
    at its latest version and do it again. Returns the result and the table it was done on."""
    for attempt in range(attempts):
        table = open_table()
        try:
            return work(table), table
        except (RuntimeError, OSError) as exc:
            reason = str(exc).lower()
            if not _stale_table(reason) or attempt == attempts - 1:
                raise
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")


class LanceDBNotWritable(RuntimeError):
    """The LanceDB location refused a write (read-only disk, permissions, full disk)."""


_UNWRITABLE = (
    "read-only file system",
    "os error 30",
    "permission denied",
    "os error 13",
    "no space left",
    "os error 28",
)


@contextmanager
def explain_write_errors(location: str) -> Iterator[None]:
    """Turn the store's low-level refusal to write into one error that names the location.

    Lance commits a batch atomically (a new manifest is written last), so a refused write leaves
    the table at its previous version: the batch in flight is simply not there.
    """
    try:
        yield
    except (OSError, RuntimeError) as exc:
        reason = str(exc).lower()
        if not any(marker in reason for marker in _UNWRITABLE):
            raise
        raise LanceDBNotWritable(
            f"LanceDB at {location} refused a write ({str(exc).splitlines()[0][:300]}); the batch "
            "in flight was not committed and the table stays at its last version. Make the "
            "location writable and re-run: the rows still NULL are picked up."
        ) from exc


def table_health(table: Any) -> dict[str, int]:
    """Versions kept and the shape of the data files (what compaction and cleanup change)."""
    stats = table.stats()
    return {
        "versions": len(table.list_versions()),
        "fragments": int(stats["fragment_stats"]["num_fragments"]),
        "small_fragments": int(stats["fragment_stats"]["num_small_fragments"]),
        "bytes": int(stats["total_bytes"]),
    }


def maintain(table: Any, keep_versions_minutes: int) -> dict[str, int | float]:
    """Compact small files, fold new rows into the indices, and remove old versions.

    Each incremental batch is a commit (a version and a small file); without this, versions and
    files pile up and scans slow down. Versions younger than `keep_versions_minutes` survive,
    and files of commits still in flight are never touched (delete_unverified=False).
    """
    from datetime import timedelta

    started = time.monotonic()
    before = table_health(table)
    table.optimize(cleanup_older_than=timedelta(minutes=keep_versions_minutes))
    after = table_health(table)
    return {
        **{f"{k}_before": v for k, v in before.items()},
        **{f"{k}_after": v for k, v in after.items()},
        "seconds": round(time.monotonic() - started, 2),
    }
