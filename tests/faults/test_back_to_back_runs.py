"""Five graph runs back to back through the real CLI, the embedded server stopped before each:
all succeed, each starts the server once (no churn between steps) and leaves it stopped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from retrieval_assets.lib.embedded_postgres import _running_url

RUNS = 5


def test_five_runs_each_on_a_stopped_server_all_succeed(tmp_path):
    cli = Path(sys.executable).with_name("retrieval-assets")
    data_dir = tmp_path / "data"
    env = {
        **{k: v for k, v in os.environ.items() if k != "DAGSTER_POSTGRES_URL"},
        "RETRIEVAL_DATA_DIR": str(data_dir),
        "DAGSTER_HOME": str(tmp_path / "home"),
    }
    log = data_dir / "pg" / "log"
    for run in range(RUNS):
        stop = subprocess.run(
            [str(cli), "stop-db"], env=env, capture_output=True, text=True, timeout=120
        )
        assert stop.returncode == 0, stop.stderr[-2000:]
        assert _running_url(data_dir / "pg") is None
        starts_before = log.read_text().count("ready to accept") if log.exists() else 0
        done = subprocess.run(
            [str(cli), "run"], env=env, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0 and "retrieval_job: succeeded" in done.stdout, (
            run,
            done.stdout[-3000:],
            done.stderr[-3000:],
        )
        # One start for the whole run (the CLI holds it; every step process only attaches),
        # and the run, its last holder, stopped it.
        assert log.read_text().count("ready to accept") - starts_before == 1, run
        assert _running_url(data_dir / "pg") is None, run
