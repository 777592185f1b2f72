"""Writing parsed conversations and their chunks to Postgres, and mirroring chunks to LanceDB.

Every write goes through a temporary staging table filled by COPY and one set-based statement, in
one transaction: a failure anywhere leaves the stores as they were (never half-written).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import psycopg

from retrieval_assets.lib.chunking import Chunk, Chunker
from retrieval_assets.lib.connection import one
from retrieval_assets.lib.lancedb_store import (
    CHUNK_COLUMNS,
    delete_ids,
    insert_missing,
    rows_to_arrow,
    table_ids,
)
from retrieval_assets.lib.sources import Conversation, Turn, parse_timestamp

_CONVERSATION_COLUMNS = (
    "id, external_id, user_id, title, source, source_format, origin, turns, turn_count, "
    "content_hash, created_at, updated_at"
)
_SAME_CONVERSATION = "c.user_id = s.user_id AND c.external_id = s.external_id"
_CHUNK_INSERT_COLUMNS = ", ".join(CHUNK_COLUMNS)
_READ_BATCH = 500
_MIRROR_BATCH = 5_000


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of up to `size` items (itertools.batched arrives only in Python 3.12)."""
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def conversation_key(user_id: str, external_id: str) -> str:
    """The key a new conversation is stored under: one per (user, export id), so that two
    users' exports reusing an id never meet. (Rows stored before revision 0007 keep their export
    id as key; the key is assigned once and never recomputed.)"""
    return hashlib.sha256(f"{user_id}\x1f{external_id}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Collision:
    """A conversation of another source (same user and id, other content): left as stored."""

    user_id: str
    external_id: str
    origin: str
    stored_source: str


@dataclass
class IngestResult:
    staged: int = 0
    inserted: int = 0
    updated: int = 0
    moved: int = 0
    deleted: int = 0
    held_back: int = 0
    deletions_skipped: bool = False
    collisions: list[Collision] = field(default_factory=list)

    @property
    def unchanged(self) -> int:
        return self.staged - self.inserted - self.updated - len(self.collisions)


def ingest_conversations(
    conn: psycopg.Connection,
    conversations: Iterable[Conversation],
    *,
    source: str,
    propagate_deletions: Callable[[], bool],
    held_back: Callable[[], Iterable[tuple[str, str]]] = lambda: (),
) -> IngestResult:
    """Upsert `conversations` (streamed) for `source`; delete its vanished ones if allowed.

    A conversation is its user's (user_id, export id): no export can change another user's.
    The same user and id from another source is the same conversation when its content is the
    same (the export moved or was renamed: it now belongs to `source`), and a collision left as
    stored when it differs. `propagate_deletions` is asked after the stream is exhausted: only a
    complete read of the source may delete conversations absent from it, and never those in
    `held_back` (user id, export id) — records that were read but declined.
    """
    result = IngestResult()
    with conn.transaction():
        conn.execute(
            "CREATE TEMP TABLE staging_conversations "
            "(LIKE conversations INCLUDING DEFAULTS) ON COMMIT DROP"
        )
        with conn.cursor().copy(
            f"COPY staging_conversations ({_CONVERSATION_COLUMNS}) FROM STDIN"
        ) as copy:
            for c in conversations:
                copy.write_row(
                    (
                        conversation_key(c.user_id, c.id),
                        c.id,
                        c.user_id,
                        c.title,
                        source,
                        c.source_format,
                        c.origin,
                        json.dumps(c.turns_json(), ensure_ascii=False),
                        len(c.turns),
                        c.content_hash,
                        c.created_at,
                        c.updated_at,
                    )
                )
                result.staged += 1
        result.collisions = [
            Collision(*row)
            for row in conn.execute(
                f"""
                DELETE FROM staging_conversations s USING conversations c
                WHERE {_SAME_CONVERSATION} AND c.source <> s.source
                  AND c.content_hash <> s.content_hash
                RETURNING s.user_id, s.external_id, s.origin, c.source
                """
            )
        ]
        result.moved = conn.execute(
            f"UPDATE conversations c SET source = s.source, origin = s.origin "
            f"FROM staging_conversations s WHERE {_SAME_CONVERSATION} AND c.source <> s.source"
        ).rowcount
        inserted, updated = one(
            conn,
            f"""
            WITH upserted AS (
                INSERT INTO conversations AS c ({_CONVERSATION_COLUMNS})
                SELECT {_CONVERSATION_COLUMNS} FROM staging_conversations
                ON CONFLICT (user_id, external_id) DO UPDATE SET
                    title = EXCLUDED.title, source_format = EXCLUDED.source_format,
                    origin = EXCLUDED.origin, turns = EXCLUDED.turns,
                    turn_count = EXCLUDED.turn_count, content_hash = EXCLUDED.content_hash,
                    created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at,
                    ingested_at = now()
                WHERE c.content_hash IS DISTINCT FROM EXCLUDED.content_hash
                RETURNING (xmax = 0) AS inserted
            )
            SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted)
            FROM upserted
            """,
        )
        result.inserted, result.updated = inserted, updated
        if propagate_deletions():
            conn.execute(
                "CREATE TEMP TABLE held_back (user_id text, external_id text) ON COMMIT DROP"
            )
            with conn.cursor().copy("COPY held_back (user_id, external_id) FROM STDIN") as copy:
                for identity in held_back():
                    copy.write_row(identity)
            result.held_back = one(
                conn,
                f"SELECT count(*) FROM conversations c JOIN held_back s ON {_SAME_CONVERSATION} "
                "WHERE c.source = %s",
                [source],
            )[0]
            result.deleted = conn.execute(
                f"""
                DELETE FROM conversations c WHERE c.source = %s
                AND NOT EXISTS (SELECT 1 FROM staging_conversations s WHERE {_SAME_CONVERSATION})
                AND NOT EXISTS (SELECT 1 FROM held_back s WHERE {_SAME_CONVERSATION})
                """,
                [source],
            ).rowcount
        else:
            result.deletions_skipped = True
    return result


@dataclass
class ChunkResult:
    conversations: int = 0
    chunks_written: int = 0
    chunks_inserted: int = 0
    chunks_removed: int = 0


def _conversation_from_row(row: tuple[Any, ...]) -> Conversation:
    conv_id, user_id, title, source_format, origin, turns, created_at, updated_at = row
    return Conversation(
        id=conv_id,
        user_id=user_id,
        title=title,
        source_format=source_format,
        origin=origin,
        turns=tuple(
            Turn(t["role"], t["content"], parse_timestamp(t.get("created_at")), t.get("name"))
            for t in turns
        ),
        created_at=created_at,
        updated_at=updated_at,
    )


def _stale_batches(conn: psycopg.Connection, signature: str) -> Iterator[list[Conversation]]:
    """Batches of conversations whose chunks are missing or came from other content/settings."""
    ids = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM conversations "
            "WHERE chunked_with IS DISTINCT FROM content_hash || '|' || %s ORDER BY id",
            [signature],
        )
    ]
    for batch in batched(ids, _READ_BATCH):
        rows = conn.execute(
            "SELECT id, user_id, title, source_format, origin, turns, created_at, updated_at "
            "FROM conversations WHERE id = ANY(%s) ORDER BY id",
            [batch],
        )
        yield [_conversation_from_row(r) for r in rows]


def rebuild_chunks(conn: psycopg.Connection, chunker: Chunker) -> ChunkResult:
    """Re-chunk every conversation that changed since it was last chunked, in one transaction.

    Chunks whose id survives keep their row (and so their embedding); chunks that no longer
    exist are deleted; new ones are inserted with NULL embeddings for the embedding assets.
    """
    result = ChunkResult()
    with conn.transaction():
        conn.execute(
            "CREATE TEMP TABLE staging_chunks (LIKE conversation_chunks INCLUDING DEFAULTS) "
            "ON COMMIT DROP"
        )
        conn.execute("CREATE TEMP TABLE rechunked (id text PRIMARY KEY) ON COMMIT DROP")
        with conn.cursor() as cur:
            for batch in _stale_batches(conn, chunker.signature):
                with cur.copy("COPY rechunked (id) FROM STDIN") as copy:
                    for conversation in batch:
                        copy.write_row((conversation.id,))
                with cur.copy(f"COPY staging_chunks ({_CHUNK_INSERT_COLUMNS}) FROM STDIN") as copy:
                    for conversation in batch:
                        for chunk in chunker.chunk(conversation):
                            copy.write_row(_chunk_row(chunk))
                            result.chunks_written += 1
                result.conversations += len(batch)
        result.chunks_removed = conn.execute(
            "DELETE FROM conversation_chunks c USING rechunked r "
            "WHERE c.conversation_id = r.id AND NOT EXISTS "
            "(SELECT 1 FROM staging_chunks s WHERE s.chunk_id = c.chunk_id)"
        ).rowcount
        result.chunks_inserted = conn.execute(
            f"INSERT INTO conversation_chunks ({_CHUNK_INSERT_COLUMNS}) "
            f"SELECT {_CHUNK_INSERT_COLUMNS} FROM staging_chunks ON CONFLICT (chunk_id) DO NOTHING"
        ).rowcount
        conn.execute(
            "UPDATE conversations c SET chunked_with = c.content_hash || '|' || %s "
            "FROM rechunked r WHERE c.id = r.id",
            [chunker.signature],
        )
    return result


def _chunk_row(chunk: Chunk) -> tuple[Any, ...]:
    return (
        chunk.chunk_id,
        chunk.user_id,
        chunk.conversation_id,
        chunk.tier,
        chunk.chunk_index,
        chunk.turn_start,
        chunk.turn_end,
        list(chunk.roles),
        chunk.content,
        chunk.content_hash,
        chunk.token_count,
        chunk.created_at,
    )


@dataclass
class MirrorResult:
    inserted: int = 0
    deleted: int = 0
    rows: int = 0


def mirror_chunks(conn: psycopg.Connection, table: Any) -> MirrorResult:
    """Make the LanceDB chunk table hold exactly the Postgres chunk ids (vectors untouched)."""
    postgres_ids = {r[0] for r in conn.execute("SELECT chunk_id FROM conversation_chunks")}
    lance_ids = table_ids(table)
    missing = sorted(postgres_ids - lance_ids)
    result = MirrorResult()
    for batch in batched(missing, _MIRROR_BATCH):
        rows = conn.execute(
            f"SELECT {_CHUNK_INSERT_COLUMNS} FROM conversation_chunks WHERE chunk_id = ANY(%s)",
            [batch],
        ).fetchall()
        insert_missing(table, rows_to_arrow(rows))
        result.inserted += len(rows)
    result.deleted = delete_ids(table, lance_ids - postgres_ids)
    result.rows = table.count_rows()
    return result


# ------------------------------------------------------------------ what the stored rows look like


@dataclass(frozen=True)
class ConversationSummary:
    conversations: int
    turns: int
    latest: list[tuple[Any, ...]]  # external id, user, format, turns, title of the newest 10


def stored_fingerprint(conn: psycopg.Connection, source: str) -> str:
    """A digest of the conversations stored from `source` (their keys, owners, export ids and
    content hashes): it changes when a run or a hand writes, moves or deletes one of them."""
    count, total = one(
        conn,
        "SELECT count(*), coalesce(sum(hashtextextended("
        "concat_ws(':', id, user_id, external_id, content_hash), 0)), 0) "
        "FROM conversations WHERE source = %s",
        [source],
    )
    return f"{count}:{total}"


def conversation_summary(conn: psycopg.Connection) -> ConversationSummary:
    conversations, turns = one(
        conn, "SELECT count(*), coalesce(sum(turn_count), 0) FROM conversations"
    )
    latest = conn.execute(
        "SELECT external_id, user_id, source_format, turn_count, title FROM conversations "
        "ORDER BY updated_at DESC NULLS LAST, id LIMIT 10"
    ).fetchall()
    return ConversationSummary(conversations, turns, latest)


@dataclass(frozen=True)
class ChunkSummary:
    per_tier: list[tuple[Any, ...]]  # tier, chunks, mean, p50, p95, max tokens
    histogram: list[tuple[int, int]]  # 32-token bucket (1-8, 9 = 256+), chunks
    over_budget: int  # chunks holding more tokens than their tier allows
    latest: list[tuple[Any, ...]]  # the newest 8 chunks, for a preview


def chunk_summary(conn: psycopg.Connection, budgets: dict[str, int]) -> ChunkSummary:
    per_tier = conn.execute(
        "SELECT tier, count(*), avg(token_count)::float, "
        "percentile_disc(0.5) WITHIN GROUP (ORDER BY token_count), "
        "percentile_disc(0.95) WITHIN GROUP (ORDER BY token_count), max(token_count) "
        "FROM conversation_chunks GROUP BY tier ORDER BY tier"
    ).fetchall()
    histogram = conn.execute(
        "SELECT width_bucket(token_count, 0, 256, 8) AS b, count(*) FROM conversation_chunks "
        "GROUP BY b ORDER BY b"
    ).fetchall()
    over_budget = sum(
        one(
            conn,
            "SELECT count(*) FROM conversation_chunks WHERE tier = %s AND token_count > %s",
            [tier, most],
        )[0]
        for tier, most in budgets.items()
    )
    latest = conn.execute(
        "SELECT conversation_id, tier, turn_start || '-' || turn_end, "
        "array_to_string(roles, ','), token_count, content FROM conversation_chunks "
        "ORDER BY ingested_at DESC, chunk_id LIMIT 8"
    ).fetchall()
    return ChunkSummary(per_tier, histogram, over_budget, latest)


def chunk_count(conn: psycopg.Connection) -> int:
    return one(conn, "SELECT count(*) FROM conversation_chunks")[0]
