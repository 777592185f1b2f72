"""The main job: the whole graph, source to index."""

import dagster as dg

retrieval_job = dg.define_asset_job(
    "retrieval_job",
    selection=dg.AssetSelection.all(),
    description="Read the conversation source and bring every downstream store up to date.",
)
