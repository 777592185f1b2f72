"""The one place resource keys are bound to instances.

Every setting is an environment variable (listed in .env.example). Unset → the embedded default:
a PostgreSQL+pgvector server and a LanceDB directory under .data/, the bundled sample export and
the packaged models. Set → that value, resolved by Dagster at launch through dg.EnvVar (never
read here, never shown in the UI). dg.EnvVar has no default of its own (dagster-io/dagster#16232)
and an unset one fails the run, so `_env` binds it only when the variable exists.
"""

import os

import dagster as dg

from retrieval_assets.lib.bedrock import BedrockResource
from retrieval_assets.lib.chunking import DEFAULT_TIERS, ChunkerResource
from retrieval_assets.lib.embedders import FastEmbedResource, SentenceTransformerResource
from retrieval_assets.lib.lancedb_store import LanceDBResource
from retrieval_assets.lib.models import DEFAULT_FASTEMBED_MODEL, DEFAULT_ST_MODEL
from retrieval_assets.lib.parsers import ConversationSourceResource, Limits
from retrieval_assets.lib.paths import DEFAULT_DATA_DIR, SAMPLE_DATA_DIR
from retrieval_assets.lib.postgres import PostgresResource
from retrieval_assets.lib.schema import DEFAULT_TITAN_DIMENSIONS


def _env(name: str, default: str) -> str:
    return dg.EnvVar(name) if name in os.environ else default


def _env_int(name: str, default: int) -> int:
    return dg.EnvVar.int(name) if name in os.environ else default


def _bedrock() -> BedrockResource:
    """Amazon Bedrock when AWS credentials are configured, else the local endpoint."""
    aws = any(
        v in os.environ for v in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE")
    )
    common = {
        "dimensions": _env_int("TITAN_DIMENSIONS", DEFAULT_TITAN_DIMENSIONS),
        "max_concurrency": _env_int("BEDROCK_MAX_CONCURRENCY", 8),
        "data_dir": DATA_DIR,
    }
    if not aws:
        return BedrockResource(use_local_endpoint=True, **common)
    return BedrockResource(
        region_name=_env("AWS_REGION", "us-east-1"),
        aws_access_key_id=_env("AWS_ACCESS_KEY_ID", None),
        aws_secret_access_key=_env("AWS_SECRET_ACCESS_KEY", None),
        aws_session_token=_env("AWS_SESSION_TOKEN", None),
        profile_name=_env("AWS_PROFILE", None),
        endpoint_url=_env("BEDROCK_ENDPOINT_URL", None),
        **common,
    )


DATA_DIR = _env("RETRIEVAL_DATA_DIR", str(DEFAULT_DATA_DIR))

defs = dg.Definitions(
    resources={
        "postgres": PostgresResource(database_url=_env("DATABASE_URL", ""), data_dir=DATA_DIR),
        "lancedb": LanceDBResource(
            uri=_env("LANCEDB_URI", ""),
            data_dir=DATA_DIR,
            keep_versions_minutes=_env_int("LANCEDB_KEEP_VERSIONS_MINUTES", 60),
        ),
        "conversation_source": ConversationSourceResource(
            path=_env("CONVERSATIONS_SOURCE", str(SAMPLE_DATA_DIR)),
            default_user_id=_env("DEFAULT_USER_ID", "local-user"),
            max_message_chars=_env_int("MAX_MESSAGE_CHARS", Limits.max_message_chars),
        ),
        "fastembed": FastEmbedResource(
            model=_env("FASTEMBED_MODEL", DEFAULT_FASTEMBED_MODEL), data_dir=DATA_DIR
        ),
        "sentence_transformer": SentenceTransformerResource(
            model=_env("ST_MODEL", DEFAULT_ST_MODEL), data_dir=DATA_DIR
        ),
        "bedrock": _bedrock(),
        "chunker": ChunkerResource(
            tokenizer_model=_env("ST_MODEL", DEFAULT_ST_MODEL),
            tiers=_env("CHUNK_TIERS", DEFAULT_TIERS),
        ),
    }
)
