"""The checks every vector column has, whichever store holds it: their names, what they
promise, and how an outcome is judged (each store measures; this decides)."""

from retrieval_assets.lib.columns import CheckOutcome, CheckSpec

NULL_BACKLOG = "null_backlog"
DIMS_MATCH = "dims_match_declared"
UNIT_NORMS = "unit_norms"
NULL_BACKLOG_WARN_ROWS = 1_000  # past this, the backfill sensor is off or failing
NORM_TOLERANCE = 1e-3
NORM_SAMPLE = 1_000

# The checks both stores share (the Postgres store adds its own).
SHARED_CHECKS = (
    CheckSpec(
        NULL_BACKLOG,
        f"Fewer than {NULL_BACKLOG_WARN_ROWS} chunks wait for a vector.",
        warn=True,
    ),
    CheckSpec(
        DIMS_MATCH,
        "The column's stored size equals the dims recorded for its model.",
    ),
    CheckSpec(
        UNIT_NORMS,
        f"A sample of {NORM_SAMPLE} vectors has L2 norm 1 (± {NORM_TOLERANCE}).",
    ),
)


def null_backlog(nulls: int) -> CheckOutcome:
    return CheckOutcome(
        NULL_BACKLOG,
        nulls < NULL_BACKLOG_WARN_ROWS,
        {"null_rows": nulls, "warn_at": NULL_BACKLOG_WARN_ROWS},
    )


def unit_norms(sampled: int, worst: float) -> CheckOutcome:
    return CheckOutcome(
        UNIT_NORMS, worst <= NORM_TOLERANCE, {"sampled": sampled, "max_norm_deviation": worst}
    )
