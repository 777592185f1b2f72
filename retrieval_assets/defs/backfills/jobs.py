"""Backfill jobs: one per vector column, partitioned by hash shard of the chunk id.

A backfill of a column fans out as one run per shard with work (16 shards: the first hex digit of
the content-derived chunk id, equal-sized however many users there are). Runs go through the
instance's run queue and launcher, so the same code spreads over Kubernetes pods or Celery workers
with a cluster run launcher (README). Each run drains its shard in bounded batches addressed by
chunk id, picks up rows that arrive while it runs, and reports a materialization of the column's
asset with its figures.
"""

import dagster as dg

from retrieval_assets.defs.local_embeddings.assets import (
    FASTEMBED_VECTORS,
    LOCAL_MODELS_POOL,
    ST_VECTORS,
    fill_column,
)
from retrieval_assets.defs.titan_embeddings.assets import (
    BEDROCK_POOL,
    TITAN_EMBEDDINGS,
    embed_titan,
)
from retrieval_assets.lib.shards import SHARD_KEYS
from retrieval_assets.lib.vectors import FASTEMBED_COLUMN, ST_COLUMN

SHARDS = dg.StaticPartitionsDefinition(list(SHARD_KEYS))
COLUMN_TAG = "retrieval/column"


def _report(context: dg.OpExecutionContext, asset_key: dg.AssetKey, metadata: dict) -> None:
    context.log_event(
        dg.AssetMaterialization(
            asset_key=asset_key,
            description=f"backfill of shard {context.partition_key}",
            metadata=metadata,
        )
    )


def _lancedb_backfill(
    name: str, column: str, asset_key: dg.AssetKey, model_key: str
) -> dg.JobDefinition:
    @dg.op(
        name=f"fill_{name}_shard",
        required_resource_keys={"postgres", "lancedb", model_key},
        pool=LOCAL_MODELS_POOL,
        description=f"Embed the NULL `{column}` rows of one shard with the {model_key} model.",
    )
    def fill_shard(context: dg.OpExecutionContext) -> None:
        resources = context.resources
        metadata = fill_column(
            context.log,
            resources.postgres,
            resources.lancedb,
            getattr(resources, model_key),
            column,
            shard=context.partition_key,
        )
        _report(context, asset_key, metadata)

    @dg.job(
        name=f"{name}_backfill",
        partitions_def=SHARDS,
        tags={COLUMN_TAG: column},
        description=f"Fill NULL `{column}` vectors in LanceDB, one hash shard per run.",
    )
    def backfill() -> None:
        fill_shard()

    return backfill


fastembed_backfill = _lancedb_backfill(
    "fastembed", FASTEMBED_COLUMN, FASTEMBED_VECTORS, "fastembed"
)
sentence_transformer_backfill = _lancedb_backfill(
    "sentence_transformer", ST_COLUMN, ST_VECTORS, "sentence_transformer"
)


@dg.op(
    required_resource_keys={"postgres", "bedrock", "chunker"},
    pool=BEDROCK_POOL,
    description="Embed the pending Titan rows of one shard through Bedrock.",
)
def fill_titan_shard(context: dg.OpExecutionContext) -> None:
    resources = context.resources
    metadata = embed_titan(
        context.log,
        resources.postgres,
        resources.bedrock,
        resources.chunker,
        shard=context.partition_key,
    )
    _report(context, TITAN_EMBEDDINGS, metadata)


@dg.job(
    name="titan_backfill",
    partitions_def=SHARDS,
    tags={COLUMN_TAG: "embedding"},
    description="Fill NULL Titan vectors in Postgres, one hash shard per run (HNSW kept).",
)
def titan_backfill() -> None:
    fill_titan_shard()


BACKFILL_JOBS = {
    FASTEMBED_COLUMN: fastembed_backfill,
    ST_COLUMN: sentence_transformer_backfill,
    "embedding": titan_backfill,
}
