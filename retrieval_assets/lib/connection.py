"""Postgres connections as the project opens them, and connection URLs as it names them.

Below both the resource (lib/postgres.py) and the schema code (lib/schema.py), which each need a
connection: neither has to import the other for it.
"""

from __future__ import annotations

import re

import psycopg


class DatabaseUnavailable(RuntimeError):
    """The configured database cannot be reached."""


_URL_PASSWORD = re.compile(r"(://[^:/@]*:)([^@]*)@")


def redacted(url: str) -> str:
    """`url` without its password, to name in an error."""
    return _URL_PASSWORD.sub(r"\1***@", url)


def url_password(url: str) -> str | None:
    """The password a connection URL carries, if any."""
    found = _URL_PASSWORD.search(url)
    return found.group(2) if found else None


def connect(url: str, **kwargs) -> psycopg.Connection:
    """A connection without server-side prepared statements, with pgvector's types registered
    once the extension exists (before the first migration it does not)."""
    from pgvector.psycopg import register_vector

    conn = psycopg.connect(url, prepare_threshold=None, **kwargs)
    try:
        register_vector(conn)
    except psycopg.ProgrammingError:  # no vector type yet
        conn.rollback()
    return conn


def one(conn: psycopg.Connection, query, params=None) -> tuple:
    """The one row `query` returns (an aggregate, a lookup that must hit)."""
    row = conn.execute(query, params).fetchone()
    if row is None:
        raise LookupError(f"no row for: {' '.join(str(query).split())[:200]}")
    return row
