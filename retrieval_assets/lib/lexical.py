"""The lexical (BM25) indexes of both stores, kept current by the graph like the vectors.

LanceDB: a native full-text index over chunk text (English stemming and stop words). Rows
written after the index was built are still searched (scanned) until the index folds them in,
which `ensure_lancedb_index` does on every run that finds some.

Postgres: `content_tsv` is a generated column with a GIN index, so every chunk is matched as
soon as it is written; BM25's per-user statistics (chunk_lexicon, chunk_lexicon_stats) are
rebuilt for the users whose chunks changed by `refresh_postgres_lexicon`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from retrieval_assets.lib.connection import one

TEXT_COLUMN = "content"
LANCEDB_INDEX = f"{TEXT_COLUMN}_idx"
POSTGRES_INDEX = "conversation_chunks_content_tsv_gin"


@dataclass(frozen=True)
class LexicalState:
    action: str  # "created", "updated", "current"
    indexed_rows: int  # chunks the index (statistics, in Postgres) covers
    unindexed_rows: int  # chunks written since: found, but not yet in the index/statistics
    seconds: float

    def metadata(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "indexed_rows": self.indexed_rows,
            "unindexed_rows": self.unindexed_rows,
            "dagster/row_count": self.indexed_rows + self.unindexed_rows,  # chunks it finds
            "seconds": round(self.seconds, 2),
        }


def lancedb_index_state(table: Any) -> tuple[int, int] | None:
    """(indexed, unindexed) rows of the full-text index, or None where there is none."""
    stats = table.index_stats(LANCEDB_INDEX)
    if stats is None:
        return None
    return stats.num_indexed_rows, stats.num_unindexed_rows


def ensure_lancedb_index(table: Any) -> LexicalState:
    """Build the full-text index where there is none; fold rows written since into it."""
    started = time.monotonic()
    state = lancedb_index_state(table)
    if state is None:
        from lancedb.index import FTS

        table.create_index(
            TEXT_COLUMN,
            config=FTS(
                with_position=False,  # no phrase queries: BM25 over terms is what search asks
                language="English",
                stem=True,
                remove_stop_words=True,
            ),
            name=LANCEDB_INDEX,
        )
        action = "created"
    elif state[1]:
        table.optimize()  # folds new rows into every index, incrementally
        action = "updated"
    else:
        action = "current"
    indexed, unindexed = lancedb_index_state(table) or (0, table.count_rows())
    return LexicalState(action, indexed, unindexed, time.monotonic() - started)


# Users whose chunks differ from their statistics: the set refresh_chunk_lexicon() rebuilds.
_STALE_USERS = """
    SELECT count(*), coalesce(sum(coalesce(n.chunks, 0)), 0)
    FROM (
        SELECT c.user_id, count(*) AS chunks, sum(hashtextextended(c.chunk_id, 0)) AS fingerprint
        FROM conversation_chunks c GROUP BY c.user_id
    ) n
    FULL OUTER JOIN chunk_lexicon_stats s ON s.user_id = n.user_id
    WHERE n.user_id IS NULL OR s.user_id IS NULL
       OR s.chunks <> n.chunks OR s.fingerprint <> n.fingerprint
"""


def refresh_postgres_lexicon(conn: Any) -> LexicalState:
    """Rebuild the BM25 statistics of every user whose chunks changed (one transaction)."""
    started = time.monotonic()
    with conn.transaction():
        refreshed, _users, chunks = one(conn, "SELECT * FROM refresh_chunk_lexicon()")
    return LexicalState(
        "updated" if refreshed else "current", int(chunks), 0, time.monotonic() - started
    )


@dataclass(frozen=True)
class PostgresLexicalHealth:
    index_valid: bool  # the GIN index exists and is usable
    stale_users: int  # users whose chunks changed since their statistics
    stale_chunks: int  # those users' chunks


def postgres_lexical_health(conn: Any) -> PostgresLexicalHealth:
    valid = conn.execute(
        "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(%s)",
        [POSTGRES_INDEX],
    ).fetchone()
    stale_users, stale_chunks = one(conn, _STALE_USERS)
    return PostgresLexicalHealth(bool(valid and valid[0]), int(stale_users), int(stale_chunks))
