"""The one place resource keys are bound to instances.

Every setting is an environment variable, declared once in lib/settings.py (and listed in
.env.example). Unset → the embedded default: a PostgreSQL+pgvector server and a LanceDB directory
under .data/, the bundled sample export and the packaged models. Set → that value, resolved by
Dagster at launch through dg.EnvVar (never read here, never shown in the UI). The values are
checked first, so a bad one fails this load in one line naming the variable.
"""

import dagster as dg

from retrieval_assets.lib.bedrock import BedrockResource
from retrieval_assets.lib.chunking import DEFAULT_TIERS, ChunkerResource
from retrieval_assets.lib.embedders import FastEmbedResource, SentenceTransformerResource
from retrieval_assets.lib.lancedb_store import LanceDBResource
from retrieval_assets.lib.models import DEFAULT_FASTEMBED_MODEL, DEFAULT_ST_MODEL
from retrieval_assets.lib.paths import DEFAULT_DATA_DIR
from retrieval_assets.lib.postgres import PostgresResource
from retrieval_assets.lib.schema import DEFAULT_TITAN_DIMENSIONS
from retrieval_assets.lib.settings import (
    AWS_CREDENTIAL_VARIABLES,
    DEFAULT_SOURCE,
    bind,
    bind_int,
    check_environment,
    is_set,
)
from retrieval_assets.lib.sources import DEFAULT_USER_ID, ConversationSourceResource, Limits


def _bedrock(data_dir: str) -> BedrockResource:
    """Amazon Bedrock when AWS credentials are configured, else the local endpoint."""
    common = {
        "dimensions": bind_int("TITAN_DIMENSIONS", DEFAULT_TITAN_DIMENSIONS),
        "max_concurrency": bind_int("BEDROCK_MAX_CONCURRENCY", 8),
        "data_dir": data_dir,
    }
    if not any(is_set(name) for name in AWS_CREDENTIAL_VARIABLES):
        # The local endpoint stands in for Titan with the strongest local model, the fine one.
        return BedrockResource(
            use_local_endpoint=True, local_model=bind("ST_MODEL", DEFAULT_ST_MODEL), **common
        )
    return BedrockResource(
        region_name=bind("AWS_REGION", "us-east-1"),
        aws_access_key_id=bind("AWS_ACCESS_KEY_ID", None),
        aws_secret_access_key=bind("AWS_SECRET_ACCESS_KEY", None),
        aws_session_token=bind("AWS_SESSION_TOKEN", None),
        profile_name=bind("AWS_PROFILE", None),
        endpoint_url=bind("BEDROCK_ENDPOINT_URL", None),
        **common,
    )


def resources_from_environment() -> dict[str, dg.ConfigurableResource]:
    """Every resource, bound to the environment's variables (checked first)."""
    check_environment()
    data_dir = bind("RETRIEVAL_DATA_DIR", str(DEFAULT_DATA_DIR))
    return {
        "postgres": PostgresResource(database_url=bind("DATABASE_URL", ""), data_dir=data_dir),
        "lancedb": LanceDBResource(
            uri=bind("LANCEDB_URI", ""),
            storage_options=bind("LANCEDB_STORAGE_OPTIONS", ""),
            data_dir=data_dir,
            keep_versions_minutes=bind_int("LANCEDB_KEEP_VERSIONS_MINUTES", 60),
        ),
        "conversation_source": ConversationSourceResource(
            path=bind("CONVERSATIONS_SOURCE", DEFAULT_SOURCE),
            default_user_id=bind("DEFAULT_USER_ID", DEFAULT_USER_ID),
            max_message_chars=bind_int("MAX_MESSAGE_CHARS", Limits.max_message_chars),
        ),
        "coarse_model": FastEmbedResource(
            model=bind("FASTEMBED_MODEL", DEFAULT_FASTEMBED_MODEL), data_dir=data_dir
        ),
        "fine_model": SentenceTransformerResource(model=bind("ST_MODEL", DEFAULT_ST_MODEL)),
        "titan_model": _bedrock(data_dir),
        "chunker": ChunkerResource(
            tokenizer_model=bind("ST_MODEL", DEFAULT_ST_MODEL),
            tiers=bind("CHUNK_TIERS", DEFAULT_TIERS),
        ),
    }


defs = dg.Definitions(resources=resources_from_environment())
