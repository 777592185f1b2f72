"""Benchmark: the whole graph at 10,000 and 100,000 chunks of real text, as users run it.

Run with `./dev bench -k graph` (not part of `./dev test`); GRAPH_BENCH_CHUNKS sets the sizes
(default "10000,100000"). Each size is a fresh project directory under .data/bench/graph-N; the
graph runs through `retrieval-assets run` (the multiprocess executor, as `./dev run` does), and
the figures come from the run's own event log: per stage wall time, rows/s, tokens/s, peak RSS
of the run's processes, store sizes. Then, at each size: two runs with nothing new (the first
after a real run, the second in the steady state), and a run after adding 1 % new
conversations, each beside the first run. Nothing asserts a time.
The Titan stage talks to a Bedrock-compatible endpoint in its own process that derives vectors by
hashing (Titan's model runs at AWS, not here), so it measures the client and the write path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest

from tests.benchmarks.corpus import CACHE_DIR, hash_vector_endpoint, sentences

pytestmark = pytest.mark.benchmark
SIZES = [int(n) for n in os.environ.get("GRAPH_BENCH_CHUNKS", "10000,100000").split(",")]
EXCHANGES = 2  # per conversation; one chunk each (the default tier holds an exchange)
PEAK_RSS = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)
sys.exit(code)
"""


def write_corpus(path: Path, texts: list[str], conversations: range) -> None:
    with path.open("a") as out:
        for i in conversations:
            for turn in range(2 * EXCHANGES):
                record = {
                    "conversation_id": f"bench-{i:07d}",
                    "user_id": f"user-{i % 5_000}",
                    "role": "user" if turn % 2 == 0 else "assistant",
                    "content": texts[(2 * EXCHANGES * i + turn) % len(texts)],
                    "created_at": 1_700_000_000 + i,
                }
                out.write(json.dumps(record) + "\n")


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Project:
    def __init__(self, chunks: int, texts: list[str]) -> None:
        self.root = CACHE_DIR / f"graph-{chunks}"
        shutil.rmtree(self.root, ignore_errors=True)
        (self.root / "source").mkdir(parents=True)
        self.source = self.root / "source" / "messages.jsonl"
        self.conversations = chunks // EXCHANGES
        self.texts = texts
        write_corpus(self.source, texts, range(self.conversations))

    def grow(self, fraction: float) -> int:
        new = max(1, int(self.conversations * fraction))
        write_corpus(self.source, self.texts, range(self.conversations, self.conversations + new))
        self.conversations += new
        return new

    def run(self, endpoint: str) -> dict:
        env = {
            **os.environ,
            # Titan's model runs at AWS: a hash-vector endpoint in its own process stands in, so
            # the Titan stage measures what runs here (client, retries, COPY + UPDATE writes).
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_REGION": "us-east-1",
            "BEDROCK_ENDPOINT_URL": endpoint,
            "CONVERSATIONS_SOURCE": str(self.source),
            "RETRIEVAL_DATA_DIR": str(self.root / "data"),
            "DAGSTER_HOME": str(self.root / "home"),
            "LANCEDB_KEEP_VERSIONS_MINUTES": "0",
        }
        cli = str(Path(sys.executable).with_name("retrieval-assets"))
        started = time.monotonic()
        with subprocess.Popen(
            [sys.executable, "-c", PEAK_RSS, cli, "run"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc:
            peaks = ProcessPeaks(proc.pid)
            stdout, stderr = proc.communicate()
            peaks.stop()
        wall = time.monotonic() - started
        assert proc.returncode == 0, stderr[-3000:]
        peak_kb = int(stdout.split("PEAK_RSS_KB")[-1].split()[0])
        return {"wall": wall, "peak_rss_mb": peak_kb / 1024, **self.stages(peaks.mb)}

    def stages(self, peak_mb_by_pid: dict[int, float]) -> dict:
        instance = dg.DagsterInstance.from_config(str(self.root / "home"))
        run = instance.get_runs(limit=1)[0]
        starts, stages, bounds = {}, {}, {}
        for entry in instance.all_logs(run.run_id):
            event = entry.dagster_event
            if event is None:
                continue
            if event.event_type_value in ("PIPELINE_START", "PIPELINE_SUCCESS"):
                bounds[event.event_type_value] = entry.timestamp
            if event.event_type_value == "STEP_START":
                starts[event.step_key] = entry.timestamp
                if event.pid in peak_mb_by_pid:  # each step runs in its own process
                    stages.setdefault(event.step_key, {})["peak_rss_mb"] = peak_mb_by_pid[event.pid]
            elif event.event_type_value == "STEP_SUCCESS":
                stages.setdefault(event.step_key, {})["seconds"] = (
                    entry.timestamp - starts[event.step_key]
                )
            elif event.is_step_materialization:
                materialization = event.step_materialization_data.materialization
                stages.setdefault(event.step_key, {}).update(
                    {k: v.value for k, v in materialization.metadata.items()}
                )
        # The run itself, from its start event to its end (the command adds its own start, the
        # embedded server's start and stop).
        return {"stages": stages, "run": bounds["PIPELINE_SUCCESS"] - bounds["PIPELINE_START"]}


class ProcessPeaks:
    """The peak RSS (the kernel's high-water mark, VmHWM) of every process under `root`,
    read every 100 ms until stop()."""

    def __init__(self, root: int) -> None:
        self.mb: dict[int, float] = {}
        self._root = psutil.Process(root)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(0.1):
            try:
                processes = self._root.children(recursive=True)
            except psutil.Error:
                return
            for process in processes:
                try:
                    status = Path(f"/proc/{process.pid}/status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        mb = int(line.split()[1]) / 1024
                        self.mb[process.pid] = max(self.mb.get(process.pid, 0.0), mb)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def stage_rows(result: dict) -> list[str]:
    """One line per step: step wall time (model load included), the step process's peak RSS,
    rows, the fill's own rate."""
    rows = []
    for step, m in sorted(result["stages"].items()):
        done = m.get("rows_embedded", m.get("chunks_added", m.get("rows_inserted", 0)))
        done = m.get("graph_inserts", done)  # the search snapshot: chunks put into its HNSW
        rate = f"{m['rows_per_second']:,.0f} rows/s" if m.get("rows_per_second") else ""
        tokens = f"{m['tokens_per_second']:,.0f} tokens/s" if m.get("tokens_per_second") else ""
        peak = f"{m['peak_rss_mb']:,.0f} MB" if m.get("peak_rss_mb") else ""
        rows.append(
            f"    {step[:44]:<44} {m.get('seconds', 0.0):7.1f} s {peak:>9} {done:>8} {rate:>13} "
            f"{tokens:>16}  {m.get('model', '')}"
        )
    return rows


def embedded(result: dict) -> dict[str, int]:
    return {
        step: m["rows_embedded"] for step, m in result["stages"].items() if "rows_embedded" in m
    }


@pytest.fixture(scope="module")
def endpoint():
    with hash_vector_endpoint() as url:
        yield url


def test_whole_graph_at_scale(endpoint):
    texts = sentences(2 * EXCHANGES * max(SIZES) // 2 + 1_000)
    print(f"\n== whole graph: {len(texts):,} real sentences, sizes {SIZES}")
    firsts = {}
    for chunks in SIZES:
        project = Project(chunks, texts)
        first = project.run(endpoint)
        firsts[chunks] = first
        data = project.root / "data"
        lance_mb, pg_mb = du(data / "lancedb") / 1e6, du(data / "pg") / 1e6
        snapshot_mb = du(data / "lancedb" / "_search_snapshot") / 1e6
        print(
            f"\n  {chunks:,} chunks, first run: {first['wall']:.0f} s wall ({first['run']:.0f} s "
            f"in the run), peak RSS {first['peak_rss_mb']:,.0f} MB; on disk: LanceDB "
            f"{lance_mb - snapshot_mb:,.0f} MB + search snapshot {snapshot_mb:,.0f} MB, "
            f"Postgres {pg_mb:,.0f} MB"
        )
        print("\n".join(stage_rows(first)))
        for label in ("after the first run", "again (steady state)"):
            idle = project.run(endpoint)
            print(
                f"  {chunks:,} chunks, nothing new, {label}: {idle['wall']:.1f} s for the "
                f"command, {idle['run']:.1f} s in the run (target ≤ 15 s) = "
                f"{idle['wall'] / first['wall']:.1%} of the first; rows embedded {embedded(idle)}"
            )
            assert all(n == 0 for n in embedded(idle).values())  # nothing new: no model called
        new = project.grow(0.01)
        grown = project.run(endpoint)
        print(
            f"  {chunks:,} chunks, after adding {new:,} conversations (1 %): {grown['wall']:.0f} s"
            f" = {grown['wall'] / first['wall']:.1%} of the first; rows embedded "
            f"{embedded(grown)}"
        )
        print("\n".join(stage_rows(grown)))
        assert set(embedded(grown).values()) == {new * EXCHANGES}
        m = grown["stages"].get("lancedb__chunk_table_maintenance", {})
        if m:
            print(
                f"  LanceDB maintenance (+1 % run): versions {m['versions_before']} → "
                f"{m['versions_after']}, fragments {m['fragments_before']} → "
                f"{m['fragments_after']} (small {m['small_fragments_before']} → "
                f"{m['small_fragments_after']})"
            )
    if len(SIZES) > 1:
        small, large = firsts[min(SIZES)], firsts[max(SIZES)]
        growth = large["peak_rss_mb"] / small["peak_rss_mb"] - 1
        print(
            f"\n  peak RSS {min(SIZES):,} → {max(SIZES):,} chunks: {small['peak_rss_mb']:,.0f} → "
            f"{large['peak_rss_mb']:,.0f} MB ({growth:+.0%}; targets ≤ 2,048 MB and within 20 %)"
        )
