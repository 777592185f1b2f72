"""Row-level security where the database is Supabase: a user reads only their own rows.

Applied when Supabase's API roles and `auth.uid()` exist. Then:
- conversations and conversation_chunks: RLS on, one SELECT policy for `authenticated` —
  `user_id = auth.uid()` — and no write policy (only the pipeline writes);
- the pipeline's bookkeeping tables (embedding_failures, embedding_schema_versions,
  alembic_version): RLS on with no policy, so the API roles see none of them;
- the match functions stay SECURITY INVOKER (sql/match_conversation_chunks.sql), so the caller's
  policy applies inside them; `authenticated` may execute them.
The pipeline's own role owns these tables, and owners are not subject to RLS (it is not FORCEd),
so ingestion and backfills are unaffected. On plain Postgres (the embedded default) nothing here
applies: no API role reads the database.
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

USER_TABLES = ("conversations", "conversation_chunks")
PRIVATE_TABLES = ("embedding_failures", "embedding_schema_versions", "alembic_version")
FUNCTIONS = (
    "match_conversation_chunks(vector, double precision, integer, text)",
    "match_conversation_chunks_by_tier(vector, text, double precision, integer, text)",
)


# One DO block, so that the condition is decided by the database it runs on — also when the
# migration is rendered as SQL (`alembic upgrade --sql`) for someone to apply by hand.
IS_SUPABASE = (
    "to_regrole('authenticated') IS NOT NULL AND to_regrole('anon') IS NOT NULL "
    "AND to_regprocedure('auth.uid()') IS NOT NULL"
)


def _when_supabase(statements: list[str]) -> None:
    body = "\n".join(f"    EXECUTE {_literal(s)};" for s in statements)
    op.execute(f"DO $rls$\nBEGIN\n  IF {IS_SUPABASE} THEN\n{body}\n  END IF;\nEND\n$rls$")


def _literal(statement: str) -> str:
    return "'" + statement.replace("'", "''") + "'"


def upgrade() -> None:
    statements = []
    for table in USER_TABLES:
        statements += [
            f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
            f"CREATE POLICY {table}_owner_reads ON {table} FOR SELECT TO authenticated "
            "USING (user_id = (SELECT auth.uid())::text)",
            f"REVOKE ALL ON {table} FROM anon, authenticated",
            f"GRANT SELECT ON {table} TO authenticated",
        ]
    for table in PRIVATE_TABLES:
        statements += [
            f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
            f"REVOKE ALL ON {table} FROM anon, authenticated",
        ]
    for function in FUNCTIONS:
        statements += [
            f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC, anon",
            f"GRANT EXECUTE ON FUNCTION {function} TO authenticated",
        ]
    _when_supabase(statements)


def downgrade() -> None:
    statements = [f"GRANT EXECUTE ON FUNCTION {function} TO PUBLIC" for function in FUNCTIONS]
    statements += [f"ALTER TABLE {t} DISABLE ROW LEVEL SECURITY" for t in PRIVATE_TABLES]
    for table in USER_TABLES:
        statements += [
            f"DROP POLICY IF EXISTS {table}_owner_reads ON {table}",
            f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY",
        ]
    _when_supabase(statements)
