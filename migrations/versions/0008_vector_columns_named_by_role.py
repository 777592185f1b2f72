"""LanceDB vector columns named by role: vector_fastembed -> vector_coarse, vector -> vector_fine.

The records of which model made each LanceDB column are renamed here; the LanceDB columns
themselves are renamed in place (vectors kept) by the next run that writes them (the coarse and
fine assets), since Alembic does not reach LanceDB. Until then the backlog sensors see those
columns as not yet made and ask for that run. A downgrade renames the records back; code of
before this revision then finds its columns missing and re-embeds them. Frozen: plain SQL,
nothing imported from the package.
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

RENAMES = (("vector_fastembed", "vector_coarse"), ("vector", "vector_fine"))


def _rename(pairs) -> None:
    for old, new in pairs:
        op.execute(
            f"UPDATE embedding_schema_versions SET column_name = '{new}' "
            f"WHERE store = 'lancedb' AND column_name = '{old}'"
        )


def upgrade() -> None:
    _rename(RENAMES)


def downgrade() -> None:
    _rename((new, old) for old, new in RENAMES)
