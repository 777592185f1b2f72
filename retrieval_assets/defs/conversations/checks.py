"""Store-level checks for the chunk tables."""

import dagster as dg

from retrieval_assets.defs.conversations.assets import LANCEDB_CHUNKS
from retrieval_assets.lib.ingest import chunk_count
from retrieval_assets.lib.lancedb_store import LanceDBResource
from retrieval_assets.lib.postgres import PostgresResource

CHUNK_COUNTS_AGREE = "chunk_counts_agree"


@dg.asset_check(
    asset=LANCEDB_CHUNKS,
    name=CHUNK_COUNTS_AGREE,
    description="LanceDB holds as many chunks as Postgres (the mirror is complete).",
)
def chunk_counts_agree(postgres: PostgresResource, lancedb: LanceDBResource) -> dg.AssetCheckResult:
    with postgres.get_connection() as conn:
        in_postgres = chunk_count(conn)
    with lancedb.get_connection() as db:
        in_lancedb = lancedb.chunks_table(db).count_rows()
    return dg.AssetCheckResult(
        passed=in_postgres == in_lancedb,
        metadata={"postgres_chunks": in_postgres, "lancedb_chunks": in_lancedb},
    )
