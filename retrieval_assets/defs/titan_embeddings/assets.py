"""Bedrock Titan Text Embeddings v2 vectors of every chunk, in Postgres (pgvector, HNSW)."""

import time

import dagster as dg

from retrieval_assets.defs.conversations.assets import POSTGRES_CHUNKS
from retrieval_assets.lib.bedrock import BedrockResource
from retrieval_assets.lib.chunking import ChunkerResource
from retrieval_assets.lib.postgres import PostgresResource
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
QUARANTINE_CHECK = "no_quarantined_rows"
BEDROCK_POOL = "bedrock"
QUARANTINE_AFTER = 3


@dg.asset(
    key=TITAN_EMBEDDINGS,
    deps=[POSTGRES_CHUNKS],
    group_name="titan_embeddings",
    kinds={"postgres", "bedrock"},
    owners=["team:data-platform"],
    code_version="1",
    pool=BEDROCK_POOL,
    check_specs=[
        dg.AssetCheckSpec(
            QUARANTINE_CHECK,
            asset=TITAN_EMBEDDINGS,
            description="No chunk is quarantined after repeated Titan "
            "failures (replay with `retrieval-assets replay-quarantine`).",
        )
    ],
)
def titan_embeddings(
    context: dg.AssetExecutionContext,
    postgres: PostgresResource,
    bedrock: BedrockResource,
    chunker: ChunkerResource,
) -> dg.MaterializeResult:
    """Titan Text Embeddings v2 vectors of each chunk (`conversation_chunks.embedding`), the
    production search path behind the match_conversation_chunks RPCs. Each row records what made
    it: Amazon Bedrock, or the local Bedrock endpoint when no AWS credentials are configured."""
    started = time.monotonic()
    source = "local Bedrock endpoint" if bedrock.is_local else "Amazon Bedrock"
    with postgres.get_connection() as conn:
        conn.autocommit = True  # each batch commits on its own (see embed_pending)
        check_dimensions(conn, bedrock.dimensions)
        cleared = ensure_titan_model(conn, bedrock.label, bedrock.dimensions)
        if cleared:
            context.log.warning(
                f"{cleared} vectors from another model were cleared; "
                f"re-embedding with {bedrock.label}"
            )
        bulk = bulk_load(conn, backlog(conn))
        if bulk:
            context.log.info(
                "bulk load: the HNSW index is dropped while the rows are filled and "
                "built once at the end (Postgres searches scan exactly meanwhile)"
            )
            drop_hnsw(conn)
        build_seconds = 0.0
        try:
            stats = embed_pending(
                conn,
                bedrock,
                count_tokens=chunker.chunker.count_tokens,
                quarantine_after=QUARANTINE_AFTER,
                progress=context.log.info,
            )
        finally:
            if bulk:  # whatever happened, searches get their index back
                build_started = time.monotonic()
                build_hnsw(conn)
                build_seconds = time.monotonic() - build_started
                context.log.info(f"HNSW index rebuilt in {build_seconds:.1f}s")
        remaining, in_quarantine = backlog(conn), quarantined(conn)
    seconds = time.monotonic() - started
    context.log.info(
        f"{stats.embedded} chunks embedded by {source} in {seconds:.1f}s; "
        f"{stats.failed} failed, {in_quarantine} quarantined, {remaining} pending"
    )
    return dg.MaterializeResult(
        metadata={
            "model": bedrock.label,
            "vector_source": source,
            "dims": bedrock.dimensions,
            "rows_embedded": stats.embedded,
            "rows_failed": stats.failed,
            "rows_truncated": stats.truncated,
            "invoke_attempts": stats.attempts,
            "retries": max(stats.attempts - stats.embedded - stats.failed, 0),
            "newly_quarantined": stats.newly_quarantined,
            "quarantined": in_quarantine,
            "cleared_other_model": cleared,
            "rows_per_second": round(stats.embedded / seconds, 1) if seconds else 0.0,
            "nulls_remaining": remaining,
            "bulk_load": bulk,
            "hnsw_build_seconds": round(build_seconds, 1),
            **{f"local_endpoint_{k}": v for k, v in bedrock.endpoint_counts().items()},
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=QUARANTINE_CHECK,
                passed=in_quarantine == 0,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={"quarantined": in_quarantine},
            )
        ],
    )
