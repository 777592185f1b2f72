"""Initial schema: conversations, conversation_chunks (Titan vector column), schema versions
and the match RPC functions. The vector index is revision 0002.

The Titan column's size comes from TITAN_DIMENSIONS (256, 512 or 1024; default 1024) when this
revision runs; later changes go through `retrieval-assets titan-dims N`, which writes a revision.
"""

import os
from pathlib import Path

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TITAN_MODEL_ID = "amazon.titan-embed-text-v2:0"
# The local columns' sizes are read from their models when the columns are created in LanceDB.
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
FASTEMBED_MODEL = "fastembed:" + os.environ.get("FASTEMBED_MODEL", DEFAULT_MODEL)
ST_MODEL = "sentence-transformers:" + os.environ.get("ST_MODEL", DEFAULT_MODEL)

# The functions as revisions 0001, 0004 and 0006 install them; sql/ sits beside migrations/ in
# the checkout and in the wheel, and the file is frozen (a change is a new file).
_MATCH_SQL = Path(__file__).parents[2] / "sql" / "match_conversation_chunks_v1.sql"


def match_functions_sql(ef_search_floor: int, column_type: str) -> str:
    return (
        _MATCH_SQL.read_text()
        .replace("{ef_search_floor}", str(ef_search_floor))
        .replace("{embedding_type}", column_type)
    )


def configured_titan_dimensions() -> int:
    """TITAN_DIMENSIONS (default 1024): Titan Text Embeddings v2 accepts 256, 512 or 1024."""
    value = os.environ.get("TITAN_DIMENSIONS", "1024")
    if value.strip() not in ("256", "512", "1024"):
        raise ValueError(
            f"Titan Text Embeddings v2 dimensions must be one of 256, 512, 1024; got {value!r}"
        )
    return int(value)


def upgrade() -> None:
    dims = configured_titan_dimensions()
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.execute(
        """
        CREATE TABLE conversations (
            id             text PRIMARY KEY,
            user_id        text NOT NULL,
            title          text,
            source         text NOT NULL,
            source_format  text NOT NULL,
            origin         text NOT NULL,
            turns          jsonb NOT NULL,
            turn_count     integer NOT NULL,
            content_hash   text NOT NULL,
            chunked_with   text,
            created_at     timestamptz,
            updated_at     timestamptz,
            ingested_at    timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX conversations_user_id_idx ON conversations (user_id)")
    op.execute("CREATE INDEX conversations_source_idx ON conversations (source)")
    op.execute(
        f"""
        CREATE TABLE conversation_chunks (
            chunk_id         text PRIMARY KEY,
            user_id          text NOT NULL,
            conversation_id  text NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            tier             text NOT NULL,
            chunk_index      integer NOT NULL,
            turn_start       integer NOT NULL,
            turn_end         integer NOT NULL,
            roles            text[] NOT NULL,
            content          text NOT NULL,
            content_hash     text NOT NULL,
            token_count      integer NOT NULL,
            created_at       timestamptz,
            ingested_at      timestamptz NOT NULL DEFAULT now(),
            embedding        vector({dims}),
            embedding_model  text,
            embedded_at      timestamptz,
            CONSTRAINT embedding_has_model CHECK ((embedding IS NULL) = (embedding_model IS NULL)),
            CONSTRAINT turn_span CHECK (turn_start <= turn_end)
        )
        """
    )
    op.execute(
        "CREATE INDEX conversation_chunks_conversation_idx ON conversation_chunks (conversation_id)"
    )
    op.execute(
        "CREATE INDEX conversation_chunks_user_tier_idx ON conversation_chunks (user_id, tier)"
    )
    # Backfills page through the rows still missing a vector by primary key (keyset, not OFFSET).
    op.execute(
        "CREATE INDEX conversation_chunks_missing_embedding_idx "
        "ON conversation_chunks (chunk_id) WHERE embedding IS NULL"
    )
    op.execute(
        """
        CREATE TABLE embedding_schema_versions (
            id          bigserial PRIMARY KEY,
            store       text NOT NULL CHECK (store IN ('postgres', 'lancedb')),
            table_name  text NOT NULL,
            column_name text NOT NULL,
            model       text NOT NULL,
            dims        integer,
            created_at  timestamptz NOT NULL DEFAULT now(),
            retired_at  timestamptz
        )
        """
    )
    op.execute(
        "CREATE UNIQUE INDEX embedding_schema_versions_current ON embedding_schema_versions "
        "(store, table_name, column_name) WHERE retired_at IS NULL"
    )
    op.execute(
        f"""
        INSERT INTO embedding_schema_versions (store, table_name, column_name, model, dims) VALUES
            ('postgres', 'conversation_chunks', 'embedding', '{TITAN_MODEL_ID}', {dims}),
            ('lancedb', 'conversation_chunks', 'vector_fastembed', '{FASTEMBED_MODEL}', NULL),
            ('lancedb', 'conversation_chunks', 'vector', '{ST_MODEL}', NULL)
        """
    )
    op.execute(match_functions_sql(40, "vector"))


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION IF EXISTS match_conversation_chunks(vector, double precision, integer, text)"
    )
    op.execute(
        "DROP FUNCTION IF EXISTS match_conversation_chunks_by_tier"
        "(vector, text, double precision, integer, text)"
    )
    op.execute("DROP TABLE IF EXISTS embedding_schema_versions")
    op.execute("DROP TABLE IF EXISTS conversation_chunks")
    op.execute("DROP TABLE IF EXISTS conversations")
