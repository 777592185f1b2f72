"""Titan vectors at half precision: conversation_chunks.embedding vector(N) -> halfvec(N).

Why: a 1024-d vector is 4 kB, so every Titan write moved 4 kB through the TOAST table and the WAL
and the HNSW index held 4 kB per row. halfvec halves all three. Titan's vectors are normalised
(components well inside halfvec's range, about three significant digits each), and the ranking
is unchanged within the benchmark's recall (tests/benchmarks/test_titan_bench.py measures
recall@10 against exact float32 search). The stored vectors are converted, not cleared: the same
model made them, so the column's producer (embedding_schema_versions) does not change.

The match functions keep taking `vector` (what clients send) and cast the query once to halfvec,
so the HNSW index (halfvec_cosine_ops) serves them. Re-typing rewrites the table under an
exclusive lock: on a large production table, run it in a quiet window.
"""

from pathlib import Path

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

MATCH_EF_SEARCH_FLOOR = 100  # as revision 0004 set it

HNSW_INDEX = "conversation_chunks_embedding_hnsw"


def hnsw_index_sql(column_type: str) -> str:
    return (
        f"CREATE INDEX IF NOT EXISTS {HNSW_INDEX} ON conversation_chunks "
        f"USING hnsw (embedding {column_type}_cosine_ops) WITH (m = 16, ef_construction = 64)"
    )


# The functions as revisions 0001, 0004 and 0006 install them; sql/ sits beside migrations/ in
# the checkout and in the wheel, and the file is frozen (a change is a new file).
_MATCH_SQL = Path(__file__).parents[2] / "sql" / "match_conversation_chunks_v1.sql"


def match_functions_sql(ef_search_floor: int, column_type: str) -> str:
    return (
        _MATCH_SQL.read_text()
        .replace("{ef_search_floor}", str(ef_search_floor))
        .replace("{embedding_type}", column_type)
    )


def _retype(column_type: str) -> None:
    op.execute(f"DROP INDEX IF EXISTS {HNSW_INDEX}")
    op.execute(
        f"""
        DO $$
        DECLARE dims integer;
        BEGIN
            SELECT atttypmod INTO dims FROM pg_attribute
            WHERE attrelid = 'conversation_chunks'::regclass AND attname = 'embedding';
            EXECUTE format(
                'ALTER TABLE conversation_chunks ALTER COLUMN embedding TYPE {column_type}(%s) '
                'USING embedding::{column_type}(%s)', dims, dims);
        END $$
        """
    )
    op.execute(hnsw_index_sql(column_type))
    op.execute(match_functions_sql(MATCH_EF_SEARCH_FLOOR, column_type))


def upgrade() -> None:
    _retype("halfvec")


def downgrade() -> None:
    _retype("vector")
