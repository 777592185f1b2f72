"""Hybrid search with conversational context (sql/match_conversation_chunks_hybrid_v2.sql).

The hybrid match functions gain `context_weight`: each chunk's fused score gains that share of
the best fused score among its neighbours (the candidates of its conversation and tier whose
turns touch its own), chosen by leave-one-conversation-out on LoCoMo's development split with the
lexical weight (tests/benchmarks/test_quality_bench.py; the README has the figures). A NULL
weight means its default. The functions' argument lists change, so they are dropped and created
again; on Supabase, `authenticated` may call them and `anon` may not, as before. A downgrade
restores revision 0009's functions. Frozen: plain SQL, nothing imported from the package.
"""

from pathlib import Path

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

LEXICAL_WEIGHT = 0.6
CONTEXT_WEIGHT = 0.3
CANDIDATES = 50

_SQL = Path(__file__).parents[2] / "sql"
IS_SUPABASE = (
    "to_regrole('authenticated') IS NOT NULL AND to_regrole('anon') IS NOT NULL "
    "AND to_regprocedure('auth.uid()') IS NOT NULL"
)
FUNCTIONS = (
    "match_conversation_chunks_hybrid_by_tier"
    "(vector, text, text, integer, text, double precision, integer, double precision)",
    "match_conversation_chunks_hybrid"
    "(vector, text, integer, text, double precision, double precision)",
)
FUNCTIONS_0009 = (
    "match_conversation_chunks_hybrid_by_tier"
    "(vector, text, text, integer, text, double precision, integer)",
    "match_conversation_chunks_hybrid(vector, text, integer, text, double precision)",
)


def _install(sql_file: str, functions: tuple[str, ...]) -> None:
    op.execute(
        (_SQL / sql_file)
        .read_text()
        .replace("{lexical_weight}", repr(LEXICAL_WEIGHT))
        .replace("{context_weight}", repr(CONTEXT_WEIGHT))
        .replace("{candidates}", str(CANDIDATES))
    )
    statements = []
    for function in functions:
        statements += [
            f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC, anon",
            f"GRANT EXECUTE ON FUNCTION {function} TO authenticated",
        ]
    body = "\n".join("    EXECUTE '" + s.replace("'", "''") + "';" for s in statements)
    op.execute(f"DO $rls$\nBEGIN\n  IF {IS_SUPABASE} THEN\n{body}\n  END IF;\nEND\n$rls$")


def upgrade() -> None:
    _install("match_conversation_chunks_hybrid_v2.sql", FUNCTIONS)


def downgrade() -> None:
    for function in FUNCTIONS:
        op.execute(f"DROP FUNCTION IF EXISTS {function}")
    # Revision 0009's file, as 0009 installed it: it (re)creates every function of that revision.
    _install("match_conversation_chunks_lexical_v1.sql", FUNCTIONS_0009)
