"""The Postgres resource: an embedded pgvector server by default, any Postgres/Supabase by URL.

Connections never use server-side prepared statements (`prepare_threshold=None`), so the same
code runs through a Supabase/PgBouncer pooler in transaction mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import psycopg
from pydantic import Field, PrivateAttr

from retrieval_assets.lib.connection import DatabaseUnavailable, connect, redacted
from retrieval_assets.lib.embedded_postgres import embedded_url
from retrieval_assets.lib.paths import DEFAULT_DATA_DIR
from retrieval_assets.lib.schema import ensure_schema


@contextmanager
def reaching(url: str) -> Iterator[None]:
    """Work on DATABASE_URL's database: a failure to connect says so, without the password."""
    try:
        yield
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot connect to the database of DATABASE_URL ({redacted(url)}): "
            f"{' '.join(str(exc).split())}"
        ) from exc


class PostgresResource(dg.ConfigurableResource):
    """Postgres holding conversations, chunks and Titan vectors (pgvector, HNSW)."""

    database_url: str = Field(
        default="",
        description="Postgres/Supabase connection URL. Empty: an embedded PostgreSQL with "
        "pgvector started in data_dir and migrated to the latest schema.",
    )
    data_dir: str = Field(
        default=str(DEFAULT_DATA_DIR),
        description="Directory of the embedded server's data (used only without database_url).",
    )

    write_batch_rows: int = Field(
        default=1_024,
        description="Titan vectors embedded and committed per batch (COPY + one UPDATE): a crash "
        "loses at most this many rows of work.",
    )

    _url: str | None = PrivateAttr(default=None)

    @property
    def embedded(self) -> bool:
        return not self.database_url

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._url = self._resolve()

    def _resolve(self) -> str:
        if self.embedded:
            url = embedded_url(self.data_dir)
            ensure_schema(url, upgrade=True)  # the embedded default migrates itself
        else:
            url = self.database_url
            with reaching(url):
                ensure_schema(url, upgrade=False)  # production migrates as a deliberate step
        return url

    @property
    def url(self) -> str:
        if self._url is None:
            self._url = self._resolve()
        return self._url

    @contextmanager
    def get_connection(self) -> Iterator[psycopg.Connection]:
        """A connection in a transaction: committed on success, rolled back on error."""
        with connect(self.url) as conn:
            yield conn
