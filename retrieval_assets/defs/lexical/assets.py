"""The lexical (BM25) index of each store, kept current after chunks change, with a check that
it covers every chunk."""

from collections.abc import Iterator
from typing import Any

import dagster as dg

from retrieval_assets.defs.checked import asset_spec, checked_asset, materializing, wanted
from retrieval_assets.defs.conversations.assets import POSTGRES_CHUNKS
from retrieval_assets.defs.vectors.columns import asset_key
from retrieval_assets.lib.columns import COARSE, FINE
from retrieval_assets.lib.lancedb_store import LanceDBResource
from retrieval_assets.lib.lexical import (
    LANCEDB_INDEX,
    POSTGRES_INDEX,
    TEXT_COLUMN,
    LexicalState,
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


@checked_asset(
    # After the vectors are written (the coarse index after it): folding rows in commits a new
    # table version, which would race the vector fills' commits.
    asset_spec(
        LANCEDB_LEXICAL,
        deps=[asset_key(COARSE), asset_key(FINE)],
        group_name=GROUP,
        kinds={"lancedb"},
        description="LanceDB's native full-text (BM25) index over chunk text: English "
        "stemming, stop words removed. Built once, then each run folds the chunks written since "
        "into it; until then those chunks are still searched, by a scan.",
    ),
    [
        dg.AssetCheckSpec(
            COVERS_CHECK,
            asset=LANCEDB_LEXICAL,
            description="The full-text index exists and every chunk in the table is in it.",
        )
    ],
)
def lancedb_lexical_index(
    context: dg.AssetExecutionContext, lancedb: LanceDBResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    with lancedb.get_connection() as db:
        table = lancedb.chunks_table(db)
        if materializing(context, LANCEDB_LEXICAL):
            state = ensure_lancedb_index(table)
            columns = arrow_column_schema(table.schema, ["chunk_id", "user_id", TEXT_COLUMN])
            context.log.info(
                f"lexical index {state.action}: {state.indexed_rows} rows indexed, "
                f"{state.unindexed_rows} not yet"
            )
            yield _index_state(LANCEDB_LEXICAL, LANCEDB_INDEX, state, columns)
        if wanted(context, LANCEDB_LEXICAL, COVERS_CHECK):
            yield _lancedb_covers(table)


def _lancedb_covers(table: Any) -> dg.AssetCheckResult:
    state, rows = lancedb_index_state(table), table.count_rows()
    if state is None:
        return dg.AssetCheckResult(
            asset_key=LANCEDB_LEXICAL,
            check_name=COVERS_CHECK,
            passed=False,
            metadata={"index": "missing", "rows": rows},
        )
    indexed, unindexed = state
    return dg.AssetCheckResult(
        asset_key=LANCEDB_LEXICAL,
        check_name=COVERS_CHECK,
        passed=unindexed == 0,
        metadata={"rows": rows, "indexed_rows": indexed, "unindexed_rows": unindexed},
    )


@checked_asset(
    asset_spec(
        POSTGRES_LEXICAL,
        deps=[POSTGRES_CHUNKS],
        group_name=GROUP,
        kinds={"postgres"},
        description="BM25 in Postgres: the generated tsvector column (GIN index) matches every "
        "chunk as it is written; this rebuilds the per-user statistics (document frequencies, "
        "mean length) of the users whose chunks changed, which "
        "match_conversation_chunks_lexical and _hybrid score with.",
    ),
    [
        dg.AssetCheckSpec(
            COVERS_CHECK,
            asset=POSTGRES_LEXICAL,
            description="The GIN index over content_tsv is valid and every user's BM25 "
            "statistics match their chunks.",
        )
    ],
)
def postgres_lexical_index(
    context: dg.AssetExecutionContext, postgres: PostgresResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    with postgres.get_connection() as conn:
        if materializing(context, POSTGRES_LEXICAL):
            state = refresh_postgres_lexicon(conn)
            columns = postgres_column_schema(
                conn,
                "conversation_chunks",
                ["chunk_id", "user_id", "content_tsv", "content_tokens"],
            )
            context.log.info(
                f"lexical statistics {state.action}: {state.indexed_rows} chunks covered"
            )
            yield _index_state(POSTGRES_LEXICAL, POSTGRES_INDEX, state, columns)
        if wanted(context, POSTGRES_LEXICAL, COVERS_CHECK):
            health = postgres_lexical_health(conn)
            yield dg.AssetCheckResult(
                asset_key=POSTGRES_LEXICAL,
                check_name=COVERS_CHECK,
                passed=health.index_valid and health.stale_users == 0,
                metadata={
                    "gin_index_valid": health.index_valid,
                    "stale_users": health.stale_users,
                    "unindexed_rows": health.stale_chunks,
                },
            )


def _index_state(
    key: dg.AssetKey, index: str, state: LexicalState, columns: dg.TableSchema
) -> dg.MaterializeResult:
    return dg.MaterializeResult(
        asset_key=key,
        metadata={"index": index, **state.metadata(), "dagster/column_schema": columns},
    )
