"""The one place resource keys are bound to instances.

Every setting is an environment variable (listed in .env.example). Unset → the embedded default:
a PostgreSQL+pgvector server and a LanceDB directory under .data/, the bundled sample export and
the packaged models. Set → that value, resolved by Dagster at launch through dg.EnvVar (never
read here, never shown in the UI). dg.EnvVar has no default of its own (dagster-io/dagster#16232)
and an unset one fails the run, so `_env` binds it only when the variable exists.
"""

import os

import dagster as dg

from retrieval_assets.lib.chunking import DEFAULT_TIERS, ChunkerResource
from retrieval_assets.lib.embedders import FastEmbedResource, SentenceTransformerResource
from retrieval_assets.lib.lancedb_store import LanceDBResource
from retrieval_assets.lib.models import DEFAULT_FASTEMBED_MODEL, DEFAULT_ST_MODEL
from retrieval_assets.lib.parsers import ConversationSourceResource, Limits
from retrieval_assets.lib.paths import DEFAULT_DATA_DIR, SAMPLE_DATA_DIR
from retrieval_assets.lib.postgres import PostgresResource


def _env(name: str, default: str) -> str:
    return dg.EnvVar(name) if name in os.environ else default


def _env_int(name: str, default: int) -> int:
    return dg.EnvVar.int(name) if name in os.environ else default


DATA_DIR = _env("RETRIEVAL_DATA_DIR", str(DEFAULT_DATA_DIR))

defs = dg.Definitions(
    resources={
        "postgres": PostgresResource(database_url=_env("DATABASE_URL", ""), data_dir=DATA_DIR),
        "lancedb": LanceDBResource(uri=_env("LANCEDB_URI", str(DEFAULT_DATA_DIR / "lancedb"))),
        "conversation_source": ConversationSourceResource(
            path=_env("CONVERSATIONS_SOURCE", str(SAMPLE_DATA_DIR)),
            default_user_id=_env("DEFAULT_USER_ID", "local-user"),
            max_message_chars=_env_int("MAX_MESSAGE_CHARS", Limits.max_message_chars),
        ),
        "fastembed": FastEmbedResource(
            model=_env("FASTEMBED_MODEL", DEFAULT_FASTEMBED_MODEL), data_dir=DATA_DIR
        ),
        "sentence_transformer": SentenceTransformerResource(
            model=_env("ST_MODEL", DEFAULT_ST_MODEL)
        ),
        "chunker": ChunkerResource(
            tokenizer_model=_env("ST_MODEL", DEFAULT_ST_MODEL),
            tiers=_env("CHUNK_TIERS", DEFAULT_TIERS),
        ),
    }
)
