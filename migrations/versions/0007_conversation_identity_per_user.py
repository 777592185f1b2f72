"""Conversation identity per user: a conversation is (user_id, external_id), never the export's
id alone.

Before this revision `conversations.id` was the export's id, global across users and sources, so
another user's export that reused an id took the stored conversation over (owner, text, chunks,
vectors). From here `external_id` holds the export's id, unique per user, and `id` is the stored
key the chunks hang on. New conversations get a key derived from (user_id, external_id); the rows
stored before keep theirs (their key is their export id), so no chunk id, chunk or vector
changes. Downgrade is refused once two users' conversations share an export id (the old schema
cannot hold both). Frozen: plain SQL, nothing imported from the package.
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE conversations ADD COLUMN external_id text")
    op.execute("UPDATE conversations SET external_id = id")
    op.execute("ALTER TABLE conversations ALTER COLUMN external_id SET NOT NULL")
    op.execute(
        "CREATE UNIQUE INDEX conversations_user_external_id ON conversations (user_id, external_id)"
    )


def downgrade() -> None:
    op.execute(
        """
        DO $downgrade$
        BEGIN
          IF EXISTS (SELECT 1 FROM conversations WHERE id <> external_id) THEN
            RAISE EXCEPTION 'cannot downgrade below 0007: conversations stored under per-user '
              'keys exist (two users may share an export id, which the old schema cannot hold)';
          END IF;
        END
        $downgrade$
        """
    )
    op.execute("DROP INDEX IF EXISTS conversations_user_external_id")
    op.execute("ALTER TABLE conversations DROP COLUMN external_id")
