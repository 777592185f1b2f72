"""A celery deployment on this machine for the scale-out test and benchmark: Redis as the broker
(Debian's redis-server on loopback), Dagster's instance storage in Postgres (dagster-postgres, a
database on the embedded server), the project's stores, a corpus whose first conversations are
embedded in every column and whose new ones wait in the backlog, and `retrieval-assets worker`
processes. Everything it starts it stops.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from retrieval_assets import cli
from retrieval_assets.lib.lancedb_store import LanceDBResource
from retrieval_assets.lib.models import MINILM
from retrieval_assets.lib.schema import ensure_schema
from tests import PROJECT_ROOT
from tests.conftest import write_jsonl_source
from tests.services import clean_environ, database_on, redis_server

BIN = Path(sys.executable).parent


@dataclass
class Cluster:
    env: dict[str, str]
    root: Path
    broker: str

    @property
    def lancedb(self) -> LanceDBResource:
        return LanceDBResource(uri=self.env["LANCEDB_URI"])

    def runs(self, *args: str, on_start=None) -> list[dict]:
        """tests.celery_runs with this cluster's settings; the runs it reports."""
        log = self.root / "runs.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.celery_runs", *args],
            cwd=PROJECT_ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=log.open("a"),
            text=True,
            start_new_session=True,
        )
        if on_start is not None:
            threading.Thread(target=on_start, daemon=True).start()
        try:
            out, _ = process.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise AssertionError(f"runs still going after 600 s: {log.read_text()[-4000:]}")
        assert process.returncode == 0, log.read_text()[-4000:]
        reports = [json.loads(line) for line in out.splitlines()]
        return [r for r in reports if "run_id" in r]


@contextmanager
def celery_cluster(pg_url: str, root: Path, first: int, new: int) -> Iterator[Cluster]:
    """Broker, databases, instance and stores, with `first` conversations embedded in every
    vector column (which makes the columns) and `new` more chunked only: the backlog. No
    worker yet (`workers`)."""
    with redis_server(root) as broker:
        app_db = database_on(pg_url, "celery_app")
        ensure_schema(app_db, upgrade=True)
        env = {
            **clean_environ(),
            "ST_MODEL": MINILM,
            "DATABASE_URL": app_db,
            "DAGSTER_POSTGRES_URL": database_on(pg_url, "celery_dagster"),
            "CELERY_BROKER_URL": broker,
            "RETRIEVAL_DATA_DIR": str(root / "data"),
            "LANCEDB_URI": str(root / "lancedb"),
            "CONVERSATIONS_SOURCE": str(root / "source"),
            "DAGSTER_HOME": str(root / "home"),
            "PYTHONPATH": str(PROJECT_ROOT),
        }
        # The instance file (Postgres storage), written once before workers and runs read it.
        (root / "home").mkdir()
        instance = cli.instance_yaml(env["DAGSTER_HOME"], env)
        (root / "home" / "dagster.yaml").write_text(instance)
        for conversations, extra in ((first, ["--with-vectors"]), (first + new, [])):
            write_jsonl_source(root / "source", range(conversations))
            ingest = subprocess.run(
                [sys.executable, "-m", "tests.celery_runs", "ingest", *extra],
                cwd=PROJECT_ROOT,
                env={k: v for k, v in env.items() if k != "CELERY_BROKER_URL"},
                capture_output=True,
                text=True,
                timeout=1200,
            )
            assert ingest.returncode == 0, ingest.stderr[-4000:]
        yield Cluster(env, root, broker)


def _wait_for_workers(broker: str, names: set[str], workers, seconds: float = 180) -> None:
    from celery import Celery

    app = Celery(broker=broker, backend=broker)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert all(w.poll() is None for w in workers), "a worker exited while starting"
        answered = app.control.inspect(timeout=1.0).ping() or {}
        if {name.split("@")[0] for name in answered} >= names:
            return
        time.sleep(1)
    raise AssertionError(f"workers {names} did not answer in {seconds}s")


@contextmanager
def workers(cluster: Cluster, count: int) -> Iterator[list[str]]:
    """`count` workers (w1, w2, ...), each running one step at a time; stopped after."""
    names = [f"w{i + 1}" for i in range(count)]
    started = [
        subprocess.Popen(
            [str(BIN / "retrieval-assets"), "worker", "--name", name],
            env=cluster.env,
            stdout=(cluster.root / f"{name}.log").open("a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for name in names
    ]
    try:
        _wait_for_workers(cluster.broker, set(names), started)
        yield names
    finally:
        for worker in started:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
        for worker in started:
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
