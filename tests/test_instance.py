"""The Dagster instance: the project's dagster.yaml, and Postgres storage by environment."""

from __future__ import annotations

import dagster as dg
import psycopg
import yaml

from retrieval_assets import cli
from tests import PROJECT_ROOT


def test_local_instance_uses_the_project_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.delenv("DAGSTER_POSTGRES_URL", raising=False)
    cli._ensure_dagster_home()
    config = yaml.safe_load((tmp_path / "dagster.yaml").read_text())
    assert config == yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text())
    assert config["telemetry"] == {"enabled": False}
    assert config["run_retries"]["enabled"] is True
    assert config["concurrency"]["pools"]["default_limit"] >= 1
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    assert type(instance.run_storage).__name__ == "SqliteRunStorage"
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

    @dg.asset
    def probe() -> None:
        return None

    result = dg.materialize([probe], instance=instance)
    assert instance.get_run_by_id(result.run_id).is_success
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
