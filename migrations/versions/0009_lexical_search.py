"""Lexical and hybrid search: a full-text column with a GIN index, per-user BM25 statistics, and
the lexical and hybrid match functions (sql/match_conversation_chunks_lexical_v1.sql).

- conversation_chunks.content_tsv: to_tsvector('english', content), generated and stored, so
  every chunk written is searchable at once; content_tokens its length (BM25's document length).
  Adding stored generated columns rewrites the table under an exclusive lock: on a large
  production table, run it in a quiet window (`alembic upgrade head --sql` renders it for the
  Supabase SQL editor).
- chunk_lexicon / chunk_lexicon_stats: per-user document frequencies and mean lengths, rebuilt
  for the users whose chunks changed by refresh_chunk_lexicon() (the graph's lexical index asset).
- On Supabase the statistics are a user's own rows like their chunks (row-level security, read
  by `authenticated` for their own user id only) and the functions run as the caller.

The fusion's defaults (lexical weight, candidates per list) were chosen by leave-one-conversation-
out on the LoCoMo development split (tests/benchmarks/test_quality_bench.py); they are arguments,
so a caller may pass others. Frozen: plain SQL, nothing imported from the package.
"""

from pathlib import Path

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

LEXICAL_WEIGHT = 0.6
CANDIDATES = 50

_SQL = Path(__file__).parents[2] / "sql" / "match_conversation_chunks_lexical_v1.sql"

IS_SUPABASE = (
    "to_regrole('authenticated') IS NOT NULL AND to_regrole('anon') IS NOT NULL "
    "AND to_regprocedure('auth.uid()') IS NOT NULL"
)
USER_TABLES = ("chunk_lexicon", "chunk_lexicon_stats")
FUNCTIONS = (
    "match_conversation_chunks_lexical(text, integer, text, text)",
    "match_conversation_chunks_hybrid_by_tier"
    "(vector, text, text, integer, text, double precision, integer)",
    "match_conversation_chunks_hybrid(vector, text, integer, text, double precision)",
)


def _literal(statement: str) -> str:
    return "'" + statement.replace("'", "''") + "'"


def upgrade() -> None:
    # A document's length in tokens (stop words excluded), for the generated column below.
    op.execute(
        """
        CREATE OR REPLACE FUNCTION chunk_token_count(document tsvector)
        RETURNS integer
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        AS $$
            SELECT coalesce(sum(coalesce(array_length(positions, 1), 1)), 0)::integer
            FROM unnest(document);
        $$
        """
    )
    op.execute(
        "ALTER TABLE conversation_chunks "
        "ADD COLUMN content_tsv tsvector "
        "GENERATED ALWAYS AS (to_tsvector('english'::regconfig, content)) STORED, "
        "ADD COLUMN content_tokens integer "
        "GENERATED ALWAYS AS (chunk_token_count(to_tsvector('english'::regconfig, content))) STORED"
    )
    op.execute(
        "CREATE INDEX IF NOT EXISTS conversation_chunks_content_tsv_gin "
        "ON conversation_chunks USING gin (content_tsv)"
    )
    op.execute(
        """
        CREATE TABLE chunk_lexicon (
            user_id text NOT NULL,
            lexeme text NOT NULL,
            chunks integer NOT NULL,
            PRIMARY KEY (user_id, lexeme)
        )
        """
    )
    op.execute("CREATE INDEX chunk_lexicon_lexeme ON chunk_lexicon (lexeme)")
    op.execute(
        """
        CREATE TABLE chunk_lexicon_stats (
            user_id text PRIMARY KEY,
            chunks bigint NOT NULL,
            avg_tokens double precision NOT NULL,
            fingerprint numeric NOT NULL,
            refreshed_at timestamptz NOT NULL
        )
        """
    )
    op.execute(
        _SQL.read_text()
        .replace("{lexical_weight}", repr(LEXICAL_WEIGHT))
        .replace("{candidates}", str(CANDIDATES))
    )
    statements = []
    for table in USER_TABLES:
        statements += [
            f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
            f"CREATE POLICY {table}_owner_reads ON {table} FOR SELECT TO authenticated "
            "USING (user_id = (SELECT auth.uid())::text)",
            f"REVOKE ALL ON {table} FROM anon, authenticated",
            f"GRANT SELECT ON {table} TO authenticated",
        ]
    for function in FUNCTIONS:
        statements += [
            f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC, anon",
            f"GRANT EXECUTE ON FUNCTION {function} TO authenticated",
        ]
    body = "\n".join(f"    EXECUTE {_literal(s)};" for s in statements)
    op.execute(f"DO $rls$\nBEGIN\n  IF {IS_SUPABASE} THEN\n{body}\n  END IF;\nEND\n$rls$")


def downgrade() -> None:
    for function in (
        *FUNCTIONS,
        "refresh_chunk_lexicon()",
    ):
        op.execute(f"DROP FUNCTION IF EXISTS {function}")
    op.execute("DROP TABLE IF EXISTS chunk_lexicon_stats")
    op.execute("DROP TABLE IF EXISTS chunk_lexicon")
    op.execute("DROP INDEX IF EXISTS conversation_chunks_content_tsv_gin")
    op.execute(
        "ALTER TABLE conversation_chunks DROP COLUMN IF EXISTS content_tokens, "
        "DROP COLUMN IF EXISTS content_tsv"
    )
    op.execute("DROP FUNCTION IF EXISTS chunk_token_count(tsvector)")
