"""Hash shards of the chunk table: the first hex digit of the content-derived chunk id.

Sixteen shards of near-equal size however many users there are, so a backfill fans out over
Dagster partitions without one partition per user.
"""

from __future__ import annotations

SHARD_KEYS = tuple("0123456789abcdef")


def check_shard(shard: str) -> str:
    if shard not in SHARD_KEYS:
        raise ValueError(
            f"unknown shard {shard!r}: shards are the hex digits {''.join(SHARD_KEYS)}"
        )
    return shard


def like_pattern(shard: str | None) -> str:
    """A LIKE pattern for the chunk ids of `shard` (None: every chunk)."""
    return "%" if shard is None else f"{check_shard(shard)}%"


def lancedb_filter(shard: str | None) -> str | None:
    """A LanceDB filter for the rows of `shard` (None: no filter)."""
    return None if shard is None else f"chunk_id LIKE '{like_pattern(shard)}'"
