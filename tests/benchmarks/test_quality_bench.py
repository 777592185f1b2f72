"""Benchmark: retrieval quality on LoCoMo's development split, both stores, three modes.

Run with `./dev bench -k quality` (not part of `./dev test`). The five development conversations
(tests/benchmarks/locomo_dev; the other five are held out and never used) go through the real
graph as a JSONL export (`retrieval-assets run`, the offline defaults: FastEmbed MiniLM coarse,
sentence-transformers fine, the local Titan endpoint), then every question of categories 1-4 is
searched within its own user, in LanceDB and in Postgres, dense, lexical and hybrid. A hit is a
returned chunk of the evidence's session whose turn span covers an evidence turn.

The fusion's lexical and context weights are chosen by leave-one-conversation-out: for each
conversation, the pair that maximises hit@1 + hit@5 on the other four is applied to it ("hybrid,
LOCO" rows; the pair chosen per fold is printed). The shipped defaults (LEXICAL_WEIGHT,
CONTEXT_WEIGHT) are what the other hybrid rows use, in LanceDB fused in Python and in Postgres by
match_conversation_chunks_hybrid.

Baselines in the same run: each parent alone, plain RRF (k=60), the fusion without context
(context weight 0), and the same graph with the previous fine model (MiniLM, the coarse model
itself) in place of all-mpnet-base-v2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from retrieval_assets.lib.models import DEFAULT_ST_MODEL, MINILM
from retrieval_assets.lib.search import (
    CONTEXT_WEIGHT,
    HYBRID_CANDIDATES,
    LEXICAL_WEIGHT,
    Hit,
    dense_search,
    fuse,
    lexical_search,
    postgres_match,
    postgres_search,
)
from tests.benchmarks.corpus import CACHE_DIR
from tests.benchmarks.locomo import (
    CATEGORIES,
    CONVERSATIONS,
    METRICS,
    Question,
    score,
    write_export,
)

pytestmark = pytest.mark.benchmark
# (lexical weight, context weight) pairs the leave-one-conversation-out choice tries.
WEIGHTS = [
    (lexical, context)
    for lexical in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    for context in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
]
# Set to reuse the graphs of a previous bench run (their searches are always run anew).
REUSE = os.environ.get("QUALITY_BENCH_REUSE") == "1"
Ranking = list[tuple[str, int, int]]


def spans(hits: list[Hit]) -> Ranking:
    return [(h.conversation_id, h.turn_start, h.turn_end) for h in hits]


def rrf(dense: list[Hit], lexical: list[Hit], k: int = 60) -> Ranking:
    fused: dict[str, float] = defaultdict(float)
    by_id = {h.chunk_id: h for h in [*lexical, *dense]}
    for ranking in (dense, lexical):
        for rank, hit in enumerate(ranking):
            fused[hit.chunk_id] += 1.0 / (k + rank + 1)
    return spans([by_id[c] for c in sorted(fused, key=lambda c: (-fused[c], c))[:10]])


class Graph:
    """A project directory with the export materialized by `retrieval-assets run`."""

    def __init__(self, name: str, export: Path, **env: str) -> None:
        self.root = CACHE_DIR / f"quality-{name}"
        self.done = self.root / "materialized"
        if not (REUSE and self.done.is_file()):
            shutil.rmtree(self.root, ignore_errors=True)
            self.root.mkdir(parents=True)
        self.env = {
            "CONVERSATIONS_SOURCE": str(export),
            "RETRIEVAL_DATA_DIR": str(self.root / "data"),
            "DAGSTER_HOME": str(self.root / "home"),
            **env,
        }

    def run(self) -> float:
        if self.done.is_file():
            return 0.0
        cli = str(Path(sys.executable).with_name("retrieval-assets"))
        started = time.monotonic()
        done = subprocess.run(
            [cli, "run"], env={**os.environ, **self.env}, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        self.done.touch()
        return time.monotonic() - started


def collect(graph: Graph, questions: list[Question], monkeypatch) -> dict[str, list]:
    """Per question: each store's dense and lexical lists (HYBRID_CANDIDATES deep) and the
    Postgres hybrid's top 10 (fused in SQL at the shipped weight)."""
    from retrieval_assets.cli import _resources
    from retrieval_assets.lib.embedded_postgres import hold_embedded
    from retrieval_assets.lib.search_snapshot import current

    for key, value in graph.env.items():
        monkeypatch.setenv(key, value)
    depth = HYBRID_CANDIDATES
    out: dict[str, list] = defaultdict(list)
    started = time.monotonic()
    with (
        hold_embedded(graph.env["RETRIEVAL_DATA_DIR"]),
        _resources("lancedb", "postgres", "coarse_model", "fine_model", "titan_model") as r,
        r.lancedb.get_connection() as db,
        r.postgres.get_connection() as conn,
    ):
        table = r.lancedb.chunks_table(db)
        snapshot = current(r.lancedb.snapshot_root)
        took: dict[str, list[float]] = defaultdict(list)
        for q in questions:
            r.coarse_model.query_cache.clear()
            r.fine_model.query_cache.clear()
            began = time.perf_counter()
            out["lancedb dense"].append(
                dense_search(
                    table, r.coarse_model, r.fine_model, q.text, depth, q.user, snapshot=snapshot
                )
            )
            took["dense"].append(time.perf_counter() - began)
            began = time.perf_counter()
            out["lancedb lexical"].append(lexical_search(table, q.text, depth, q.user))
            took["lexical"].append(time.perf_counter() - began)
            out["postgres dense"].append(
                postgres_match(conn, r.titan_model.embed_query(q.text), depth, q.user)
            )
            out["postgres lexical"].append(
                postgres_search(conn, r.titan_model, q.text, depth, q.user, mode="lexical")
            )
            out["postgres hybrid (SQL)"].append(
                postgres_search(conn, r.titan_model, q.text, 10, q.user, mode="hybrid")
            )
    seconds = time.monotonic() - started
    print(f"  searched {len(questions)} questions x 5 rankings in {seconds:.0f} s")
    print(
        "  LanceDB per-user query, p50 (query embeddings uncached): "
        + ", ".join(f"{m} {1000 * np.median(t):.1f} ms" for m, t in took.items())
        + " (hybrid pays both)"
    )
    return out


def metrics(questions: list[Question], rankings: list[Ranking]) -> np.ndarray:
    return np.array([score(q, r) for q, r in zip(questions, rankings, strict=True)])


def loco(
    questions: list[Question], rank_with: Callable[[int, tuple[float, float]], Ranking]
) -> tuple[list[Ranking], dict[str, tuple[float, float]]]:
    """Each conversation ranked with the weights that maximise hit@1 + hit@5 on the others."""
    per_weight = {
        w: metrics(questions, [rank_with(i, w) for i in range(len(questions))]) for w in WEIGHTS
    }
    chosen: dict[str, tuple[float, float]] = {}
    rankings: list[Ranking] = [[] for _ in questions]
    for held in CONVERSATIONS:
        train = np.array([q.conversation != held for q in questions])
        best = max(WEIGHTS, key=lambda w: per_weight[w][train][:, :2].sum())
        chosen[held] = best
        for i, q in enumerate(questions):
            if q.conversation == held:
                rankings[i] = rank_with(i, best)
    return rankings, chosen


def table_rows(label: str, questions: list[Question], rankings: list[Ranking]) -> list[str]:
    m = metrics(questions, rankings)
    rows = []
    groups = [("all", np.ones(len(questions), bool))] + [
        (name, np.array([q.category == c for q in questions])) for c, name in CATEGORIES.items()
    ]
    for name, mask in groups:
        values = m[mask].mean(axis=0)
        rows.append(
            f"  {label:<34} {name:<12} {int(mask.sum()):>4} "
            + " ".join(f"{v:>13.3f}" for v in values)
        )
    return rows


def report(name: str, questions: list[Question], lists: dict[str, list]) -> dict[str, np.ndarray]:
    n = len(questions)
    ranked: dict[str, list[Ranking]] = {}
    for store in ("lancedb", "postgres"):
        dense, lexical = lists[f"{store} dense"], lists[f"{store} lexical"]
        ranked[f"{store} dense"] = [spans(d[:10]) for d in dense]
        ranked[f"{store} lexical"] = [spans(x[:10]) for x in lexical]
        ranked[f"{store} RRF k=60 (baseline)"] = [rrf(dense[i], lexical[i]) for i in range(n)]
        ranked[f"{store} hybrid, no context"] = [
            spans(fuse(dense[i], lexical[i], 10, LEXICAL_WEIGHT, 0.0)) for i in range(n)
        ]
        ranked[f"{store} hybrid w={LEXICAL_WEIGHT},{CONTEXT_WEIGHT}"] = [
            spans(fuse(dense[i], lexical[i], 10)) for i in range(n)
        ]
        ranked[f"{store} hybrid, LOCO"], chosen = loco(
            questions,
            lambda i, w, dense=dense, lexical=lexical: spans(fuse(dense[i], lexical[i], 10, *w)),
        )
        print(f"  {store}: (lexical, context) weights chosen per held-out conversation: {chosen}")
    ranked["postgres hybrid (SQL)"] = [spans(h) for h in lists["postgres hybrid (SQL)"]]
    print(f"\n  {name}: turn-level metrics, {n} questions (categories 1-4)")
    print(f"  {'system':<34} {'category':<12} {'n':>4} " + " ".join(f"{m:>13}" for m in METRICS))
    for label, rankings in ranked.items():
        for row in table_rows(label, questions, rankings):
            print(row)
    overall = {label: metrics(questions, r).mean(axis=0) for label, r in ranked.items()}
    python_vs_sql = np.abs(
        overall["postgres hybrid (SQL)"]
        - overall[f"postgres hybrid w={LEXICAL_WEIGHT},{CONTEXT_WEIGHT}"]
    ).max()
    stores = np.abs(
        overall["postgres hybrid (SQL)"]
        - overall[f"lancedb hybrid w={LEXICAL_WEIGHT},{CONTEXT_WEIGHT}"]
    )
    print(
        f"  hybrid agreement, LanceDB vs Postgres (SQL): largest difference {stores.max():.3f} "
        f"({', '.join(f'{m} {d:.3f}' for m, d in zip(METRICS, stores, strict=True))}); "
        f"Postgres fused in SQL vs in Python: {python_vs_sql:.3f}"
    )
    return overall


def test_retrieval_quality_on_locomo_dev(tmp_path, monkeypatch):
    export = tmp_path / "locomo.jsonl"
    questions = write_export(export)
    print(f"\nLoCoMo dev split: {len(CONVERSATIONS)} conversations, {len(questions)} questions")
    results = {}
    for name, env in [
        # Named, not left unset: the suite's conftest sets MiniLM for its own runs.
        ("default (fine: all-mpnet-base-v2)", {"ST_MODEL": DEFAULT_ST_MODEL}),
        ("baseline (fine: all-MiniLM-L6-v2)", {"ST_MODEL": MINILM}),
    ]:
        graph = Graph(name.split()[0], export, **env)
        print(f"\n{name}: graph run {graph.run():.0f} s")
        with monkeypatch.context() as patch:
            results[name] = report(name, questions, collect(graph, questions, patch))
    print("\nSummary (all categories): hit@1 / hit@5 / session hit@1")
    for name, overall in results.items():
        for label in (
            "lancedb dense",
            "lancedb lexical",
            "lancedb hybrid, no context",
            "lancedb hybrid, LOCO",
            "postgres hybrid (SQL)",
        ):
            v = overall[label]
            print(f"  {name:<36} {label:<24} {v[0]:.3f} / {v[1]:.3f} / {v[4]:.3f}")
