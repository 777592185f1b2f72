"""The Dagster instance: the project's dagster.yaml, Postgres storage by environment, and pool
slots that many runs claiming at once never take past the pool's limit."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import dagster as dg
import psycopg
import pytest
import yaml

from retrieval_assets import cli
from tests import PROJECT_ROOT
from tests.services import database_on

CLAIMERS = 8


def test_local_instance_uses_the_project_settings(tmp_path, monkeypatch):
    home = tmp_path / "home with space"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.delenv("DAGSTER_POSTGRES_URL", raising=False)
    cli._ensure_dagster_home()
    config = yaml.safe_load((home / "dagster.yaml").read_text())
    storage = config.pop("event_log_storage")
    assert config == yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text())
    assert config["telemetry"] == {"enabled": False}
    assert config["run_retries"]["enabled"] is True
    assert config["concurrency"]["pools"]["default_limit"] >= 1
    # the event log's place is the instance's, whatever the opening process's DAGSTER_HOME
    assert storage["config"] == {"base_dir": str(home / "history" / "runs")}
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "elsewhere"))
    instance = dg.DagsterInstance.from_config(str(home))
    assert type(instance.run_storage).__name__ == "SqliteRunStorage"
    assert type(instance.event_log_storage).__name__ == "PoolSafeSqliteEventLogStorage"
    assert instance.event_log_storage._base_dir == str(home / "history" / "runs")
    assert instance.run_retries_enabled


def test_postgres_instance_storage_by_environment(tmp_path, monkeypatch, pg_url):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS dagster_instance_test")
        conn.execute("CREATE DATABASE dagster_instance_test")
    url = psycopg.conninfo.make_conninfo(pg_url, dbname="dagster_instance_test")
    url = "postgresql://postgres:@/dagster_instance_test?" + pg_url.split("?", 1)[1]
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", url)
    cli._ensure_dagster_home()
    written = (tmp_path / "dagster.yaml").read_text()
    assert url not in written  # the URL stays in the environment
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(instance.event_log_storage).__name__ == "PoolSafePostgresEventLogStorage"
    assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"

    @dg.asset
    def probe() -> None:
        return None

    result = dg.materialize([probe], instance=instance)
    assert instance.get_run_by_id(result.run_id).is_success
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 1


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_runs_claiming_a_pool_at_once_never_exceed_its_limit(store, tmp_path, monkeypatch, request):
    """Eight runs, on an instance no run has used yet, set up the `bedrock` pool (default limit
    1) and claim its slot at the same moment, and again as it frees: each gets it once, one at a
    time. Dagster's own storage gave the one slot to two or three of them at once, on SQLite as on
    Postgres, and on Postgres all but one failed setting the pool up."""
    environ = {"DAGSTER_HOME": str(tmp_path)}
    if store == "postgres":
        environ["DAGSTER_POSTGRES_URL"] = database_on(request.getfixturevalue("pg_url"), "pools")
    else:
        monkeypatch.delenv("DAGSTER_POSTGRES_URL", raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    cli._ensure_dagster_home()
    dg.DagsterInstance.get().dispose()  # its tables made, as a deployment's first start does
    claimers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.pool_claimer", f"run-{i}"],
            cwd=PROJECT_ROOT,
            env={**os.environ, **environ},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(CLAIMERS)
    ]
    try:
        for claimer in claimers:  # every one has opened the instance
            assert claimer.stdout.readline().strip() == "ready"
        for claimer in claimers:
            claimer.stdin.write("go\n")
            claimer.stdin.flush()
        held = []
        for claimer in claimers:
            out, _ = claimer.communicate(timeout=120)
            assert claimer.returncode == 0, out
            held.append(json.loads(out))
    finally:
        for claimer in claimers:
            claimer.kill()
            claimer.wait()
    held.sort()
    overlapping = [(a, b) for a, b in itertools.pairwise(held) if b[0] < a[1]]
    assert not overlapping, f"two runs held the one slot at once: {overlapping}"
    with dg.DagsterInstance.get() as instance:  # set up once, though all found it missing
        info = instance.event_log_storage.get_concurrency_info("bedrock")
        assert (info.slot_count, info.claimed_slots) == (1, [])


def _write_default_limit(home, limit: int) -> None:
    path = home / "dagster.yaml"
    config = yaml.safe_load(path.read_text())
    config["concurrency"]["pools"]["default_limit"] = limit
    path.write_text(yaml.safe_dump(config))


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_a_pool_follows_a_changed_default_and_keeps_a_users_limit(
    store, tmp_path, monkeypatch, request
):
    """A pool set up from the default limit follows dagster.yaml when the default changes (on
    Postgres Dagster's own update failed: its insert of the existing pool aborted the
    transaction); a limit a user set stays."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    if store == "postgres":
        url = database_on(request.getfixturevalue("pg_url"), "pool_defaults")
        monkeypatch.setenv("DAGSTER_POSTGRES_URL", url)
    else:
        monkeypatch.delenv("DAGSTER_POSTGRES_URL", raising=False)
    cli._ensure_dagster_home()

    def pools() -> dict[str, tuple[int, int, bool]]:
        with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
            storage = instance.event_log_storage
            for key in ("bedrock", "local_models"):  # as a run's first claim of each does
                storage.initialize_concurrency_limit_to_default(key)
            found = {}
            for pool in storage.get_pool_limits():
                slots = storage.get_concurrency_info(pool.name).slot_count
                found[pool.name] = (pool.limit, slots, pool.from_default)
            return found

    assert pools() == {"bedrock": (1, 1, True), "local_models": (1, 1, True)}
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        instance.event_log_storage.set_concurrency_slots("local_models", 3)
    _write_default_limit(tmp_path, 2)
    assert pools() == {"bedrock": (2, 2, True), "local_models": (3, 3, False)}
