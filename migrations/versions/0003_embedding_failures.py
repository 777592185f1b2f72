"""embedding_failures: per-row Titan failures, attempts and quarantine.

A row whose embedding keeps failing stays NULL; after `max_attempts` runs it is quarantined
(skipped by later runs, visible in metadata and the UI) until `retrieval-assets replay-quarantine`
releases it.
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE embedding_failures (
            chunk_id         text PRIMARY KEY
                             REFERENCES conversation_chunks (chunk_id) ON DELETE CASCADE,
            attempts         integer NOT NULL,
            last_error       text NOT NULL,
            first_failed_at  timestamptz NOT NULL DEFAULT now(),
            last_failed_at   timestamptz NOT NULL DEFAULT now(),
            quarantined_at   timestamptz
        )
        """
    )
    op.execute(
        "CREATE INDEX embedding_failures_quarantined_idx ON embedding_failures (chunk_id) "
        "WHERE quarantined_at IS NOT NULL"
    )


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS embedding_failures")
