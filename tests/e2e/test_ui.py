"""The product as its users drive it: `retrieval-assets ui` (dagster dev) in headless Chromium.

Starts the web UI and daemon on a free loopback port over fresh stores, materializes the whole
graph with the UI's own button, reads metadata on asset pages, turns a backlog sensor on and
watches it launch a backfill, and drives the same server through dagster-graphql's client.
Screenshots land in test-artifacts/ui/. Chromium is Debian's (/usr/bin/chromium, installed by
./dev test); Playwright only drives it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import PROJECT_ROOT

ARTIFACTS = PROJECT_ROOT / "test-artifacts" / "ui"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # this machine refuses outside connections
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Server:
    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.data_dir = root / "data"
        self.log = root / "ui.log"
        env = {
            **os.environ,
            "DAGSTER_HOME": str(root / "home"),
            "RETRIEVAL_DATA_DIR": str(self.data_dir),
        }
        env.pop("DAGSTER_POSTGRES_URL", None)
        cli = Path(sys.executable).with_name("retrieval-assets")
        self.process = subprocess.Popen(
            [str(cli), "ui", "-h", "127.0.0.1", "-p", str(self.port)],
            env=env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a process group of its own, as a terminal's job is
            # As a script's background job starts it: with SIGINT ignored (the harder case for
            # Ctrl-C, which the last test sends).
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
        wait_for(self.up, 180, f"the web UI on {self.base} (log: {self.log})")

    def up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"dagster dev exited: {self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(self.base + "/server_info", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        # dagster dev winds its processes down on SIGTERM, then `retrieval-assets ui` stops the
        # embedded server: on a loaded machine that took over 30 s, and a SIGKILL then left the
        # server running. 180 s holds under load; a SIGKILL is for a hung shutdown only.
        for sig, wait in ((signal.SIGTERM, 180), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout=wait)
                return
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `retrieval-assets ui` for the file; the last test stops it with Ctrl-C (after that
    this only makes sure, whatever happened)."""
    running = Server(tmp_path_factory.mktemp("ui"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.fail(
            "Debian's chromium is missing: `./dev test` installs it (apt-get install chromium)"
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def open_page(page, server: Server, path: str) -> None:
    page.goto(server.base + path)
    skip = page.get_by_role("button", name="Skip")  # the first-visit newsletter dialog
    try:
        skip.wait_for(timeout=5_000)
        skip.click()
    except Exception:
        pass


SENSOR_TICKS = """
query ($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    __typename
    ... on Sensor {
      sensorState {
        status
        ticks(limit: 10) {
          status timestamp skipReason runIds
          error { message errorChain { error { message stack } } }
        }
      }
    }
    ... on PythonError { message }
  }
}
"""


def graphql(server: Server, query: str, variables: dict) -> dict:
    request = urllib.request.Request(
        server.base + "/graphql",
        data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def sensor_state(server: Server, name: str) -> dict:
    """Sensor `name` as the instance records it: status and latest ticks (runs, skips, errors)."""
    selector = {
        "repositoryLocationName": "retrieval_assets",
        "repositoryName": "__repository__",
        "sensorName": name,
    }
    return graphql(server, SENSOR_TICKS, {"selector": selector})


PARTITION_STATS = """
query ($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) {
    ... on AssetNode { partitionStats { numMaterialized numPartitions numFailed } }
  }
}
"""


def partition_stats(server: Server, key: str) -> dict:
    """Shards of the vector asset `key` (a/b) materialized, failed, in all, as the UI counts."""
    found = graphql(server, PARTITION_STATS, {"key": {"path": key.split("/")}})
    return found["data"]["assetNodeOrError"]["partitionStats"]


IN_PROGRESS = """
query { runsOrError(filter: {statuses: [QUEUED, NOT_STARTED, STARTING, STARTED]}) {
  ... on Runs { results { runId } } } }
"""


CHECK_RUNS = """
query ($key: AssetKeyInput!, $name: String!) {
  assetCheckExecutions(assetKey: $key, checkName: $name, limit: 50) { runId status }
}
"""


def check_runs(server: Server, key: str, name: str) -> set[str]:
    """The runs in which check `name` of asset `key` was evaluated (the latest 50)."""
    variables = {"key": {"path": key.split("/")}, "name": name}
    found = graphql(server, CHECK_RUNS, variables)["data"]["assetCheckExecutions"]
    return {e["runId"] for e in found if e["status"] in ("SUCCEEDED", "FAILED")}


BACKFILLS = """
query { partitionBackfillsOrError { ... on PartitionBackfills { results { id status } } } }
"""


def backfill_statuses(server: Server) -> list[str]:
    found = graphql(server, BACKFILLS, {})["data"]["partitionBackfillsOrError"]["results"]
    return [b["status"] for b in found]


def runs_in_progress(server: Server) -> int:
    return len(graphql(server, IN_PROGRESS, {})["data"]["runsOrError"]["results"])


def sensor_report(server: Server, name: str) -> str:
    """The sensor's state and the daemon's last log lines: the message of a test that waited
    in vain for the sensor."""
    try:
        state = json.dumps(sensor_state(server, name), indent=1)
    except OSError as exc:
        state = f"(the GraphQL query failed: {exc})"
    daemon = [line for line in server.log.read_text().splitlines() if "dagster.daemon" in line]
    return f"sensor {name}: {state}\nlast daemon log lines:\n" + "\n".join(daemon[-25:])


STATUS = re.compile(r"\b(Success|Failure|Started|Starting|Queued|Canceled|Canceling)\b")


def run_status(page, server: Server, short_id: str) -> str | None:
    """The status the runs page shows for run `short_id` (its first 8 characters)."""
    page.goto(server.base + "/runs")
    page.get_by_text("Launched by").first.wait_for()
    page.wait_for_load_state("networkidle")
    text = page.locator("body").inner_text()
    if short_id not in text:
        return None
    found = STATUS.search(text, text.index(short_id))
    return found.group(1) if found else None


VECTOR_ASSETS = ("lancedb/coarse_vectors", "lancedb/fine_vectors", "postgres/titan_vectors")


def test_materialize_all_then_read_metadata_and_turn_a_sensor_on(page, server):
    open_page(page, server, "/asset-groups")
    page.get_by_text("vectors").first.wait_for()
    shot(page, "01-asset-graph")
    # The vector assets are partitioned by shard: the UI asks which partitions (all, by default)
    # and launches a backfill; their single-run policy makes each one run over every shard.
    page.get_by_role("button", name="Materialize all").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Partition selection").first.wait_for()
    page.wait_for_load_state("networkidle")
    dialog.get_by_role("button", name="All", exact=True).click()
    dialog.get_by_text("16 partitions").first.wait_for()
    launch = dialog.get_by_role("button", name="Launch backfill")
    wait_for(launch.is_enabled, 60, "the Launch backfill button")
    shot(page, "01b-materialize-all-partitions")
    launch.click()

    def backfill_done() -> list[str] | None:
        statuses = backfill_statuses(server)
        done = statuses and all(s not in ("REQUESTED", "CANCELING", "FAILING") for s in statuses)
        return statuses if done and runs_in_progress(server) == 0 else None

    statuses = wait_for(backfill_done, 900, "the Materialize all backfill to finish", every=5)
    assert statuses == ["COMPLETED_SUCCESS"], (statuses, server.log.read_text()[-3000:])
    for key in VECTOR_ASSETS:  # every shard of every column, as the UI counts them
        stats = partition_stats(server, key)
        assert stats["numMaterialized"] == stats["numPartitions"] == 16, (key, stats)
        assert stats["numFailed"] == 0, (key, stats)
    page.goto(server.base + "/runs")
    page.get_by_text("Launched by").first.wait_for()
    page.wait_for_load_state("networkidle")
    shot(page, "02-runs-after-materialize-all")
    assert "Failure" not in page.locator("body").inner_text(), server.log.read_text()[-3000:]

    # Each column's completeness per shard, natively.
    open_page(page, server, "/assets/lancedb/coarse_vectors?view=partitions")
    page.get_by_text("Partitions").first.wait_for()
    page.wait_for_load_state("networkidle")
    shot(page, "02b-coarse-vectors-partitions")
    open_page(page, server, "/assets/lancedb/coarse_vectors?view=events")
    body = page.locator("body")
    page.get_by_text("rows_embedded").first.wait_for()
    assert "fastembed:sentence-transformers/all-MiniLM-L6-v2" in body.inner_text()
    shot(page, "03-coarse-vectors-asset")
    open_page(page, server, "/assets/postgres/titan_vectors?view=events")
    page.get_by_text("vector_source").first.wait_for()
    assert "local Bedrock endpoint" in body.inner_text()
    shot(page, "04-titan-asset")
    open_page(page, server, "/assets/postgres/conversation_chunks")
    page.get_by_text("token_length_distribution").first.wait_for()
    shot(page, "05-chunks-asset")
    open_page(page, server, "/assets/lancedb/search_snapshot")
    page.get_by_text("graph_inserts").first.wait_for()
    assert "table_version" in body.inner_text()
    shot(page, "05b-search-snapshot-asset")
    # What an operator reads first: freshness, row count and columns, on every table-like asset.
    open_page(page, server, "/assets/lancedb/fine_vectors")
    page.get_by_text("Fails if more than 6 hours since last materialization").first.wait_for()
    text = body.inner_text()
    for shown in ("Freshness policy", "Passing", "Row count", "Columns", "vector_fine"):
        assert shown in text, shown
    shot(page, "05c-fine-vectors-freshness-row-count-columns")
    # (The server's whole log, read by the last test, carries no warning the definitions cause.)

    # A backlog appears in two shards (their vectors are cleared), then the sensor is turned on.
    import lancedb

    table = lancedb.connect(str(server.data_dir / "lancedb")).open_table("conversation_chunks")
    ids = table.search().select(["chunk_id"]).limit(None).to_arrow().column("chunk_id")
    shards = sorted({chunk_id[0] for chunk_id in ids.to_pylist()})[:2]
    table.update(
        where=" OR ".join(f"chunk_id LIKE '{shard}%'" for shard in shards),
        values_sql={"vector_coarse": "NULL"},
    )
    open_page(page, server, "/locations/retrieval_assets/sensors/coarse_backlog_sensor")
    page.get_by_text("Running").first.wait_for()
    sensor_page = "/locations/retrieval_assets/sensors/coarse_backlog_sensor"

    def sensor_status() -> str:
        return sensor_state(server, "coarse_backlog_sensor")["data"]["sensorOrError"][
            "sensorState"
        ]["status"]

    # Click (the input is drawn off-screen), then let the instance's record decide, and click
    # again only after 20 s of "STOPPED": clicking while the first click's mutation is still in
    # flight on a loaded machine would turn the sensor back off.
    for attempt in range(3):
        page.goto(server.base + sensor_page)
        page.get_by_text("Running").first.wait_for()
        if sensor_status() != "RUNNING":
            page.locator("input[type=checkbox]").first.evaluate("element => element.click()")
        try:
            wait_for(lambda: sensor_status() == "RUNNING", 20, "the sensor to be turned on")
            break
        except AssertionError:
            if attempt == 2:
                raise
    page.goto(server.base + sensor_page)
    page.get_by_text("Running").first.wait_for()
    assert page.locator("input[type=checkbox]").first.is_checked()
    shot(page, "06-sensor-turned-on")

    def launched_runs() -> list[str]:
        state = sensor_state(server, "coarse_backlog_sensor")["data"]["sensorOrError"]
        return next((t["runIds"] for t in state["sensorState"]["ticks"] if t["runIds"]), [])

    try:
        run_ids = wait_for(launched_runs, 300, "a tick of coarse_backlog_sensor to launch runs")
    except AssertionError as exc:
        open_page(page, server, sensor_page)
        shot(page, "07-sensor-launched-no-run")
        raise AssertionError(f"{exc}\n{sensor_report(server, 'coarse_backlog_sensor')}") from exc

    def runs_page_lists(run_id: str) -> str | None:
        page.goto(server.base + "/runs")
        page.get_by_text("Launched by").first.wait_for()
        page.wait_for_load_state("networkidle")
        text = page.locator("body").inner_text()
        return text if run_id[:8] in text else None

    text = wait_for(lambda: runs_page_lists(run_ids[0]), 60, f"run {run_ids[0]} on /runs", every=2)
    assert "coarse_backfill" in text and "coarse_backlog_sensor" in text
    shot(page, "07-sensor-launched-runs")
    # The shard runs finish; the column is whole again, shard by shard, and its checks ran
    # after them (null_backlog evaluated by a run of the backfill job).
    assert len(run_ids) == len(shards)  # one run per shard with a backlog
    wait_for(lambda: runs_in_progress(server) == 0, 600, "the shard runs to finish", every=5)
    assert partition_stats(server, "lancedb/coarse_vectors")["numFailed"] == 0
    evaluated_in = check_runs(server, "lancedb/coarse_vectors", "null_backlog")
    assert set(run_ids) <= evaluated_in, (run_ids, evaluated_in)
    open_page(page, server, "/assets/lancedb/coarse_vectors?view=checks")
    page.get_by_text("null_backlog").first.wait_for()
    shot(page, "07b-coarse-vectors-checks-after-shard-runs")
    open_page(page, server, "/locations/retrieval_assets/sensors/coarse_backlog_sensor")
    shot(page, "08-sensor-ticks")


def test_graphql_client_launches_a_run_and_reads_its_status(server):
    from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

    client = DagsterGraphQLClient("127.0.0.1", port_number=server.port)
    run_id = client.submit_job_execution("ingestion_job")
    status = wait_for(
        lambda: (s := client.get_run_status(run_id).value) in ("SUCCESS", "FAILURE") and s,
        300,
        f"run {run_id} of ingestion_job",
        every=2,
    )
    assert status == "SUCCESS"
    with pytest.raises(DagsterGraphQLClientError):
        client.submit_job_execution("no_such_job")


def test_ctrl_c_stops_the_ui_and_the_embedded_server_even_when_started_in_the_background(
    server,
):
    """Last in the file, on the server the other tests used (runs launched, a sensor on). It was
    started as a script's background job starts it, with SIGINT ignored; dagster dev then ignores
    SIGTERM too unless `retrieval-assets ui` gives it the default handlers."""
    import psutil

    from retrieval_assets.lib.embedded_postgres import _running_url

    # Every session the UI's processes run in: its own, and dagster dev's (a session of its
    # own, with the webserver, the daemon, code servers and run workers).
    started = psutil.Process(server.process.pid).children(recursive=True)
    sessions = {server.process.pid} | {_session_of(p) for p in started}
    assert len(sessions - {None}) >= 2, [p.cmdline() for p in started]
    os.killpg(server.process.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's process group
    server.process.wait(timeout=180)  # under load, shutting down took over 30 s (Server.stop)
    # A clean console from start to stop: no warning the project's definitions cause, and no
    # misleading instance warning.
    log = server.log.read_text()
    for noise in ("dagster.yaml", "SupersessionWarning", "BetaWarning", "PreviewWarning"):
        assert noise not in log, (noise, log[-3000:])
    left = [p for p in psutil.process_iter() if _session_of(p) in sessions - {None}]
    assert not left, [p.cmdline() for p in left]
    assert _running_url(server.data_dir / "pg") is None  # the embedded PostgreSQL stopped too


def _session_of(process) -> int | None:
    try:
        return os.getsid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None
