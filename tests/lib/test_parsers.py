"""Every export format, and every kind of bad input, through the streaming readers."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from retrieval_assets.lib.paths import SAMPLE_DATA_DIR
from retrieval_assets.lib.sources import ParseReport, read_conversations


def read(path: Path, **kw) -> tuple[list, ParseReport]:
    report = ParseReport()
    conversations = list(read_conversations(path, default_user_id="u0", report=report, **kw))
    return conversations, report


def sharegpt(conv_id: str, *turns: tuple[str, str]) -> dict:
    return {"id": conv_id, "conversations": [{"from": r, "value": v} for r, v in turns]}


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def test_bundled_samples_cover_every_format():
    conversations, report = read(SAMPLE_DATA_DIR)
    assert {c.source_format for c in conversations} == {"chatgpt", "claude", "sharegpt", "jsonl"}
    assert report.conversations == len(conversations) == 12
    assert report.complete and report.rejected == 0 and report.warnings == 0


def test_chatgpt_follows_the_current_branch_only():
    conversations, _ = read(SAMPLE_DATA_DIR / "chatgpt" / "conversations.json")
    texts = [t.content for c in conversations for t in c.turns]
    assert not any("regenerated draft" in t for t in texts)
    first = next(c for c in conversations if c.title == "Sourdough starter troubleshooting")
    assert [t.role for t in first.turns] == ["user", "assistant", "user", "assistant", "user"]
    assert first.turns[0].content.startswith("My sourdough starter")
    assert first.turns[0].created_at is not None


def test_claude_export_keeps_account_user_and_sender_roles():
    conversations, _ = read(SAMPLE_DATA_DIR / "claude" / "conversations.json")
    assert {c.user_id for c in conversations} == {"sample-user-claude"}
    assert conversations[0].turns[0].role == "human"


def test_sharegpt_keeps_any_role_names(tmp_path):
    path = write_json(
        tmp_path / "s.json",
        [sharegpt("a", ("human", "hi"), ("gpt", "hello"), ("narrator", "later that day"))],
    )
    (conv,), _ = read(path)
    assert [t.role for t in conv.turns] == ["human", "gpt", "narrator"]
    assert conv.user_id == "u0"


def test_jsonl_groups_interleaved_messages_in_file_order(tmp_path):
    lines = [
        {"conversation_id": "a", "role": "user", "content": "a1"},
        {"conversation_id": "b", "role": "user", "content": "b1"},
        {"conversation_id": "a", "role": "assistant", "content": "a2"},
        {"conversation_id": "b", "role": "assistant", "content": [{"type": "text", "text": "b2"}]},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    conversations, report = read(path)
    assert {c.id: [t.content for t in c.turns] for c in conversations} == {
        "a": ["a1", "a2"],
        "b": ["b1", "b2"],
    }
    assert report.complete


def test_zip_export_is_read_member_by_member(tmp_path):
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("conversations.json", json.dumps([sharegpt("z1", ("user", "zipped"))]))
        z.writestr(
            "more/messages.jsonl",
            json.dumps({"conversation_id": "z2", "role": "user", "content": "line"}) + "\n",
        )
    conversations, report = read(archive)
    assert sorted(c.id for c in conversations) == ["z1", "z2"]
    assert all("export.zip!" in f for f in report.files)


def test_single_object_json_file(tmp_path):
    path = write_json(tmp_path / "one.json", sharegpt("solo", ("user", "just me")))
    (conv,), _ = read(path)
    assert conv.id == "solo"


def test_truncated_file_keeps_records_before_the_cut_and_names_the_position(tmp_path):
    records = [sharegpt(f"c{i}", ("user", f"message {i} " * 50)) for i in range(20)]
    text = json.dumps(records)
    path = tmp_path / "cut.json"
    path.write_text(text[: len(text) * 2 // 3])
    conversations, report = read(path)
    assert 5 < len(conversations) < 20
    assert [c.id for c in conversations] == [f"c{i}" for i in range(len(conversations))]
    assert report.incomplete_files == [str(path)]
    assert not report.complete
    (error,) = [p for p in report.problems if p.severity == "error"]
    assert error.file == str(path) and "byte" in error.position and "truncated" in error.reason


def test_invalid_records_are_rejected_by_index_and_the_rest_kept(tmp_path):
    path = write_json(
        tmp_path / "mixed.json",
        [
            sharegpt("good1", ("user", "fine")),
            {"something": "else"},
            "not an object",
            sharegpt("", ("user", "no id")),
            sharegpt("good2", ("user", "also fine")),
        ],
    )
    conversations, report = read(path)
    assert [c.id for c in conversations] == ["good1", "good2"]
    # Declined records are counted, but the file was read to its end: the read is complete.
    assert report.rejected_records == 3 and report.complete
    positions = [p.position for p in report.problems]
    assert any(p.startswith("record 1 ") for p in positions)
    assert any(p.startswith("record 2 ") for p in positions)
    assert all(p.file == str(path) for p in report.problems)


def test_invalid_utf8_in_json_is_replaced_and_reported_by_byte(tmp_path):
    good = json.dumps([sharegpt("u1", ("user", "caf\u00e9 XX ok"))]).encode()
    broken = good.replace(b"XX", b"\xff\xfe")
    path = tmp_path / "bad-utf8.json"
    path.write_bytes(broken)
    (conv,), report = read(path)
    assert "\ufffd" in conv.turns[0].content and "ok" in conv.turns[0].content
    warnings = [p for p in report.problems if "UTF-8" in p.reason]
    bad_at = broken.index(b"\xff")
    assert warnings and warnings[0].position == f"byte {bad_at}"


def test_invalid_utf8_in_jsonl_is_replaced_and_reported_by_byte(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(
        b'{"conversation_id": "a", "role": "user", "content": "fine"}\n'
        b'{"conversation_id": "a", "role": "assistant", "content": "bad \xc3\x28"}\n'
        b'{"conversation_id": "a", "role": "assistant", "content": "fine again"}\n'
    )
    (conv,), report = read(path)
    assert [t.content for t in conv.turns] == ["fine", "bad \ufffd(", "fine again"]
    (problem,) = report.problems
    assert problem.severity == "warning" and problem.position.startswith("line 2 ")
    assert "UTF-8 at byte" in problem.reason and report.complete


def test_truncated_jsonl_last_line_is_rejected_by_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"conversation_id": "a", "role": "user", "content": "x"}\n'
        '{"conversation_id": "a", "role": "assist'
    )
    (conv,), report = read(path)
    assert len(conv.turns) == 1
    assert (
        report.problems[0].position.startswith("line 2")
        and "truncated" in report.problems[0].reason
    )
    # The cut line could have held any conversation's message: nothing may be deleted.
    assert not report.complete


def test_empty_messages_are_skipped_with_a_warning(tmp_path):
    path = write_json(
        tmp_path / "e.json",
        [
            sharegpt("keeps", ("user", "question"), ("assistant", "   "), ("user", "again")),
            sharegpt("empty", ("user", ""), ("assistant", "\n")),
        ],
    )
    conversations, report = read(path)
    assert [c.id for c in conversations] == ["keeps"]
    assert [t.content for t in conversations[0].turns] == ["question", "again"]
    assert any("empty message" in p.reason and "message 1" in p.position for p in report.problems)
    assert any("no non-empty messages" in p.reason for p in report.problems)


def test_ten_megabyte_message_is_rejected_and_the_rest_kept(tmp_path):
    path = write_json(
        tmp_path / "big.json",
        [
            sharegpt("big", ("user", "small question"), ("assistant", "x" * 10_000_000)),
            sharegpt("after", ("user", "still read")),
        ],
    )
    conversations, report = read(path)
    assert [c.id for c in conversations] == ["big", "after"]
    assert len(conversations[0].turns) == 1
    (problem,) = report.problems
    assert "10,000,000 characters" in problem.reason and "message 1" in problem.position


def test_duplicate_ids_keep_the_first_and_name_it(tmp_path):
    path = write_json(
        tmp_path / "d.json",
        [
            sharegpt("same", ("user", "first")),
            sharegpt("same", ("user", "second")),
        ],
    )
    (conv,), report = read(path)
    assert conv.turns[0].content == "first"
    (problem,) = report.problems
    assert "duplicate conversation id 'same'" in problem.reason and "record 0" in problem.reason
    assert problem.position.startswith("record 1")


def test_cyclic_chatgpt_tree_is_rejected(tmp_path):
    node = lambda i, parent: {  # noqa: E731
        "id": i,
        "parent": parent,
        "children": [],
        "message": {"author": {"role": "user"}, "content": {"parts": [f"text {i}"]}},
    }
    record = {
        "id": "loop",
        "mapping": {"a": node("a", "b"), "b": node("b", "a")},
        "current_node": "a",
    }
    path = write_json(tmp_path / "c.json", [record, sharegpt("ok", ("user", "fine"))])
    conversations, report = read(path)
    assert [c.id for c in conversations] == ["ok"]
    assert any("cycle" in p.reason for p in report.problems)


def test_very_deep_chatgpt_tree_is_read_without_recursion(tmp_path):
    depth = 5_000
    mapping = {
        str(i): {
            "id": str(i),
            "parent": str(i - 1) if i else None,
            "children": [],
            "message": {
                "author": {"role": "user" if i % 2 else "assistant"},
                "content": {"parts": [f"turn {i}"]},
            },
        }
        for i in range(depth)
    }
    path = write_json(
        tmp_path / "deep.json", [{"id": "deep", "mapping": mapping, "current_node": str(depth - 1)}]
    )
    (conv,), _ = read(path)
    assert len(conv.turns) == depth and conv.turns[-1].content == f"turn {depth - 1}"


def test_control_characters_are_removed_with_a_warning(tmp_path):
    path = write_json(
        tmp_path / "ctl.json", [sharegpt("ctl", ("user", "nul\x00 bell\x07 tab\tnewline\nend"))]
    )
    (conv,), report = read(path)
    assert conv.turns[0].content == "nul bell tab\tnewline\nend"
    assert "2 control characters removed" in report.problems[0].reason


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        read(tmp_path / "does-not-exist")
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        read(empty)


def test_a_new_format_is_one_module_and_one_registry_line(tmp_path, monkeypatch):
    """A format module names itself, says which records are its own and reads one into
    (meta, raw turns); the registry line makes the reader use it for every JSON record."""
    from types import SimpleNamespace

    from retrieval_assets.lib.sources import registry
    from retrieval_assets.lib.sources.domain import RecordMeta

    threads = SimpleNamespace(
        NAME="threads",
        DESCRIPTION="Threads (posts)",
        recognises=lambda record: isinstance(record.get("posts"), list),
        read=lambda record, name, origin, limits, report: (
            RecordMeta(id=record["thread_id"], title=record.get("subject")),
            [(p["author"], p["body"], p.get("at")) for p in record["posts"]],
        ),
    )
    path = write_json(
        tmp_path / "threads.json",
        [
            {"thread_id": "t1", "subject": "s", "posts": [{"author": "user", "body": "hello"}]},
            sharegpt("g1", ("human", "hi there")),
        ],
    )
    conversations, report = read(path)
    assert [c.id for c in conversations] == ["g1"] and report.rejected_records == 1
    assert "not a ChatGPT (mapping), Claude (chat_messages) or ShareGPT" in str(report.problems[0])

    monkeypatch.setattr(registry, "RECORD_FORMATS", (*registry.RECORD_FORMATS, threads))
    conversations, report = read(path)
    assert {(c.id, c.source_format) for c in conversations} == {
        ("t1", "threads"),
        ("g1", "sharegpt"),
    }
    assert report.rejected_records == 0


def test_jsonl_speaker_names_reach_the_turns_and_the_content_hash(tmp_path):
    named = [
        {"conversation_id": "a", "role": "user", "name": " Caroline ", "content": "hi Mel"},
        {"conversation_id": "a", "role": "assistant", "name": "Melanie", "content": "hey"},
        {"conversation_id": "b", "role": "user", "name": 42, "content": "no name"},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in named) + "\n")
    conversations, report = read(path)
    by_id = {c.id: c for c in conversations}
    assert [(t.role, t.name, t.speaker) for t in by_id["a"].turns] == [
        ("user", "Caroline", "Caroline"),
        ("assistant", "Melanie", "Melanie"),
    ]
    assert by_id["a"].turns_json()[0]["name"] == "Caroline"
    assert by_id["b"].turns[0].name is None and "name" not in by_id["b"].turns_json()[0]
    # A name is part of what chunks derive from; a turn without one hashes as it always did.
    unnamed = [{k: v for k, v in m.items() if k != "name"} for m in named]
    path.write_text("\n".join(json.dumps(x) for x in unnamed) + "\n")
    again = {c.id: c for c in read(path)[0]}
    assert again["a"].content_hash != by_id["a"].content_hash
    assert again["b"].content_hash == by_id["b"].content_hash
    assert report.complete
