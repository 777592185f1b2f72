"""Store-level checks of the Titan column in Postgres: backlog, dimensions, norms, quarantine."""

from collections.abc import Iterator

import dagster as dg

from retrieval_assets.defs.local_embeddings.checks import (
    DIMS_MATCH,
    NORM_SAMPLE,
    NORM_TOLERANCE,
    NULL_BACKLOG,
    NULL_BACKLOG_WARN_ROWS,
    UNIT_NORMS,
    null_backlog_result,
    only_selected,
    unit_norms_result,
)
from retrieval_assets.defs.titan_embeddings.assets import TITAN_EMBEDDINGS
from retrieval_assets.lib.bedrock import BedrockResource
from retrieval_assets.lib.connection import one
from retrieval_assets.lib.postgres import PostgresResource
from retrieval_assets.lib.schema import embedding_dims
from retrieval_assets.lib.titan import backlog, quarantined

NO_QUARANTINE = "no_quarantined_rows"


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(
            NULL_BACKLOG,
            asset=TITAN_EMBEDDINGS,
            description=f"Fewer than {NULL_BACKLOG_WARN_ROWS} chunks wait for a Titan vector.",
        ),
        dg.AssetCheckSpec(
            DIMS_MATCH,
            asset=TITAN_EMBEDDINGS,
            description="conversation_chunks.embedding has the configured TITAN_DIMENSIONS.",
        ),
        dg.AssetCheckSpec(
            UNIT_NORMS,
            asset=TITAN_EMBEDDINGS,
            description=f"A sample of {NORM_SAMPLE} Titan vectors has L2 norm 1 "
            f"(± {NORM_TOLERANCE}; the resource asks Titan to normalize).",
        ),
        dg.AssetCheckSpec(
            NO_QUARANTINE,
            asset=TITAN_EMBEDDINGS,
            description="No chunk is quarantined after repeated Titan failures "
            "(replay with `retrieval-assets replay-quarantine`).",
        ),
    ],
    can_subset=True,
)
def titan_checks(
    context: dg.AssetCheckExecutionContext, postgres: PostgresResource, bedrock: BedrockResource
) -> Iterator[dg.AssetCheckResult]:
    yield from only_selected(context, list(_titan_checks(postgres, bedrock)))


def _titan_checks(
    postgres: PostgresResource, bedrock: BedrockResource
) -> Iterator[dg.AssetCheckResult]:
    with postgres.get_connection() as conn:
        pending, in_quarantine, stored = backlog(conn), quarantined(conn), embedding_dims(conn)
        lo, hi, sampled = one(
            conn,
            "SELECT coalesce(min(n), 1), coalesce(max(n), 1), count(*) FROM (SELECT "
            "l2_norm(embedding) AS n FROM conversation_chunks WHERE embedding IS NOT NULL "
            "LIMIT %s) s",
            [NORM_SAMPLE],
        )
    yield null_backlog_result(TITAN_EMBEDDINGS, pending)
    yield dg.AssetCheckResult(
        asset_key=TITAN_EMBEDDINGS,
        check_name=DIMS_MATCH,
        passed=stored == bedrock.dimensions,
        metadata={"stored_dims": stored, "declared_dims": bedrock.dimensions},
    )
    yield unit_norms_result(TITAN_EMBEDDINGS, sampled, float(max(abs(lo - 1), abs(hi - 1))))
    yield dg.AssetCheckResult(
        asset_key=TITAN_EMBEDDINGS,
        check_name=NO_QUARANTINE,
        passed=in_quarantine == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"quarantined": in_quarantine},
    )
