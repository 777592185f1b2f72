"""The Dagster instance's event log, with every change to its pool slots made under one lock.

Dagster (1.13) claims a pool slot in several statements, each committed on its own: it counts the
slots not yet assigned, marks the step's pending row assigned, then takes a free slot row (whose
row lock ends with that statement). Two runs claiming at the same moment both see the one free
slot and both take it, so a pool of limit 1 ran two steps at once: two Titan steps against one
Bedrock quota, two model fills on one machine's cores. It happens on Postgres (whose connections
commit each statement) and on SQLite alike (tests/test_instance.py makes many runs claim at once).

Here claiming, freeing, and setting or initialising a pool's limit each hold one lock for the
whole instance while Dagster's own code runs: on Postgres an advisory lock held by a transaction
on a connection of its own (shared by every process and machine that uses the instance; a
pooler in transaction mode keeps it, as it keeps the transaction), on SQLite a lock on a file
beside the event log (one machine, which is all SQLite serves). A process that dies holding it
releases it (the connection or the file closes). The lock is re-entrant within a thread, since
Dagster's methods call each other.

The classes take their parents' configuration; `retrieval_assets.cli.instance_yaml` names them
in the dagster.yaml it writes for an instance (SQLite under DAGSTER_HOME, or Postgres at
DAGSTER_POSTGRES_URL).
"""

from __future__ import annotations

import fcntl
import functools
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

import sqlalchemy as db
from dagster._core.storage.event_log import SqlEventLogStorage, SqliteEventLogStorage
from dagster._core.storage.event_log.schema import ConcurrencyLimitsTable
from dagster._serdes import ConfigurableClassData
from dagster_postgres.event_log import PostgresEventLogStorage
from dagster_postgres.utils import (
    create_pg_connection,
    create_pg_engine,
    get_token_provider_from_config,
    pg_url_from_config,
)

F = TypeVar("F", bound=Callable[..., Any])
# The advisory lock's key: any constant no other user of the instance's database takes.
POOL_LOCK_KEY = 0x52_41_50_4F_4F_4C  # "RAPOOL"
LOCK_FILE = ".pool_slots.lock"
# A claim waits this long for the lock before it fails, and a holder that stops mid-transaction
# (a stopped or unreachable process) loses it after this long: no wait is forever.
LOCK_WAIT = "120s"


def _serialized(method: F) -> F:
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._pool_slots_locked():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _locked(name: str) -> Any:
    """The parent storage's method `name`, under the pool lock."""

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(super(_SerializedPoolSlots, self), name)(*args, **kwargs)

    method.__name__ = name
    return _serialized(method)


class _SerializedPoolSlots(SqlEventLogStorage):
    """Dagster's pool-slot methods, each under the instance's pool lock (`_acquire`); before the
    SQLite or Postgres storage in a class's bases."""

    def _acquire(self) -> AbstractContextManager[None]:
        raise NotImplementedError

    @contextmanager
    def _pool_slots_locked(self) -> Iterator[None]:
        held = self.__dict__.setdefault("_pool_lock_held", threading.local())  # per thread
        if getattr(held, "depth", 0):  # this thread holds it: a method inside another
            held.depth += 1
            try:
                yield
            finally:
                held.depth -= 1
            return
        with self._acquire():
            held.depth = 1
            try:
                yield
            finally:
                held.depth = 0

    claim_concurrency_slot = _locked("claim_concurrency_slot")
    free_concurrency_slot_for_step = _locked("free_concurrency_slot_for_step")
    free_concurrency_slots_for_run = _locked("free_concurrency_slots_for_run")
    assign_pending_steps = _locked("assign_pending_steps")
    set_concurrency_slots = _locked("set_concurrency_slots")
    delete_concurrency_limit = _locked("delete_concurrency_limit")

    @_serialized
    def initialize_concurrency_limit_to_default(self, concurrency_key: str) -> bool:
        """Dagster's, for the pool as it is once the lock is held: the caller read it before,
        and another run may have set it up, or a user set its limit, meanwhile. A pool still on
        an older default limit is updated here: Dagster's insert of a limit that exists fails
        on Postgres (it aborts the transaction its update then needs)."""
        default = self._instance.global_op_concurrency_default_limit if self.has_instance else None
        pools = {pool.name: pool for pool in self.get_pool_limits()}
        found = pools.get(concurrency_key)
        if found is not None and not found.from_default:
            return True  # a user's limit stands
        if found is None or default is None:  # set the pool up, or drop a default now unset
            return super().initialize_concurrency_limit_to_default(concurrency_key)
        if found.limit == default:
            return True
        with self.index_transaction() as conn:
            conn.execute(
                ConcurrencyLimitsTable.update()
                .where(ConcurrencyLimitsTable.c.concurrency_key == concurrency_key)
                .values(limit=default)
            )
            added = self._allocate_concurrency_slots(conn, concurrency_key, default)
        self.assign_pending_steps(added)
        return True


class PoolSafeSqliteEventLogStorage(_SerializedPoolSlots, SqliteEventLogStorage):
    """Dagster's SQLite event log (config: base_dir), pool slots under a file lock."""

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData | None, config_value: Any
    ) -> PoolSafeSqliteEventLogStorage:
        return cls(inst_data=inst_data, **config_value)

    @contextmanager
    def _acquire(self) -> Iterator[None]:
        with open(os.path.join(self._base_dir, LOCK_FILE), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, or the process dies
            yield


class PoolSafePostgresEventLogStorage(_SerializedPoolSlots, PostgresEventLogStorage):
    """Dagster's Postgres event log (config: postgres_url), pool slots under an advisory lock."""

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData | None, config_value: Any
    ) -> PoolSafePostgresEventLogStorage:
        return cls(
            postgres_url=pg_url_from_config(config_value),
            should_autocreate_tables=config_value.get("should_autocreate_tables", True),
            inst_data=inst_data,
            token_provider=get_token_provider_from_config(config_value),
        )

    @contextmanager
    def _acquire(self) -> Iterator[None]:
        # Its own engine without a pool: the webserver's engine keeps one connection, which the
        # locked method itself needs.
        engine = self.__dict__.get("_lock_engine")
        if engine is None:
            made = create_pg_engine(self.postgres_url, self._token_provider, poolclass=db.NullPool)
            engine = self.__dict__.setdefault("_lock_engine", made)
        with create_pg_connection(engine) as conn, conn.begin():  # the lock ends with it
            conn.execute(db.text(f"SET LOCAL lock_timeout = '{LOCK_WAIT}'"))
            conn.execute(db.text(f"SET LOCAL idle_in_transaction_session_timeout = '{LOCK_WAIT}'"))
            conn.execute(db.text("SELECT pg_advisory_xact_lock(:key)"), {"key": POOL_LOCK_KEY})
            yield
