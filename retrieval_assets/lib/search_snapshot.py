"""The search snapshot: one LanceDB table version's coarse vectors in an in-process HNSW (usearch),
with the fine vectors and the result columns beside them — a covering index that answers an
unfiltered two-stage search without a LanceDB query.

Why: every LanceDB query costs 4-6 ms at 250,000 rows whatever it asks, most of it outside the ANN
(planning, then reading 100 rows from the data files), and taking even 10 rows by id costs 5-6 ms.
From a memory-mapped HNSW the top 100 come in about 1 ms; their fine vectors and rows are array
lookups in memory-mapped files (numpy, Arrow IPC).

Per-user searches (the product's real query) are answered from it too: the rows are grouped by
user (a permutation and each user's range in it), and a user's coarse vectors are scored exactly —
a few hundred rows per user is one small matrix product, where LanceDB pays its per-query cost
and a filtered scan.

A snapshot describes exactly one version of one table. A search uses it only while the table it
holds is at that version (any write — a fill, a backfill, compaction — makes a new one); otherwise
LanceDB's own index answers, with the same results. Snapshots are written to a new
directory and published by replacing one pointer file, so readers never see half of one; the
previous snapshot is removed once replaced (a reader holding it keeps its open file mappings).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from filelock import FileLock

from retrieval_assets.lib.columns import COARSE, FINE
from retrieval_assets.lib.paths import write_text_atomically
from retrieval_assets.lib.vectors import column_dims

CURRENT = "CURRENT"
# HNSW parameters, measured at 250,000 rows of real sentences (tests/benchmarks): f16 vectors
# with 16 links per node and search breadth 160 give recall@100 0.97-0.98 in about 1 ms.
CONNECTIVITY = 16
EXPANSION_ADD = 128
EXPANSION_SEARCH = 160
READ_BATCH_ROWS = 16_384
# Removed graph entries (tombstones) beyond this fraction of the rows trigger a rebuild.
REBUILD_FRACTION = 0.2
INDEX_FILE = "coarse.usearch"
BUILD_LOCK = ".build.lock"


@dataclass(frozen=True)
class BuildResult:
    version: int
    rows: int
    seconds: float
    path: Path
    action: str  # built (from nothing), updated (from the previous graph), rebuilt (tombstones)
    inserted: int  # coarse vectors inserted into the graph (new or changed chunks)


class SearchSnapshot:
    """A published snapshot, memory-mapped: `top(vector, k)` gives positions and cosine scores,
    `user_top(user, vector, k)` the same among one user's rows (exact); `rows_at(positions,
    columns)` those rows' result columns; `fine` (f16 fine vectors) and `has_fine` are arrays
    indexed by position; `rows` counts them."""

    def __init__(self, path: Path) -> None:
        from usearch.index import Index

        self.path = path
        meta = json.loads((path / "meta.json").read_text())
        self.table_uri: str = meta["table_uri"]
        self.version: int = meta["version"]
        self.rows: int = meta["rows"]
        self.dims: int = meta["dims"]
        self.tombstones: int = meta["tombstones"]
        self.keys = np.load(path / "keys.npy", mmap_mode="r")
        self._key_order = np.argsort(self.keys)
        self._sorted_keys = np.asarray(self.keys)[self._key_order]
        with pa.memory_map(str(path / "rows.arrow")) as source:
            reader = pa.ipc.open_file(source)  # batches are zero-copy views of the map
            self._batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            self._schema = reader.schema
            self.columns = {*reader.schema.names, FINE.column}
        self._starts = np.cumsum([0] + [b.num_rows for b in self._batches])
        self.fine = np.load(path / "fine.npy", mmap_mode="r")
        self.has_fine = np.load(path / "has_fine.npy", mmap_mode="r")
        self.index = Index.restore(str(path / INDEX_FILE), view=True) if self.rows else None
        if self.index is not None:
            self.index.expansion_search = EXPANSION_SEARCH  # type: ignore[misc]  # stub: setter exists
        self.coarse = np.load(path / "coarse.npy", mmap_mode="r")
        self.by_user = np.load(path / "by_user.npy", mmap_mode="r")
        self.user_ids = np.load(path / "user_ids.npy")  # sorted; user i's rows are
        self.user_starts = np.load(path / "user_starts.npy")  # by_user[starts[i]:starts[i + 1]]

    def rows_at(self, positions: np.ndarray, columns: list[str]) -> pa.RecordBatch:
        """The result columns of the rows at `positions`, in that order. Taken batch by batch:
        a take over the whole chunked file would first concatenate it (a copy per query)."""
        which = np.searchsorted(self._starts, positions, side="right") - 1
        order = np.argsort(which, kind="stable")
        parts = [
            self._batches[b].select(columns).take(pa.array(positions[which == b] - self._starts[b]))
            for b in np.unique(which)
        ]
        if not parts:
            schema = pa.schema([self._schema.field(c) for c in columns])
            return pa.RecordBatch.from_pylist([], schema=schema)
        taken = pa.concat_batches(parts)  # rows grouped by batch, in `order`
        return taken.take(pa.array(np.argsort(order)))

    def positions_of(self, keys: np.ndarray) -> np.ndarray:
        """The row positions of chunk `keys` in this snapshot; -1 for keys it does not hold."""
        if self.rows == 0:
            return np.full(len(keys), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self._sorted_keys, keys), self.rows - 1)
        return np.where(self._sorted_keys[at] == keys, self._key_order[at], -1)

    def user_rows(self, user: str) -> np.ndarray:
        """The positions of `user`'s rows (none for a user the snapshot does not hold)."""
        at = int(np.searchsorted(self.user_ids, user))
        if at == len(self.user_ids) or self.user_ids[at] != user:
            return np.empty(0, dtype=np.int64)
        return np.asarray(self.by_user[self.user_starts[at] : self.user_starts[at + 1]])

    def user_top(self, user: str, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions and cosine similarities of `user`'s `k` nearest coarse vectors, best first:
        every one of the user's rows scored (exact, as LanceDB's filtered search is)."""
        positions = self.user_rows(user)
        coarse = self.coarse[positions].astype(np.float32)
        scores = (coarse @ np.asarray(vector, np.float32)).astype(np.float64)
        if k < len(positions):
            best = np.argpartition(-scores, k - 1)[:k]
            positions, scores = positions[best], scores[best]
        order = np.argsort(-scores, kind="stable")
        return positions[order], scores[order]

    def serves(self, table: Any) -> bool:
        """True while `table` is the table this snapshot was made from, at the same version."""
        return table_uri(table) == self.table_uri and table.version == self.version

    def top(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Positions and cosine similarities of the `k` nearest coarse vectors, best first, or
        None if the graph search found fewer than min(k, rows) (the caller asks LanceDB)."""
        if self.index is None:
            return np.empty(0, np.int64), np.empty(0)
        found = self.index.search(np.asarray(vector, np.float32), k, threads=1)
        positions = self.positions_of(found.keys)
        if len(positions) < min(k, self.rows) or (positions < 0).any():
            return None
        return positions, 1.0 - found.distances.astype(np.float64)


def table_uri(table: Any) -> str:
    return str(getattr(table, "uri", "") or table.name)


def chunk_keys(chunk_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The HNSW keys of chunks: 64 bits of a hash of the chunk id, so that a key names the same
    chunk in every snapshot and an update touches only the chunks that changed."""
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(c.encode(), digest_size=8).digest(), "little")
            for c in chunk_ids.to_pylist()
        ),
        dtype=np.uint64,
        count=len(chunk_ids),
    )


def build(table: Any, root: Path, columns: list[str]) -> BuildResult:
    """Snapshot `table` at its current version under `root` and publish it; `columns` are the
    result columns it carries.

    Every file is written anew from the table (a sequential read), but the HNSW — the costly
    part — starts from the published snapshot's when there is one: only chunks added, removed or
    with a new coarse vector are inserted or removed, so a run that changed 1 % of the rows pays
    for that 1 % of graph work. Removed entries stay as tombstones; once they exceed
    REBUILD_FRACTION of the rows the graph is rebuilt from its live vectors."""
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / BUILD_LOCK):  # one build at a time: a publish removes other directories
        return _build(table, root, columns)


def _build(table: Any, root: Path, columns: list[str]) -> BuildResult:
    from usearch.index import Index

    started = time.monotonic()
    version = table.version
    dims, fine_dims = column_dims(table, COARSE.column), column_dims(table, FINE.column)
    if dims is None or fine_dims is None:
        raise RuntimeError(f"{table_uri(table)} lacks a vector column the snapshot serves")
    where = f"{COARSE.column} IS NOT NULL"
    rows = table.count_rows(where)
    previous = current(root)
    if previous is not None and (
        previous.table_uri != table_uri(table) or previous.index is None or previous.dims != dims
    ):
        previous = None
    path = root / f"v{version}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        keys = np.lib.format.open_memmap(path / "keys.npy", "w+", np.uint64, (rows,))
        fine = np.lib.format.open_memmap(path / "fine.npy", "w+", np.float16, (rows, fine_dims))
        has_fine = np.lib.format.open_memmap(path / "has_fine.npy", "w+", np.bool_, (rows,))
        coarse_f16 = np.lib.format.open_memmap(path / "coarse.npy", "w+", np.float16, (rows, dims))
        users: list[str] = []
        if previous is None:
            index = _new_index(dims)
            seen = np.zeros(0, dtype=np.bool_)
        else:  # loaded, not viewed: it is changed in place and saved under the new snapshot
            index = Index.restore(str(previous.path / INDEX_FILE))
            seen = np.zeros(previous.rows, dtype=np.bool_)
        inserted = removed = 0
        done = 0
        reader = (
            table.search()
            .where(where)
            .select([*dict.fromkeys([*columns, "user_id"]), COARSE.column, FINE.column])
            .limit(None)
            .to_batches(READ_BATCH_ROWS)
        )
        schema = pa.schema([table.schema.field(c) for c in columns])
        writer = pa.ipc.new_file(str(path / "rows.arrow"), schema)
        for batch in reader:
            n = batch.num_rows
            if done + n > rows:
                raise RuntimeError(f"{table_uri(table)} changed while its snapshot was built")
            batch_keys = chunk_keys(batch.column("chunk_id"))
            coarse = vector_matrix(batch.column(COARSE.column))
            users.extend(batch.column("user_id").to_pylist())
            insert = np.ones(n, dtype=np.bool_)
            if previous is not None:
                known = previous.positions_of(batch_keys)
                present = known >= 0
                seen[known[present]] = True
                stored = _stored_vectors(index, batch_keys[present])
                unchanged = np.all(stored == coarse[present].astype(np.float16), axis=1)
                insert[np.flatnonzero(present)[unchanged]] = False
                changed = batch_keys[present][~unchanged]
                if len(changed):
                    index.remove(changed)
                    removed += len(changed)
            if insert.any():
                index.add(batch_keys[insert], coarse[insert])
                inserted += int(insert.sum())
            batch_fine = batch.column(FINE.column)
            keys[done : done + n] = batch_keys
            coarse_f16[done : done + n] = coarse
            fine[done : done + n] = np.nan_to_num(vector_matrix(batch_fine))
            has_fine[done : done + n] = batch_fine.is_valid().to_numpy(zero_copy_only=False)
            writer.write_batch(batch.select(columns))
            done += n
        writer.close()
        if done != rows:
            raise RuntimeError(f"{table_uri(table)} changed while its snapshot was built")
        _check_unique(keys)
        _write_user_ranges(path, users)
        tombstones = 0
        action = "built"
        if previous is not None:
            gone = np.asarray(previous.keys)[~seen]
            if len(gone):
                index.remove(gone)
            tombstones = previous.tombstones + removed + len(gone)
            action = "updated"
            if tombstones > REBUILD_FRACTION * max(rows, 1):
                index, tombstones, action = _rebuilt(index, keys, dims), 0, "rebuilt"
        for array in (keys, fine, has_fine, coarse_f16):
            array.flush()
        if rows:
            index.save(str(path / INDEX_FILE))
        meta = {"table_uri": table_uri(table), "version": version, "rows": rows, "dims": dims}
        (path / "meta.json").write_text(json.dumps({**meta, "tombstones": tombstones}))
        publish(root, path)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return BuildResult(version, rows, time.monotonic() - started, path, action, inserted)


def _write_user_ranges(path: Path, users: list[str]) -> None:
    """The rows grouped by user: `by_user` (positions, user by user), the sorted `user_ids` and
    where each user's positions start in `by_user`."""
    names = np.asarray(users, dtype=str) if users else np.empty(0, dtype="<U1")
    by_user = np.argsort(names, kind="stable")
    user_ids, starts = np.unique(names[by_user], return_index=True)
    np.save(path / "by_user.npy", by_user.astype(np.int64))
    np.save(path / "user_ids.npy", user_ids)
    np.save(path / "user_starts.npy", np.append(starts, len(names)).astype(np.int64))


def _new_index(dims: int):
    from usearch.index import Index

    return Index(
        ndim=dims,
        metric="cos",
        dtype="f16",
        connectivity=CONNECTIVITY,
        expansion_add=EXPANSION_ADD,
        expansion_search=EXPANSION_SEARCH,
    )


def _stored_vectors(index: Any, keys: np.ndarray) -> np.ndarray:
    """The f16 vectors `index` holds for `keys` (all present), one row per key."""
    if len(keys) == 0:
        return np.empty((0, index.ndim), dtype=np.float16)
    return np.asarray(np.vstack(index.get(keys)), dtype=np.float16)


def _rebuilt(index: Any, keys: np.ndarray, dims: int):
    """A fresh graph over the live vectors of `index` (no tombstones)."""
    fresh = _new_index(dims)
    for start in range(0, len(keys), READ_BATCH_ROWS):
        part = np.asarray(keys[start : start + READ_BATCH_ROWS])
        fresh.add(part, _stored_vectors(index, part))
    return fresh


def _check_unique(keys: np.ndarray) -> None:
    unique, counts = np.unique(keys, return_counts=True)
    if len(unique) != len(keys):
        raise RuntimeError(
            f"two chunk ids hash to the same snapshot key {unique[counts > 1][0]}: chunk ids must "
            "be unique in the table (a 64-bit collision between distinct ids is ~1e-8 at 1M rows)"
        )


def vector_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list column as a (rows, dims) array over its values (NULL rows: whatever
    their slots hold)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    dims = column.type.list_size
    flat = column.values.to_numpy(zero_copy_only=False).reshape(-1, dims)
    return flat[column.offset : column.offset + len(column)]


def publish(root: Path, path: Path) -> None:
    """Point CURRENT at `path` (an atomic rename), then remove the snapshots it replaced."""
    write_text_atomically(root / CURRENT, path.name)
    for old in root.iterdir():
        if old.is_dir() and old != path:  # builds are serialized: nothing else is being written
            shutil.rmtree(old, ignore_errors=True)


_loaded: dict[Path, SearchSnapshot] = {}
_lock = threading.Lock()


def current(root: Path) -> SearchSnapshot | None:
    """The published snapshot under `root` (loaded once per process and snapshot), or None."""
    try:
        name = (root / CURRENT).read_text().strip()
    except FileNotFoundError:
        return None
    path = root / name
    with _lock:
        if path not in _loaded:
            try:
                _loaded.clear()
                _loaded[path] = SearchSnapshot(path)
            except FileNotFoundError:  # replaced and removed between the two reads
                return None
        return _loaded[path]
