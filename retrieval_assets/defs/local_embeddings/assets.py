"""FastEmbed (coarse) and sentence-transformers (fine) vectors of every chunk, in LanceDB.

One asset per column: if one model fails, its column stays NULL for the backfill and the other
column is unaffected — a column is only ever filled by its own model.
"""

import dagster as dg

from retrieval_assets.defs.conversations.assets import LANCEDB_CHUNKS
from retrieval_assets.lib.embedders import FastEmbedResource, SentenceTransformerResource
from retrieval_assets.lib.lancedb_store import LanceDBResource
from retrieval_assets.lib.postgres import PostgresResource
from retrieval_assets.lib.vectors import (
    FASTEMBED_COLUMN,
    ST_COLUMN,
    column_dims,
    ensure_vector_column,
    fill_nulls,
)

FASTEMBED_VECTORS = dg.AssetKey(["lancedb", "fastembed_vectors"])
ST_VECTORS = dg.AssetKey(["lancedb", "sentence_transformer_vectors"])
GROUP = "local_embeddings"


def fill_column(
    context: dg.AssetExecutionContext,
    postgres: PostgresResource,
    lancedb: LanceDBResource,
    embedder: FastEmbedResource | SentenceTransformerResource,
    column: str,
) -> dg.MaterializeResult:
    with postgres.get_connection() as conn, lancedb.get_connection() as db:
        table = lancedb.chunks_table(db)
        action = ensure_vector_column(table, conn, column, embedder.label, lambda: embedder.dims)
        if action != "unchanged":
            context.log.info(f"{column}: column {action} for {embedder.label}")
        dims = column_dims(table, column)
        result = fill_nulls(table, column, embedder.embed_documents, progress=context.log.info)
    context.log.info(
        f"{column}: embedded {result.embedded} rows in {result.seconds:.1f}s, "
        f"{result.skipped} already had vectors, {result.remaining} still NULL"
    )
    return dg.MaterializeResult(
        metadata={
            "model": embedder.label,
            "dims": dims,
            "column": column,
            "column_action": action,
            "rows_embedded": result.embedded,
            "rows_skipped": result.skipped,
            "rows_per_second": round(result.rate, 1),
            "seconds": round(result.seconds, 2),
            "nulls_remaining": result.remaining,
        }
    )


@dg.asset(
    key=FASTEMBED_VECTORS,
    deps=[LANCEDB_CHUNKS],
    group_name=GROUP,
    kinds={"lancedb", "onnx"},
    owners=["team:data-platform"],
    code_version="1",
)
def fastembed_vectors(
    context: dg.AssetExecutionContext,
    postgres: PostgresResource,
    lancedb: LanceDBResource,
    fastembed: FastEmbedResource,
) -> dg.MaterializeResult:
    """FastEmbed vectors of each chunk (column `vector_fastembed`): the coarse space that the ANN
    index narrows a large history with. Only rows whose vector is NULL are embedded."""
    return fill_column(context, postgres, lancedb, fastembed, FASTEMBED_COLUMN)


@dg.asset(
    key=ST_VECTORS,
    deps=[LANCEDB_CHUNKS],
    group_name=GROUP,
    kinds={"lancedb", "pytorch"},
    owners=["team:data-platform"],
    code_version="1",
)
def sentence_transformer_vectors(
    context: dg.AssetExecutionContext,
    postgres: PostgresResource,
    lancedb: LanceDBResource,
    sentence_transformer: SentenceTransformerResource,
) -> dg.MaterializeResult:
    """sentence-transformers vectors of each chunk (column `vector`): the fine space that reranks
    the coarse candidates. Only rows whose vector is NULL are embedded."""
    return fill_column(context, postgres, lancedb, sentence_transformer, ST_COLUMN)
