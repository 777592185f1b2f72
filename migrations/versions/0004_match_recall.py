"""Match functions: hnsw.ef_search floor 40 -> 100.

Measured at 250,000 rows of real text (1024-d, m=16, ef_construction=64; tests/benchmarks):
ef_search 40 gave recall@10 0.943, 100 gives 0.976 at p50 8 ms.
"""

from alembic import op

from retrieval_assets.lib.schema import match_functions_sql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _install(floor: int) -> None:
    op.execute(match_functions_sql(floor, "vector"))


def upgrade() -> None:
    _install(100)


def downgrade() -> None:
    _install(40)
