"""HNSW index on the Titan vectors (m=16, ef_construction=64, cosine), replacing IVFFlat.

The seed deployments carried an IVFFlat index on conversation_chunks.embedding; the planner
would keep using it (and its recall depends on `lists`/`probes` tuned to the data at build
time), so every IVFFlat index on the table is dropped before the HNSW index is built.
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

HNSW_INDEX = "conversation_chunks_embedding_hnsw"


def hnsw_index_sql(column_type: str) -> str:
    return (
        f"CREATE INDEX IF NOT EXISTS {HNSW_INDEX} ON conversation_chunks "
        f"USING hnsw (embedding {column_type}_cosine_ops) WITH (m = 16, ef_construction = 64)"
    )


def upgrade() -> None:
    op.execute(
        """
        DO $$
        DECLARE idx record;
        BEGIN
            FOR idx IN
                SELECT i.relname FROM pg_index x
                JOIN pg_class i ON i.oid = x.indexrelid
                JOIN pg_am am ON am.oid = i.relam
                WHERE x.indrelid = 'conversation_chunks'::regclass AND am.amname = 'ivfflat'
            LOOP
                EXECUTE format('DROP INDEX %I', idx.relname);
            END LOOP;
        END $$
        """
    )
    op.execute(hnsw_index_sql("vector"))


def downgrade() -> None:
    op.execute(f"DROP INDEX IF EXISTS {HNSW_INDEX}")
