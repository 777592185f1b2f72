"""The Dagster instance's event log (dagster.yaml: event_log_storage), with every change to its
pool slots made under one lock.

Dagster (1.13) claims a pool slot in several statements, each committed on its own: it counts the
slots not yet assigned, marks the step's pending row assigned, then takes a free slot row (whose
row lock ends with that statement). Two runs claiming at the same moment both see the one free
slot and both take it, so a pool of limit 1 ran two steps at once: two Titan steps against one
Bedrock quota, two model fills on one machine's cores. It happens on Postgres (whose connections
commit each statement) and on SQLite alike (tests/test_instance.py makes many runs claim at once).

Here claiming, freeing, and setting or initialising a pool's limit each hold one lock for the
whole instance while Dagster's own code runs: an advisory lock held by a transaction of its own
on Postgres (shared by every process and machine that uses the instance; a pooler in
transaction mode keeps it, as it keeps the transaction), a lock on a file beside the event log
on SQLite (one machine, which is all SQLite serves). A process that dies holding it releases it
(the connection or the file closes). The lock is re-entrant within a thread, since Dagster's
methods call each other.

The storage follows the one configuration surface: Postgres at DAGSTER_POSTGRES_URL when that is
set, else SQLite under DAGSTER_HOME, where Dagster keeps it by default.
"""

from __future__ import annotations

import fcntl
import functools
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

from dagster._core.storage.event_log import EventLogStorage, SqliteEventLogStorage
from dagster._serdes import ConfigurableClass, ConfigurableClassData

F = TypeVar("F", bound=Callable[..., Any])
# The advisory lock's key: any constant no other user of the instance's database takes.
POOL_LOCK_KEY = 0x52_41_50_4F_4F_4C  # "RAPOOL"
LOCK_FILE = ".pool_slots.lock"


def _serialized(method: F) -> F:
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._pool_slots_locked():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class _SerializedPoolSlots:
    """Dagster's pool-slot methods, each under the instance's pool lock (`_acquire`)."""

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

    @_serialized
    def claim_concurrency_slot(self, *args: Any, **kwargs: Any) -> Any:
        return super().claim_concurrency_slot(*args, **kwargs)  # type: ignore[misc]

    @_serialized
    def free_concurrency_slot_for_step(self, *args: Any, **kwargs: Any) -> Any:
        return super().free_concurrency_slot_for_step(*args, **kwargs)  # type: ignore[misc]

    @_serialized
    def free_concurrency_slots_for_run(self, *args: Any, **kwargs: Any) -> Any:
        return super().free_concurrency_slots_for_run(*args, **kwargs)  # type: ignore[misc]

    @_serialized
    def assign_pending_steps(self, *args: Any, **kwargs: Any) -> Any:
        return super().assign_pending_steps(*args, **kwargs)  # type: ignore[misc]

    @_serialized
    def set_concurrency_slots(self, *args: Any, **kwargs: Any) -> Any:
        return super().set_concurrency_slots(*args, **kwargs)  # type: ignore[misc]

    @_serialized
    def delete_concurrency_limit(self, *args: Any, **kwargs: Any) -> Any:
        return super().delete_concurrency_limit(*args, **kwargs)  # type: ignore[misc]

    @_serialized
    def initialize_concurrency_limit_to_default(self, concurrency_key: str) -> bool:
        """Dagster's, except for a pool another run initialised meanwhile: each run reads the pool
        before it takes the lock, and Dagster's insert of a limit that exists fails on Postgres
        (it aborts the transaction its update then needs)."""
        default = self._instance.global_op_concurrency_default_limit  # type: ignore[attr-defined]
        found = {pool.name: pool for pool in self.get_pool_limits()}.get(concurrency_key)  # type: ignore[attr-defined]
        if found is not None and found.from_default and found.limit == default:
            return True
        return super().initialize_concurrency_limit_to_default(concurrency_key)  # type: ignore[misc]


class _SqliteEventLogStorage(_SerializedPoolSlots, SqliteEventLogStorage):
    @contextmanager
    def _acquire(self) -> Iterator[None]:
        with open(os.path.join(self._base_dir, LOCK_FILE), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, or the process dies
            yield


def _postgres_storage(url: str, inst_data: ConfigurableClassData | None) -> Any:
    import sqlalchemy as db
    from dagster_postgres.event_log import PostgresEventLogStorage

    class _PostgresEventLogStorage(_SerializedPoolSlots, PostgresEventLogStorage):
        @contextmanager
        def _acquire(self) -> Iterator[None]:
            with self._engine.connect() as conn:
                conn = conn.execution_options(isolation_level="READ COMMITTED")
                with conn.begin():  # the lock ends with this transaction, or its connection
                    conn.execute(
                        db.text("SELECT pg_advisory_xact_lock(:key)"), {"key": POOL_LOCK_KEY}
                    )
                    yield

    return _PostgresEventLogStorage(postgres_url=url, inst_data=inst_data)


class PoolSafeEventLogStorage(EventLogStorage, ConfigurableClass):  # from_config_value builds
    """The event log: Postgres at DAGSTER_POSTGRES_URL when set, else SQLite in DAGSTER_HOME's
    history/runs (Dagster's own default place); pool slots serialized in both."""

    @classmethod
    def config_type(cls) -> dict:
        return {}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: Any) -> Any:
        from retrieval_assets.lib.settings import ConfigError

        url = os.environ.get("DAGSTER_POSTGRES_URL")
        if url:
            return _postgres_storage(url, inst_data)
        home = os.environ.get("DAGSTER_HOME")
        if not home:
            raise ConfigError(
                "DAGSTER_HOME is not set: the instance's event log (SQLite) lives there when "
                "DAGSTER_POSTGRES_URL is not set"
            )
        return _SqliteEventLogStorage(os.path.join(home, "history", "runs"), inst_data=inst_data)
