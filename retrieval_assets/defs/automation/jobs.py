"""The main job: the whole graph, source to index."""

import dagster as dg

# Named, not imported: the vector columns' definitions import this job, and the snapshot's module
# imports theirs (tests/test_definitions.py checks the name resolves to the check).
QUALITY_CHECK = dg.AssetCheckKey(dg.AssetKey(["lancedb", "search_snapshot"]), "retrieval_quality")
retrieval_job = dg.define_asset_job(
    "retrieval_job",
    # Every asset and check but the search-quality canary: it loads every model to search, which
    # a run with nothing new should not pay; the nightly consistency job runs it (and the UI).
    selection=dg.AssetSelection.all() - dg.AssetSelection.checks(QUALITY_CHECK),
    description="Read the conversation source and bring every downstream store up to date.",
)
