"""Match functions: hnsw.ef_search floor 40 -> 100.

Measured at 250,000 rows of real text (1024-d, m=16, ef_construction=64; tests/benchmarks):
ef_search 40 gave recall@10 0.943, 100 gives 0.976 at p50 8 ms.
"""

from pathlib import Path

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# The functions as revisions 0001, 0004 and 0006 install them; sql/ sits beside migrations/ in
# the checkout and in the wheel, and the file is frozen (a change is a new file).
_MATCH_SQL = Path(__file__).parents[2] / "sql" / "match_conversation_chunks_v1.sql"


def match_functions_sql(ef_search_floor: int, column_type: str) -> str:
    return (
        _MATCH_SQL.read_text()
        .replace("{ef_search_floor}", str(ef_search_floor))
        .replace("{embedding_type}", column_type)
    )


def _install(floor: int) -> None:
    op.execute(match_functions_sql(floor, "vector"))


def upgrade() -> None:
    _install(100)


def downgrade() -> None:
    _install(40)
