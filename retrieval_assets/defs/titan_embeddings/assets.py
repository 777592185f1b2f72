"""Bedrock Titan Text Embeddings v2 vectors of every chunk, in Postgres (pgvector, HNSW)."""

import time
from typing import Any

import dagster as dg

from retrieval_assets.defs.conversations.assets import POSTGRES_CHUNKS
from retrieval_assets.lib.bedrock import BedrockResource
from retrieval_assets.lib.chunking import ChunkerResource
from retrieval_assets.lib.postgres import PostgresResource
from retrieval_assets.lib.schema import EMBEDDING_TYPE
from retrieval_assets.lib.titan import (
    backlog,
    build_hnsw,
    bulk_load,
    check_dimensions,
    drop_hnsw,
    embed_pending,
    ensure_titan_model,
    quarantined,
)

TITAN_EMBEDDINGS = dg.AssetKey(["postgres", "titan_embeddings"])
BEDROCK_POOL = "bedrock"
QUARANTINE_AFTER = 3


def embed_titan(
    log: dg.DagsterLogManager,
    postgres: PostgresResource,
    bedrock: BedrockResource,
    chunker: ChunkerResource,
    shard: str | None = None,
) -> dict[str, Any]:
    """Embed the pending rows (of one hash `shard`, or all); returns the run's metadata.

    Only a whole-column run may take the bulk path (drop HNSW, fill, build once): shard runs
    proceed in parallel and keep the index.
    """
    started = time.monotonic()
    source = "local Bedrock endpoint" if bedrock.is_local else "Amazon Bedrock"
    with postgres.get_connection() as conn:
        conn.autocommit = True  # each batch commits on its own (see embed_pending)
        check_dimensions(conn, bedrock.dimensions)
        cleared = ensure_titan_model(conn, bedrock.label, bedrock.dimensions)
        if cleared:
            log.warning(
                f"{cleared} vectors from another model were cleared; "
                f"re-embedding with {bedrock.label}"
            )
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
                bedrock,
                batch_size=postgres.write_batch_rows,
                count_tokens=chunker.chunker.count_tokens,
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
    seconds = time.monotonic() - started
    log.info(
        f"{stats.embedded} chunks embedded by {source} in {seconds:.1f}s; "
        f"{stats.failed} failed, {in_quarantine} quarantined, {remaining} pending"
    )
    return {
        "model": bedrock.label,
        "vector_source": source,
        "dims": bedrock.dimensions,
        "stored_as": f"{EMBEDDING_TYPE}({bedrock.dimensions})",
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
        "bulk_load": bulk,
        "hnsw_build_seconds": round(build_seconds, 1),
        **{f"local_endpoint_{k}": v for k, v in bedrock.endpoint_counts().items()},
    }


@dg.asset(
    key=TITAN_EMBEDDINGS,
    deps=[POSTGRES_CHUNKS],
    group_name="titan_embeddings",
    kinds={"postgres", "bedrock"},
    owners=["team:data-platform"],
    code_version="1",
    pool=BEDROCK_POOL,
    automation_condition=dg.AutomationCondition.eager(),
)
def titan_embeddings(
    context: dg.AssetExecutionContext,
    postgres: PostgresResource,
    bedrock: BedrockResource,
    chunker: ChunkerResource,
) -> dg.MaterializeResult:
    """Titan Text Embeddings v2 vectors of each chunk (`conversation_chunks.embedding`), the
    production search path behind the match_conversation_chunks RPCs, stored at half precision
    (halfvec). Each row records what made it: Amazon Bedrock, or the local Bedrock endpoint when
    no AWS credentials are configured."""
    return dg.MaterializeResult(metadata=embed_titan(context.log, postgres, bedrock, chunker))
