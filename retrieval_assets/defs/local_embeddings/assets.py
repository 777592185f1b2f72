"""FastEmbed (coarse) and sentence-transformers (fine) vectors of every chunk, in LanceDB.

One asset per column: if one model fails, its column stays NULL for the backfill and the other
column is unaffected — a column is only ever filled by its own model.
"""

from typing import Any

import dagster as dg

from retrieval_assets.defs.conversations.assets import LANCEDB_CHUNKS
from retrieval_assets.lib.embedders import FastEmbedResource, SentenceTransformerResource
from retrieval_assets.lib.lancedb_store import (
    LanceDBResource,
    explain_write_errors,
    on_latest_version,
)
from retrieval_assets.lib.postgres import PostgresResource
from retrieval_assets.lib.shards import lancedb_filter
from retrieval_assets.lib.vectors import (
    FASTEMBED_COLUMN,
    ST_COLUMN,
    column_dims,
    ensure_vector_column,
    fill_nulls,
    registered_model,
)

FASTEMBED_VECTORS = dg.AssetKey(["lancedb", "fastembed_vectors"])
ST_VECTORS = dg.AssetKey(["lancedb", "sentence_transformer_vectors"])
GROUP = "local_embeddings"
# Steps that run a local model over the corpus (both column assets and their shard backfills)
# share one pool, limit 1 by default (dagster.yaml): on CPU each model's thread pool already takes
# every core, and two fills at once also collide on the same table (each skips the rows the other
# rewrote meanwhile, and redoes them later).
LOCAL_MODELS_POOL = "local_models"


class ColumnNotMigrated(RuntimeError):
    """A shard backfill met a column that its asset has not migrated to the configured model."""


def fill_column(
    log: dg.DagsterLogManager,
    postgres: PostgresResource,
    lancedb: LanceDBResource,
    embedder: FastEmbedResource | SentenceTransformerResource,
    column: str,
    shard: str | None = None,
) -> dict[str, Any]:
    """Fill `column`'s NULL rows (of one hash `shard`, or all); returns the run's metadata.

    Only a whole-column run (the asset) creates or migrates the column: shard runs proceed in
    parallel and must all write the same vector space, so they refuse a column not yet migrated.
    """
    with (
        postgres.get_connection() as conn,
        lancedb.get_connection() as db,
        explain_write_errors(lancedb.location),
    ):
        if shard is None:
            # Two columns can change schema at once (both assets run in parallel): a commit
            # conflict re-opens the table and decides again on its latest version.
            action, table = on_latest_version(
                lambda: lancedb.chunks_table(db),
                lambda t: ensure_vector_column(
                    t, conn, column, embedder.label, lambda: embedder.dims
                ),
            )
            if action != "unchanged":
                log.info(f"{column}: column {action} for {embedder.label}")
        else:
            action, table = "unchanged", lancedb.chunks_table(db)
            registered = registered_model(conn, column)
            if (
                column_dims(table, column) is None
                or not registered
                or registered[0] != (embedder.label)
            ):
                raise ColumnNotMigrated(
                    f"{column} is recorded for {registered and registered[0]}, not "
                    f"{embedder.label}: materialize its asset to migrate the column first"
                )
        dims = column_dims(table, column)
        result = fill_nulls(
            table,
            column,
            embedder.embed_documents,
            where=lancedb_filter(shard),
            write_rows=lancedb.write_batch_rows,
            progress=log.info,
        )
    log.info(
        f"{column}: embedded {result.embedded} rows in {result.seconds:.1f}s, "
        f"{result.skipped} already had vectors, {result.remaining} still NULL"
    )
    return {
        "model": embedder.label,
        "dims": dims,
        "column": column,
        "column_action": action,
        "shard": shard or "all",
        "rows_embedded": result.embedded,
        "rows_skipped": result.skipped,
        "rows_per_second": round(result.rate, 1),
        "tokens_embedded": result.tokens,
        "tokens_per_second": round(result.tokens / result.seconds, 1) if result.seconds else 0.0,
        "seconds": round(result.seconds, 2),
        "nulls_remaining": result.remaining,
    }


@dg.asset(
    key=FASTEMBED_VECTORS,
    deps=[LANCEDB_CHUNKS],
    group_name=GROUP,
    pool=LOCAL_MODELS_POOL,
    kinds={"lancedb", "onnx"},
    owners=["team:data-platform"],
    code_version="1",
    automation_condition=dg.AutomationCondition.eager(),
)
def fastembed_vectors(
    context: dg.AssetExecutionContext,
    postgres: PostgresResource,
    lancedb: LanceDBResource,
    fastembed: FastEmbedResource,
) -> dg.MaterializeResult:
    """FastEmbed vectors of each chunk (column `vector_fastembed`): the coarse space that the ANN
    index narrows a large history with. Only rows whose vector is NULL are embedded."""
    return dg.MaterializeResult(
        metadata=fill_column(context.log, postgres, lancedb, fastembed, FASTEMBED_COLUMN)
    )


@dg.asset(
    key=ST_VECTORS,
    deps=[LANCEDB_CHUNKS],
    group_name=GROUP,
    pool=LOCAL_MODELS_POOL,
    kinds={"lancedb", "pytorch"},
    owners=["team:data-platform"],
    code_version="1",
    automation_condition=dg.AutomationCondition.eager(),
)
def sentence_transformer_vectors(
    context: dg.AssetExecutionContext,
    postgres: PostgresResource,
    lancedb: LanceDBResource,
    sentence_transformer: SentenceTransformerResource,
) -> dg.MaterializeResult:
    """sentence-transformers vectors of each chunk (column `vector`): the fine space that reranks
    the coarse candidates. Only rows whose vector is NULL are embedded."""
    return dg.MaterializeResult(
        metadata=fill_column(context.log, postgres, lancedb, sentence_transformer, ST_COLUMN)
    )
