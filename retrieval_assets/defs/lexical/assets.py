"""The lexical (BM25) index of each store, kept current after chunks change, with a check that
it covers every chunk."""

import dagster as dg

from retrieval_assets.defs.conversations.assets import POSTGRES_CHUNKS
from retrieval_assets.defs.vectors.columns import asset_key
from retrieval_assets.lib.columns import COARSE, FINE
from retrieval_assets.lib.lancedb_store import LanceDBResource
from retrieval_assets.lib.lexical import (
    LANCEDB_INDEX,
    POSTGRES_INDEX,
    TEXT_COLUMN,
    ensure_lancedb_index,
    lancedb_index_state,
    postgres_lexical_health,
    refresh_postgres_lexicon,
)
from retrieval_assets.lib.postgres import PostgresResource
from retrieval_assets.lib.reporting import arrow_column_schema, postgres_column_schema

LANCEDB_LEXICAL = dg.AssetKey(["lancedb", "lexical_index"])
POSTGRES_LEXICAL = dg.AssetKey(["postgres", "lexical_index"])
GROUP = "lexical"
COVERS_CHECK = "lexical_index_covers_chunks"


@dg.asset(
    key=LANCEDB_LEXICAL,
    # After the vectors are written (the coarse index after it): folding rows in commits a new
    # table version, which would race the vector fills' commits.
    deps=[asset_key(COARSE), asset_key(FINE)],
    group_name=GROUP,
    kinds={"lancedb"},
    owners=["team:data-platform"],
    code_version="1",
    automation_condition=dg.AutomationCondition.eager(),
)
def lancedb_lexical_index(
    context: dg.AssetExecutionContext, lancedb: LanceDBResource
) -> dg.MaterializeResult:
    """LanceDB's native full-text (BM25) index over chunk text: English stemming, stop words
    removed. Built once, then each run folds the chunks written since into it; until then
    those chunks are still searched, by a scan."""
    with lancedb.get_connection() as db:
        table = lancedb.chunks_table(db)
        state = ensure_lancedb_index(table)
        columns = arrow_column_schema(table.schema, ["chunk_id", "user_id", TEXT_COLUMN])
    context.log.info(
        f"lexical index {state.action}: {state.indexed_rows} rows indexed, "
        f"{state.unindexed_rows} not yet"
    )
    return dg.MaterializeResult(
        metadata={"index": LANCEDB_INDEX, **state.metadata(), "dagster/column_schema": columns}
    )


@dg.asset_check(
    asset=LANCEDB_LEXICAL,
    name=COVERS_CHECK,
    description="The full-text index exists and every chunk in the table is in it.",
)
def lancedb_lexical_covers(lancedb: LanceDBResource) -> dg.AssetCheckResult:
    with lancedb.get_connection() as db:
        table = lancedb.chunks_table(db)
        state, rows = lancedb_index_state(table), table.count_rows()
    if state is None:
        return dg.AssetCheckResult(passed=False, metadata={"index": "missing", "rows": rows})
    indexed, unindexed = state
    return dg.AssetCheckResult(
        passed=unindexed == 0,
        metadata={"rows": rows, "indexed_rows": indexed, "unindexed_rows": unindexed},
    )


@dg.asset(
    key=POSTGRES_LEXICAL,
    deps=[POSTGRES_CHUNKS],
    group_name=GROUP,
    kinds={"postgres"},
    owners=["team:data-platform"],
    code_version="1",
    automation_condition=dg.AutomationCondition.eager(),
)
def postgres_lexical_index(
    context: dg.AssetExecutionContext, postgres: PostgresResource
) -> dg.MaterializeResult:
    """BM25 in Postgres: the generated tsvector column (GIN index) matches every chunk as it is
    written; this rebuilds the per-user statistics (document frequencies, mean length) of the
    users whose chunks changed, which match_conversation_chunks_lexical and _hybrid score with."""
    with postgres.get_connection() as conn:
        state = refresh_postgres_lexicon(conn)
        columns = postgres_column_schema(
            conn, "conversation_chunks", ["chunk_id", "user_id", "content_tsv", "content_tokens"]
        )
    context.log.info(f"lexical statistics {state.action}: {state.indexed_rows} chunks covered")
    return dg.MaterializeResult(
        metadata={"index": POSTGRES_INDEX, **state.metadata(), "dagster/column_schema": columns}
    )


@dg.asset_check(
    asset=POSTGRES_LEXICAL,
    name=COVERS_CHECK,
    description="The GIN index over content_tsv is valid and every user's BM25 statistics "
    "match their chunks.",
)
def postgres_lexical_covers(postgres: PostgresResource) -> dg.AssetCheckResult:
    with postgres.get_connection() as conn:
        health = postgres_lexical_health(conn)
    return dg.AssetCheckResult(
        passed=health.index_valid and health.stale_users == 0,
        metadata={
            "gin_index_valid": health.index_valid,
            "stale_users": health.stale_users,
            "unindexed_rows": health.stale_chunks,
        },
    )
