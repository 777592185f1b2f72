"""Schedules: ingestion every 15 minutes, and a nightly consistency check of both stores.

Ingestion materializes the conversations and their chunks; the vector assets and the coarse
index follow through their AutomationConditions once the automation sensor is on, and the
backlog sensors catch whatever that leaves NULL.
"""

import dagster as dg

from retrieval_assets.defs.coarse_index.assets import coarse_recall
from retrieval_assets.defs.conversations.assets import (
    CONVERSATIONS,
    LANCEDB_CHUNKS,
    POSTGRES_CHUNKS,
)
from retrieval_assets.defs.conversations.checks import chunk_counts_agree
from retrieval_assets.defs.local_embeddings.checks import local_vector_checks
from retrieval_assets.defs.titan_embeddings.checks import titan_checks

ingestion_job = dg.define_asset_job(
    "ingestion_job",
    selection=dg.AssetSelection.assets(CONVERSATIONS, POSTGRES_CHUNKS, LANCEDB_CHUNKS),
    description="Read new and changed conversations and re-chunk them in both stores.",
)
consistency_check_job = dg.define_asset_job(
    "consistency_check_job",
    # The store-level checks; checks computed inside an asset's materialization need the asset.
    selection=dg.AssetSelection.checks(
        chunk_counts_agree, local_vector_checks, titan_checks, coarse_recall
    ),
    description="Every store-level check: NULL backlogs, dims, norms, chunk counts, ANN recall, "
    "quarantine. Reads only; materializes nothing.",
)

ingestion_schedule = dg.ScheduleDefinition(
    name="ingestion_schedule",
    job=ingestion_job,
    cron_schedule="*/15 * * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Ingest the conversation source every 15 minutes.",
)
nightly_consistency_schedule = dg.ScheduleDefinition(
    name="nightly_consistency_schedule",
    job=consistency_check_job,
    cron_schedule="30 2 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Run every store-level asset check at 02:30 UTC.",
)
