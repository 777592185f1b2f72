"""Alembic environment: the database comes from DATABASE_URL, or the embedded server when unset.

`alembic upgrade head --sql` renders the whole schema as one script (e.g. for the Supabase SQL
editor) without connecting anywhere.
"""

import os

from alembic import context
from sqlalchemy import create_engine, pool, text

# Any fixed number works; it only keeps two processes from migrating at once.
_MIGRATION_LOCK = 7_310_214


def _sqlalchemy_url(url: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def run_offline() -> None:
    context.configure(
        url="postgresql+psycopg://",
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    url = context.config.attributes.get("url") or os.environ.get("DATABASE_URL")
    if url:
        _migrate(url)
        return
    from retrieval_assets.lib.embedded_postgres import hold_embedded
    from retrieval_assets.lib.paths import DEFAULT_DATA_DIR

    # `alembic` run by hand on the embedded default: up while it migrates, stopped after
    # unless a command (the UI, a run) holds it too.
    with hold_embedded(os.environ.get("RETRIEVAL_DATA_DIR") or DEFAULT_DATA_DIR) as embedded:
        _migrate(embedded)


def _migrate(url: str) -> None:
    engine = create_engine(
        _sqlalchemy_url(url),
        poolclass=pool.NullPool,
        connect_args={"prepare_threshold": None},  # safe behind transaction poolers
    )
    with engine.connect() as connection:
        context.configure(connection=connection, transaction_per_migration=False)
        with context.begin_transaction():
            connection.execute(text(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})"))
            context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
