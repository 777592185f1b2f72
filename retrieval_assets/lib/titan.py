"""The Titan vector column in Postgres: who made it, what is missing, fast writes, failures.

Writes go in batches: the batch's vectors are COPYed (binary, half precision as the column
stores them) into a temporary staging table and applied with one UPDATE … FROM, in one
transaction with the failure bookkeeping, so a batch is either fully recorded or not at all.
Pending rows are read by keyset pagination on chunk_id (never OFFSET over a set that shrinks as
it is filled).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import psycopg

from retrieval_assets.lib.connection import one
from retrieval_assets.lib.schema import (
    EMBEDDING_TYPE,
    HNSW_INDEX,
    embedding_dims,
    hnsw_index_sql,
)
from retrieval_assets.lib.shards import like_pattern


class TitanSchemaMismatch(RuntimeError):
    """The configured Titan size differs from the Postgres column's."""


def check_dimensions(conn: psycopg.Connection, dims: int) -> None:
    column = embedding_dims(conn)
    if column != dims:
        raise TitanSchemaMismatch(
            f"conversation_chunks.embedding is {EMBEDDING_TYPE}({column}) but Titan is configured "
            f"for {dims} dimensions (TITAN_DIMENSIONS). Migrate the column with "
            f"`retrieval-assets titan-dims {dims}`, or set TITAN_DIMENSIONS={column}."
        )


def ensure_titan_model(conn: psycopg.Connection, label: str, dims: int) -> int:
    """Record `label` as the column's producer; if another one made the stored vectors, clear
    them (they belong to another vector space) and return how many were cleared."""
    with conn.transaction():
        row = conn.execute(
            "SELECT model FROM embedding_schema_versions WHERE store = 'postgres' AND "
            "table_name = 'conversation_chunks' AND column_name = 'embedding' "
            "AND retired_at IS NULL FOR UPDATE"
        ).fetchone()
        if row is not None and row[0] == label:
            return 0
        cleared = conn.execute(
            "UPDATE conversation_chunks SET embedding = NULL, embedding_model = NULL, "
            "embedded_at = NULL WHERE embedding IS NOT NULL"
        ).rowcount
        conn.execute("DELETE FROM embedding_failures")
        conn.execute(
            "UPDATE embedding_schema_versions SET retired_at = now() WHERE store = 'postgres' "
            "AND table_name = 'conversation_chunks' AND column_name = 'embedding' "
            "AND retired_at IS NULL"
        )
        conn.execute(
            "INSERT INTO embedding_schema_versions (store, table_name, column_name, model, dims) "
            "VALUES ('postgres', 'conversation_chunks', 'embedding', %s, %s)",
            [label, dims],
        )
    return cleared


PENDING_ROWS = (
    "FROM conversation_chunks c WHERE c.embedding IS NULL AND NOT EXISTS "
    "(SELECT 1 FROM embedding_failures f WHERE f.chunk_id = c.chunk_id "
    "AND f.quarantined_at IS NOT NULL)"
)


def backlog(conn: psycopg.Connection, shard: str | None = None) -> int:
    """Rows still waiting for a Titan vector (quarantined rows excluded), in `shard` if given."""
    return one(
        conn, f"SELECT count(*) {PENDING_ROWS} AND c.chunk_id LIKE %s", [like_pattern(shard)]
    )[0]


def embedded(conn: psycopg.Connection, shard: str | None = None) -> int:
    """Rows holding a Titan vector, in `shard` if given."""
    return one(
        conn,
        "SELECT count(*) FROM conversation_chunks WHERE embedding IS NOT NULL AND chunk_id LIKE %s",
        [like_pattern(shard)],
    )[0]


def quarantined(conn: psycopg.Connection) -> int:
    return one(conn, "SELECT count(*) FROM embedding_failures WHERE quarantined_at IS NOT NULL")[0]


def pending_after(
    conn: psycopg.Connection,
    after: str,
    limit: int,
    skip: Sequence[str] = (),
    shard: str | None = None,
) -> list[tuple[str, str, int]]:
    """The next `limit` (chunk_id, content, token_count) without a vector, by chunk_id."""
    return conn.execute(
        f"SELECT c.chunk_id, c.content, c.token_count {PENDING_ROWS} AND c.chunk_id > %s "
        "AND c.chunk_id LIKE %s AND c.chunk_id <> ALL(%s) ORDER BY c.chunk_id LIMIT %s",
        [after, like_pattern(shard), list(skip), limit],
    ).fetchall()


class VectorOutOfRange(ValueError):
    """A vector has a component that half precision cannot hold (or NaN)."""


HALF_MAX = float(np.finfo(np.float16).max)
OUT_OF_RANGE = (
    "the vector has a component that halfvec cannot store (NaN, infinite or beyond ±65504); "
    "Titan with normalize=True never returns one"
)


def storable(vectors: np.ndarray) -> np.ndarray:
    """Per row: can the column (half precision) hold this vector?"""
    return (np.isfinite(vectors) & (np.abs(vectors) <= HALF_MAX)).all(axis=-1)


def _binary_copy(ids: Sequence[str], vectors: np.ndarray) -> bytes:
    """The whole batch as one COPY BINARY stream of (chunk_id text, embedding halfvec), built by
    numpy; rows are grouped by id length (chunk ids all have one), order does not matter."""
    ok = storable(vectors)
    if not ok.all():
        raise VectorOutOfRange(f"chunk {ids[int(np.flatnonzero(~ok)[0])]}: {OUT_OF_RANGE}")
    encoded = np.array([i.encode() for i in ids], dtype=object)
    lengths = np.array([len(e) for e in encoded])
    body = b"".join(
        _copy_rows(encoded[lengths == n].tolist(), vectors[lengths == n])
        for n in np.unique(lengths)
    )
    return b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0) + body + b"\xff\xff"


def _copy_rows(ids: list[bytes], vectors: np.ndarray) -> bytes:
    """COPY BINARY rows for ids of one length: the field count, the id's length and bytes, the
    halfvec's length, dims, an unused word and the components as big-endian float16."""
    dims = vectors.shape[1]
    row = np.dtype(
        [
            ("fields", ">i2"),
            ("id_len", ">i4"),
            ("id", f"S{len(ids[0])}"),
            ("vec_len", ">i4"),
            ("dims", ">i2"),
            ("unused", ">i2"),
            ("vec", ">f2", (dims,)),
        ]
    )
    rows = np.empty(len(ids), dtype=row)
    rows["fields"], rows["id_len"], rows["id"] = 2, len(ids[0]), ids
    rows["vec_len"], rows["dims"], rows["unused"], rows["vec"] = 4 + 2 * dims, dims, 0, vectors
    return rows.tobytes()


def write_vectors(
    conn: psycopg.Connection, rows: Sequence[tuple[str, np.ndarray]], label: str
) -> int:
    """Set `embedding` for `rows` (COPY into staging, one UPDATE); returns rows updated.

    Rows deleted meanwhile are simply not updated. Run inside the caller's transaction.
    """
    if not rows:
        return 0
    if one(conn, "SELECT to_regclass('pg_temp.staging_vectors') IS NULL")[0]:
        conn.execute(
            f"CREATE TEMP TABLE staging_vectors (chunk_id text, embedding {EMBEDDING_TYPE}) "
            "ON COMMIT DELETE ROWS"
        )  # PLAIN: the batch lives one transaction; no TOAST round trip for it
        conn.execute("ALTER TABLE staging_vectors ALTER COLUMN embedding SET STORAGE PLAIN")
    ids = [chunk_id for chunk_id, _ in rows]
    stream = _binary_copy(ids, np.stack([np.asarray(v, dtype=np.float32) for _, v in rows]))
    with conn.cursor().copy(
        "COPY staging_vectors (chunk_id, embedding) FROM STDIN WITH (FORMAT BINARY)"
    ) as copy:
        copy.write(stream)
    return one(
        conn,  # one statement: the rows' vectors, and their failures forgotten
        "WITH updated AS (UPDATE conversation_chunks c SET embedding = s.embedding, "
        "embedding_model = %s, embedded_at = now() FROM staging_vectors s "
        "WHERE c.chunk_id = s.chunk_id RETURNING c.chunk_id), "
        "forgotten AS (DELETE FROM embedding_failures f USING updated u "
        "WHERE f.chunk_id = u.chunk_id) SELECT count(*) FROM updated",
        [label],
    )[0]


def record_failures(
    conn: psycopg.Connection, failures: Sequence[tuple[str, str]], quarantine_after: int
) -> int:
    """Count one more failed run for each (chunk_id, error); returns rows newly quarantined."""
    newly = 0
    for chunk_id, error in failures:
        row = conn.execute(
            "INSERT INTO embedding_failures AS f (chunk_id, attempts, last_error) "
            "SELECT %s, 1, %s WHERE EXISTS (SELECT 1 FROM conversation_chunks WHERE chunk_id = %s) "
            "ON CONFLICT (chunk_id) DO UPDATE SET attempts = f.attempts + 1, "
            "last_error = EXCLUDED.last_error, last_failed_at = now() "
            "RETURNING attempts, quarantined_at",
            [chunk_id, error[:2000], chunk_id],
        ).fetchone()
        if row is not None and row[0] >= quarantine_after and row[1] is None:
            conn.execute(
                "UPDATE embedding_failures SET quarantined_at = now() WHERE chunk_id = %s",
                [chunk_id],
            )
            newly += 1
    return newly


def replay_quarantine(conn: psycopg.Connection) -> int:
    """Release every quarantined row: the next run tries it again from zero attempts."""
    return conn.execute("DELETE FROM embedding_failures WHERE quarantined_at IS NOT NULL").rowcount


@dataclass
class TitanRunStats:
    embedded: int = 0
    tokens: int = 0  # in the chunker's tokenizer, of the rows embedded
    failed: int = 0
    newly_quarantined: int = 0
    truncated: int = 0
    attempts: int = 0
    batches: int = 0


# A backlog this large (and over half the table) is a bulk load: maintaining the HNSW graph row
# by row would dominate (~550 vectors/s against ~27,000 without it, tests/benchmarks), so the
# index is dropped, the rows filled, and the index built once at the end.
BULK_LOAD_ROWS = 20_000


def bulk_load(conn: psycopg.Connection, pending: int) -> bool:
    if pending < BULK_LOAD_ROWS:
        return False
    total = one(conn, "SELECT count(*) FROM conversation_chunks")[0]
    return pending > total / 2


def drop_hnsw(conn: psycopg.Connection) -> None:
    conn.execute(f"DROP INDEX IF EXISTS {HNSW_INDEX}")


def build_hnsw(conn: psycopg.Connection, maintenance_work_mem: str = "1GB") -> None:
    """(Re)build the HNSW index; with enough maintenance memory the graph is built in RAM."""
    conn.execute(f"SET maintenance_work_mem = '{maintenance_work_mem}'")
    conn.execute(hnsw_index_sql())
    conn.execute("RESET maintenance_work_mem")


def embed_pending(
    conn: psycopg.Connection,
    bedrock,
    *,
    batch_size: int = 1_024,
    quarantine_after: int = 3,
    count_tokens=None,
    progress=print,
    max_rows: int | None = None,
    shard: str | None = None,
) -> TitanRunStats:
    """Embed every row still NULL (quarantined excepted) — of one hash `shard` if given —
    one committed batch at a time.

    Pages by chunk_id; when a pass reaches the end it starts over, so rows inserted behind the
    cursor while it ran are picked up too. A row that fails is tried once per run: it stays NULL,
    its failure is counted, and after `quarantine_after` failed runs it is quarantined.
    """
    stats = TitanRunStats()
    failed_this_run: list[str] = []
    while max_rows is None or stats.embedded < max_rows:
        after, progressed = "", False
        while batch := pending_after(conn, after, batch_size, failed_this_run, shard):
            after = batch[-1][0]
            results = bedrock.embed_many([content for _, content, _ in batch], count_tokens)
            results = [  # a vector the column cannot hold fails its row alone
                replace(r, vector=None, error=OUT_OF_RANGE)
                if r.vector is not None and not storable(r.vector)
                else r
                for r in results
            ]
            done = [
                (cid, r.vector)
                for (cid, _, _), r in zip(batch, results, strict=True)
                if r.vector is not None
            ]
            failures = [
                (cid, r.error or "unknown error")
                for (cid, _, _), r in zip(batch, results, strict=True)
                if r.vector is None
            ]
            with conn.transaction():
                written = write_vectors(conn, done, bedrock.label)
                stats.newly_quarantined += record_failures(conn, failures, quarantine_after)
            failed_this_run.extend(cid for cid, _ in failures)
            stats.embedded += written
            stats.tokens += sum(
                n for (_, _, n), r in zip(batch, results, strict=True) if r.vector is not None
            )
            stats.failed += len(failures)
            stats.truncated += sum(r.truncated for r in results)
            stats.attempts += sum(r.attempts for r in results)
            stats.batches += 1
            progressed = progressed or bool(done)
            progress(
                f"titan batch {stats.batches}: {written} embedded, {len(failures)} failed "
                f"(run total {stats.embedded} embedded, {stats.failed} failed)"
            )
            if max_rows is not None and stats.embedded >= max_rows:
                break
        if not progressed:
            break
    return stats
