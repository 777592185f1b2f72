"""The Postgres schema as the code expects it: Alembic revisions and Titan dimensions.

Alembic owns every change (migrations/, shipped as retrieval_assets.migrations). This module runs
it from code, checks a database is at head before work starts, and writes the revision a Titan
dimension change needs. Revisions never import this module: each holds its SQL as written then.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from retrieval_assets.lib.connection import connect, one
from retrieval_assets.lib.paths import MIGRATIONS_DIR

TITAN_MODEL_ID = "amazon.titan-embed-text-v2:0"
TITAN_DIMENSIONS = (256, 512, 1024)
DEFAULT_TITAN_DIMENSIONS = 1024
# Titan vectors are stored at half precision (pgvector's halfvec, revision 0006): half the bytes
# written, logged and indexed per vector; the ranking is unchanged within the benchmark's recall.
EMBEDDING_TYPE = "halfvec"
HNSW_INDEX = "conversation_chunks_embedding_hnsw"
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64


class SchemaNotReady(RuntimeError):
    """The database is not at the schema revision this code needs."""


def validate_titan_dimensions(value: int | str) -> int:
    """Titan Text Embeddings v2 accepts 256, 512 or 1024 output dimensions; nothing else."""
    try:
        dims = int(value)
    except (TypeError, ValueError):
        dims = None
    if dims not in TITAN_DIMENSIONS:
        allowed = ", ".join(map(str, TITAN_DIMENSIONS))
        raise ValueError(
            f"Titan Text Embeddings v2 dimensions must be one of {allowed}; got {value!r}"
        )
    return dims


def configured_titan_dimensions() -> int:
    """TITAN_DIMENSIONS from the environment (the migration's input), default 1024."""
    return validate_titan_dimensions(os.environ.get("TITAN_DIMENSIONS", DEFAULT_TITAN_DIMENSIONS))


def alembic_config(url: str | None = None, script_location: Path | None = None):
    """Alembic's configuration for the package's migrations, bound to `url` when given."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(script_location or MIGRATIONS_DIR))
    if url:
        cfg.attributes["url"] = url
    return cfg


def head_revision(cfg=None) -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(cfg or alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(url: str) -> str | None:
    with connect(url) as conn:
        exists = one(conn, "SELECT to_regclass('alembic_version') IS NOT NULL")[0]
        if not exists:
            return None
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        return row[0] if row else None


def ensure_schema(url: str, *, upgrade: bool, cfg=None) -> None:
    """Bring the schema to head (`upgrade=True`), or fail saying how to."""
    cfg = cfg or alembic_config(url)
    cfg.attributes["url"] = url
    head = head_revision(cfg)
    current = current_revision(url)
    if current == head:
        return
    if upgrade:
        from alembic import command

        command.upgrade(cfg, "head")
        return
    raise SchemaNotReady(
        f"the database schema is at revision {current or '(none)'} but this code needs {head}. "
        "Run `retrieval-assets migrate` (or `alembic upgrade head` in a checkout) with "
        "DATABASE_URL set, or `alembic upgrade head --sql` for a script to paste into the "
        "Supabase SQL editor."
    )


def embedding_dims(conn) -> int:
    """Dimensions of conversation_chunks.embedding as the catalog records them."""
    row = conn.execute(
        "SELECT atttypmod FROM pg_attribute "
        "WHERE attrelid = 'conversation_chunks'::regclass AND attname = 'embedding'"
    ).fetchone()
    return int(row[0])


def retype_embedding_sql(dims: int, model: str = TITAN_MODEL_ID) -> list[str]:
    """Statements that move conversation_chunks.embedding to EMBEDDING_TYPE(dims).

    Vectors of the old size are cleared (never mixed with new ones), the column re-typed, the HNSW
    index rebuilt and the change recorded; the backfill sensors then re-embed every row.
    """
    dims = validate_titan_dimensions(dims)
    return [
        f"DROP INDEX IF EXISTS {HNSW_INDEX}",
        "UPDATE conversation_chunks SET embedding = NULL, embedding_model = NULL, "
        "embedded_at = NULL WHERE embedding IS NOT NULL",
        f"ALTER TABLE conversation_chunks ALTER COLUMN embedding TYPE {EMBEDDING_TYPE}({dims})",
        hnsw_index_sql(),
        "UPDATE embedding_schema_versions SET retired_at = now() WHERE store = 'postgres' "
        "AND table_name = 'conversation_chunks' AND column_name = 'embedding' "
        "AND retired_at IS NULL",
        "INSERT INTO embedding_schema_versions (store, table_name, column_name, model, dims) "
        f"VALUES ('postgres', 'conversation_chunks', 'embedding', '{model}', {dims})",
    ]


def hnsw_index_sql(column_type: str = EMBEDDING_TYPE) -> str:
    """The HNSW index on the Titan column; revisions before 0006 pass "vector"."""
    return (
        f"CREATE INDEX IF NOT EXISTS {HNSW_INDEX} ON conversation_chunks "
        f"USING hnsw (embedding {column_type}_cosine_ops) "
        f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})"
    )


_REVISION_TEMPLATE = '''"""Titan embedding column {kind}({old}) -> {kind}({new}).

Generated by `retrieval-assets titan-dims {new}`. Clears stored Titan vectors (they belong to
another vector space), re-types the column and rebuilds the HNSW index; downgrade does the same
back to {old}. The statements are written out here, so the revision stays as generated.
"""

from alembic import op

revision = "{rev}"
down_revision = "{down}"
branch_labels = None
depends_on = None

UPGRADE = {upgrade}

DOWNGRADE = {downgrade}


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
'''


def _statements(dims: int) -> str:
    return "[\n" + "".join(f"    {s!r},\n" for s in retype_embedding_sql(dims)) + "]"


def write_titan_dims_revision(old: int, new: int, cfg=None) -> Path:
    """Write the Alembic revision that changes the Titan column from `old` to `new` dimensions."""
    new, old = validate_titan_dimensions(new), validate_titan_dimensions(old)
    cfg = cfg or alembic_config()
    versions = Path(cfg.get_main_option("script_location")) / "versions"
    numbers = [int(m.group(1)) for p in versions.glob("*.py") if (m := re.match(r"(\d+)_", p.name))]
    rev = f"{max(numbers, default=0) + 1:04d}"
    path = versions / f"{rev}_titan_dims_{new}.py"
    path.write_text(
        _REVISION_TEMPLATE.format(
            kind=EMBEDDING_TYPE,
            old=old,
            new=new,
            rev=rev,
            down=head_revision(cfg),
            upgrade=_statements(new),
            downgrade=_statements(old),
        )
    )
    return path
