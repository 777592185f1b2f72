"""JSONL with one message per line (`conversation_id`, `role`, `content`, optional `user_id`,
`title`, `created_at`, and `name`, the speaker's name as in OpenAI's message format), in any
order: a format of the whole file, chosen by its suffix.

Two passes: an index of byte offsets per conversation, then each conversation's lines, so
interleaved messages still group correctly without holding the file."""

from __future__ import annotations

import codecs
import json
from array import array
from collections.abc import Iterator
from typing import IO, Any

from retrieval_assets.lib.sources.domain import (
    BadRecord,
    Conversation,
    Limits,
    ParseReport,
    Problem,
    RawTurn,
    RecordMeta,
    build_conversation,
    declined_identity,
    error_text,
)
from retrieval_assets.lib.sources.files import Opener

NAME = "jsonl"
SUFFIX = ".jsonl"


def read(
    name: str, opener: Opener, default_user: str, limits: Limits, report: ParseReport
) -> Iterator[Conversation]:
    """Two passes: index byte offsets per conversation id, then read each conversation's lines."""
    offsets: dict[str, array] = {}
    with opener() as raw:
        seekable = raw.seekable()
        for line_no, offset, message in _jsonl_messages(name, raw, report):
            conv_id = message["conversation_id"]
            offsets.setdefault(conv_id, array("q")).append(offset if seekable else line_no)
    if not seekable:  # a zip member: read it again from the start for each pass
        yield from _jsonl_group_sequential(name, opener, offsets, default_user, limits, report)
        return
    with opener() as raw:
        for conv_id, conv_offsets in offsets.items():
            messages = []
            for offset in conv_offsets:
                raw.seek(offset)
                messages.append(_json_line(raw.readline(), first=offset == 0)[0])
            where = f"conversation starting at byte {conv_offsets[0]}"
            yield from _jsonl_conversation(
                name, where, conv_id, messages, default_user, limits, report
            )


def _jsonl_group_sequential(
    name: str,
    opener: Opener,
    index: dict[str, array],
    default_user: str,
    limits: Limits,
    report: ParseReport,
) -> Iterator[Conversation]:
    grouped: dict[str, list[dict[str, Any]]] = {k: [] for k in index}
    quiet = ParseReport()
    with opener() as raw:
        for _, _, message in _jsonl_messages(name, raw, quiet):
            grouped[message["conversation_id"]].append(message)
    for conv_id, messages in grouped.items():
        where = f"conversation starting at line {index[conv_id][0]}"
        yield from _jsonl_conversation(name, where, conv_id, messages, default_user, limits, report)


def _json_line(line: bytes, first: bool) -> tuple[Any, int | None]:
    """A JSONL line's value (a UTF-8 BOM on the first line is no part of it), and the byte
    offset of the first invalid UTF-8 sequence, which is replaced with U+FFFD."""
    if first:
        line = line.removeprefix(codecs.BOM_UTF8)
    try:
        text, bad_at = line.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        text, bad_at = line.decode("utf-8", errors="replace"), exc.start
    return json.loads(text), bad_at


def _jsonl_messages(
    name: str, raw: IO[bytes], report: ParseReport
) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(line number, byte offset, message) for each valid line.

    A line that is not JSON (cut short, damaged) could have held any conversation's message:
    the read is then incomplete. A JSON line that is no message is declined (rejected)."""
    offset = 0
    for line_no, line in enumerate(raw, start=1):
        start, offset = offset, offset + len(line)
        if not line.strip():
            continue
        report.records += 1
        where = f"line {line_no} (byte {start})"
        try:
            message, bad_at = _json_line(line, first=start == 0)
        except (ValueError, RecursionError) as exc:
            cut = not line.endswith(b"\n")
            reason = "truncated line" if cut else "not valid JSON"
            detail = exc.msg if isinstance(exc, json.JSONDecodeError) else error_text(exc)
            report.unreadable(name, where, f"{reason}, line skipped: {detail}")
            continue
        if bad_at is not None:
            report.add(
                Problem("warning", name, where, f"invalid UTF-8 at byte {start + bad_at} replaced")
            )
        if not isinstance(message, dict):
            report.reject_record(name, where, "line is not a JSON object")
            continue
        conv_id = message.get("conversation_id", message.get("conversation"))
        if conv_id is None or not str(conv_id).strip():
            report.reject_record(name, where, "message has no conversation_id")
            continue
        message["conversation_id"] = conv_id if isinstance(conv_id, str) else str(conv_id)
        yield line_no, start, message


def _jsonl_conversation(
    name: str,
    origin: str,
    conv_id: str,
    messages: list[dict[str, Any]],
    default_user: str,
    limits: Limits,
    report: ParseReport,
) -> Iterator[Conversation]:
    first = messages[0]
    try:
        meta = RecordMeta(id=conv_id, user_id=first.get("user_id"), title=first.get("title"))
        raw_turns: list[RawTurn] = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):  # OpenAI-style content parts
                content = "\n".join(
                    p["text"]
                    for p in content
                    if isinstance(p, dict) and isinstance(p.get("text"), str)
                )
            raw_turns.append(
                (m.get("role"), content, m.get("created_at", m.get("timestamp")), m.get("name"))
            )
        conversation = build_conversation(
            NAME, meta, raw_turns, name, origin, default_user, limits, report
        )
    except BadRecord as exc:
        reason = str(exc)
    except Exception as exc:  # a shape no check foresaw: this conversation only
        reason = f"cannot be read as a conversation ({error_text(exc)})"
    else:
        yield conversation
        return
    identity = declined_identity(
        {"conversation_id": conv_id, "user_id": first.get("user_id")}, default_user
    )
    report.reject_record(name, origin, reason, identity)
