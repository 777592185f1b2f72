"""Shared fixtures: one real embedded PostgreSQL+pgvector per session, a LanceDB dir per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrieval_assets.lib.chunking import ChunkerResource
from retrieval_assets.lib.lancedb_store import LanceDBResource
from retrieval_assets.lib.parsers import ConversationSourceResource
from retrieval_assets.lib.postgres import PostgresResource, connect, embedded_url
from retrieval_assets.lib.schema import ensure_schema


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real PostgreSQL with pgvector, migrated to head, for the whole session."""
    url = embedded_url(tmp_path_factory.mktemp("pg-session"))
    ensure_schema(url, upgrade=True)
    return url


@pytest.fixture
def db(pg_url: str) -> str:
    """The session database, emptied of data (the schema stays)."""
    with connect(pg_url, autocommit=True) as conn:
        conn.execute("TRUNCATE conversations, conversation_chunks CASCADE")
    return pg_url


@pytest.fixture
def lance_uri(tmp_path: Path) -> str:
    return str(tmp_path / "lancedb")


@pytest.fixture(scope="session")
def chunker_resource() -> ChunkerResource:
    return ChunkerResource()


@pytest.fixture
def make_resources(db: str, lance_uri: str, chunker_resource: ChunkerResource):
    """Resources bound to the test stores, reading conversations from `source`."""

    def build(source: Path | str, **source_options) -> dict:
        return {
            "postgres": PostgresResource(database_url=db),
            "lancedb": LanceDBResource(uri=lance_uri),
            "conversation_source": ConversationSourceResource(path=str(source), **source_options),
            "chunker": chunker_resource,
        }

    return build
