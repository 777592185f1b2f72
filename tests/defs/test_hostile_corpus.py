"""A hostile export fed through the graph: every bad record is named, every good one lands."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import lancedb

from retrieval_assets.defs.conversations.assets import conversation_chunks, conversations
from retrieval_assets.lib.connection import connect
from retrieval_assets.lib.lancedb_store import CHUNKS_TABLE
from tests.conftest import ALL_SHARDS, coarse_vectors


def sharegpt(conv_id: str, *turns: tuple[str, str]) -> dict:
    return {"id": conv_id, "conversations": [{"from": r, "value": v} for r, v in turns]}


def chatgpt_node(i: str, parent: str | None, text: str) -> dict:
    return {
        "id": i,
        "parent": parent,
        "children": [],
        "message": {"author": {"role": "user"}, "content": {"parts": [text]}},
    }


def hostile_corpus(root: Path) -> dict[str, str]:
    """Writes the corpus; returns {file name: what the run must say about it}."""
    root.mkdir()
    good = [
        sharegpt(f"good-{i}", ("user", f"good question {i}"), ("gpt", "an answer"))
        for i in range(3)
    ]
    text = json.dumps([*good, *(sharegpt(f"cut-{i}", ("user", "x " * 200)) for i in range(10))])
    (root / "truncated.json").write_text(text[: len(text) - 500])
    (root / "invalid_utf8.jsonl").write_bytes(
        b'{"conversation_id": "utf", "role": "user", "content": "fine line"}\n'
        b'{"conversation_id": "utf", "role": "user", "content": "bad \xff\xfe bytes"}\n'
    )
    huge = {"conversation_id": "huge", "role": "user", "content": "y" * 10_000_001}
    ok = {"conversation_id": "huge", "role": "user", "content": "a normal message"}
    (root / "huge.jsonl").write_text(json.dumps(huge) + "\n" + json.dumps(ok) + "\n")
    (root / "empty_turns.json").write_text(
        json.dumps(
            [
                sharegpt("empty", ("user", "   "), ("gpt", "")),
                sharegpt("half", ("user", ""), ("gpt", "kept")),
            ]
        )
    )
    depth = 5_000
    deep = {
        str(i): chatgpt_node(str(i), str(i - 1) if i else None, f"turn {i}") for i in range(depth)
    }
    cyclic = {"a": chatgpt_node("a", "b", "loop a"), "b": chatgpt_node("b", "a", "loop b")}
    (root / "trees.json").write_text(
        json.dumps(
            [
                {"id": "loop", "mapping": cyclic, "current_node": "a"},
                {"id": "deep", "mapping": deep, "current_node": str(depth - 1)},
            ]
        )
    )
    (root / "duplicates.json").write_text(
        json.dumps(
            [sharegpt("twice", ("user", "first copy")), sharegpt("twice", ("user", "second copy"))]
        )
    )
    (root / "roles.json").write_text(
        json.dumps([sharegpt("roles", ("user", "hi"), ("narrator", "meanwhile"))])
    )
    (root / "control.json").write_text(
        json.dumps([sharegpt("ctl", ("user", "bell\x07 and nul\x00 here"))])
    )
    return {
        "truncated.json": "truncated",
        "invalid_utf8.jsonl": "line 2",
        "huge.jsonl": "exceeds the limit",
        "empty_turns.json": "no non-empty messages",
        "trees.json": "cycle",
        "duplicates.json": "twice",
        "roles.json": "unknown role 'narrator'",
        "control.json": "control characters removed",
    }


def test_hostile_corpus_names_every_problem_and_lands_the_good_records(
    tmp_path, make_graph_resources, db, lance_uri
):
    expectations = hostile_corpus(tmp_path / "export")
    result = dg.materialize(
        [conversations, conversation_chunks, coarse_vectors],
        tags=ALL_SHARDS,
        resources=make_graph_resources(tmp_path / "export"),
    )
    [event] = [
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key.to_user_string() == "postgres/conversations"
    ]
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    problems = metadata["problems"]
    for name, expected in expectations.items():
        lines = [line for line in problems.splitlines() if name in line]
        assert any(expected in line for line in lines), (name, expected, lines)
    # invalid UTF-8 is repaired (a warning), as in JSON files; the rest are rejections
    assert metadata["rejected"] >= 4 and metadata["warnings"] >= 4
    assert metadata["deletions_propagated"] is False  # a truncated file holds deletions back
    with connect(db) as conn:
        ids = {r[0] for r in conn.execute("SELECT external_id FROM conversations")}
        deep_turns = conn.execute(
            "SELECT turn_count FROM conversations WHERE external_id = 'deep'"
        ).fetchone()
    assert {
        "good-0",
        "good-1",
        "good-2",
        "utf",
        "huge",
        "half",
        "deep",
        "twice",
        "roles",
        "ctl",
    } <= ids
    assert not ids & {"loop", "empty"}
    assert deep_turns == (5_000,)
    table = lancedb.connect(lance_uri).open_table(CHUNKS_TABLE)
    assert table.count_rows("vector_coarse IS NULL") == 0 and table.count_rows() > 0
