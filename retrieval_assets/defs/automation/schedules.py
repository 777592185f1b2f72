"""Ingestion every 15 minutes (the nightly consistency check spans every stage: definitions.py).

Ingestion materializes the conversations and their chunks; the vector assets and the coarse
index follow through their AutomationConditions once the automation sensor is on, and the
backlog sensors catch whatever that leaves NULL.
"""

from datetime import timedelta

import dagster as dg

from retrieval_assets.defs.conversations.assets import (
    CONVERSATIONS,
    LANCEDB_CHUNKS,
    POSTGRES_CHUNKS,
)

# The freshness every asset is held to (definitions.py applies it to all): the whole graph follows
# ingestion, so an asset not updated for 4 ingestion ticks warns, and one not updated for 6 hours
# fails (the UI shows each asset's freshness; dagster.yaml enables the evaluation).
INGESTION_FRESHNESS = dg.FreshnessPolicy.time_window(
    fail_window=timedelta(hours=6), warn_window=timedelta(hours=1)
)

ingestion_job = dg.define_asset_job(
    "ingestion_job",
    selection=dg.AssetSelection.assets(CONVERSATIONS, POSTGRES_CHUNKS, LANCEDB_CHUNKS),
    description="Read new and changed conversations and re-chunk them in both stores.",
)
ingestion_schedule = dg.ScheduleDefinition(
    name="ingestion_schedule",
    job=ingestion_job,
    cron_schedule="*/15 * * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Ingest the conversation source every 15 minutes.",
)
