"""Streaming readers for chat exports.

Formats, detected per record so one directory can hold several:
- ChatGPT `conversations.json` (a `mapping` message tree; the branch ending at `current_node`),
- Claude `conversations.json` (`chat_messages`),
- ShareGPT JSON (`[{"id", "conversations": [{"from", "value"}]}]`, role names kept as given),
- JSONL with one message per line (`conversation_id`, `role`, `content`, optional `user_id`,
  `title`, `created_at`), in any order.

Nothing is loaded whole: JSON arrays go through ijson, JSONL line by line (plus an index of byte
offsets per conversation, so interleaved messages still group correctly). Every problem is recorded
on the `ParseReport` with the file and position; good records keep flowing.

Two kinds of problem, kept apart because deletions depend on them:
- a part of the source that could not be read (a directory or file this process cannot open, a
  corrupt zip, JSON cut short, a JSONL line that is not JSON) makes the read *incomplete*: what
  it held is unknown, so nothing may be deleted;
- a record that was read but declined (wrong shape, no id, no text) is *rejected* and counted.
  The read stays complete; a rejected record whose id is known keeps its stored version.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import itertools
import json
import os
import re
import zipfile
import zlib
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import IO, Any

import dagster as dg
import ijson
from pydantic import Field

from retrieval_assets.lib.paths import SAMPLE_DATA_DIR

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".zip")
# Zips inside zips are read too, down to this depth (a bound against archive bombs).
MAX_ZIP_DEPTH = 3
# Objects and arrays nested deeper than this inside one record reject that record (ijson's own
# builder is quadratic in depth: 200 KB of brackets took minutes).
MAX_NESTING = 64
USER_ROLES = frozenset({"user", "human"})
# C0 controls other than tab, newline and carriage return (Postgres text cannot even hold NUL).
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_ESCAPED_BYTES = re.compile(r"[\udc80-\udcff]")
# Any UTF-16 surrogate left in decoded text is a lone one (JSON "\\udfff"): not encodable.
_SURROGATES = re.compile(r"[\ud800-\udfff]")
_READ_SIZE = 1 << 16
_MAX_KEPT_PROBLEMS = 200


class BadRecord(ValueError):
    """A record that cannot become a conversation; the message says why."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what one record may hold."""

    max_message_chars: int = 200_000
    max_turns: int = 100_000


@dataclass(frozen=True)
class Turn:
    role: str
    content: str
    created_at: datetime | None = None


@dataclass(frozen=True)
class Conversation:
    """One conversation. `id` is the export's id when parsed, and the stored key (unique per
    user and export id, see ingest.conversation_key) when read back from Postgres."""

    id: str
    user_id: str
    title: str | None
    source_format: str
    origin: str
    turns: tuple[Turn, ...]
    created_at: datetime | None
    updated_at: datetime | None

    @property
    def content_hash(self) -> str:
        """Hash of everything the chunks derive from; unchanged hash means unchanged chunks."""
        payload = [self.user_id, self.title, [[t.role, t.content] for t in self.turns]]
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()

    def turns_json(self) -> list[dict[str, Any]]:
        return [
            {
                "role": t.role,
                "content": t.content,
                "created_at": t.created_at.isoformat() if t.created_at else None,
            }
            for t in self.turns
        ]


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" (file unreadable past this point), "rejected" (record), "warning"
    file: str
    position: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.position}: {self.reason}"


@dataclass
class ParseReport:
    """Counts and a bounded sample of problems for one read of a source."""

    on_problem: Callable[[Problem], None] | None = None
    files: list[str] = field(default_factory=list)
    # Paths (files, directories, zip members) that could not be read to their end.
    incomplete_files: list[str] = field(default_factory=list)
    records: int = 0
    conversations: int = 0
    turns: int = 0
    rejected: int = 0
    warnings: int = 0
    errors: int = 0
    # Whole records (not single messages) that were read but declined.
    rejected_records: int = 0
    # (user id, conversation id) of rejected records whose id could be read: their stored
    # versions are kept, not deleted as vanished.
    held_back: set[tuple[str, str]] = field(default_factory=set)
    problems: list[Problem] = field(default_factory=list)

    def add(self, problem: Problem) -> None:
        if problem.severity == "rejected":
            self.rejected += 1
        elif problem.severity == "error":
            self.errors += 1
        else:
            self.warnings += 1
        if len(self.problems) < _MAX_KEPT_PROBLEMS:
            self.problems.append(problem)
        if self.on_problem is not None:
            self.on_problem(problem)

    def reject_record(
        self, file: str, position: str, reason: str, identity: tuple[str, str] | None = None
    ) -> None:
        self.rejected_records += 1
        if identity is not None:
            self.held_back.add(identity)
        self.add(Problem("rejected", file, position, reason))

    def unreadable(self, path: str, position: str, reason: str) -> None:
        """A part of the source that could not be read: the read is incomplete."""
        self.incomplete_files.append(path)
        self.add(Problem("error", path, position, reason))

    @property
    def complete(self) -> bool:
        """True when every path under the source was read to its end, so that absence from the
        source means deletion. Declined records do not make a read incomplete."""
        return not self.incomplete_files


def _error_text(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_export(name: str) -> bool:
    return name.lower().endswith(SUPPORTED_SUFFIXES)


def source_files(source: Path, report: ParseReport) -> list[Path]:
    """The export files under `source` (a file or a directory), in a stable order.

    A directory that cannot be listed is reported as unreadable (Path.rglob skips it silently, and
    its conversations would then count as deleted)."""
    if not source.exists():
        raise FileNotFoundError(f"conversation source {source} does not exist")
    if not source.is_dir():
        return [source]

    def unreadable(error: OSError) -> None:
        if report is not None:
            report.unreadable(
                str(error.filename or source),
                "directory",
                f"cannot be listed: {_error_text(error)}",
            )

    files = []
    for folder, dirs, names in os.walk(source, onerror=unreadable):
        dirs.sort()
        files += [Path(folder) / n for n in names if _is_export(n)]
    files.sort()
    if not files and not report.incomplete_files:
        raise FileNotFoundError(
            f"conversation source {source} holds no {', '.join(SUPPORTED_SUFFIXES)} files"
        )
    return files


def read_conversations(
    source: Path,
    *,
    default_user_id: str,
    report: ParseReport,
    limits: Limits = Limits(),
) -> Iterator[Conversation]:
    """Yield every valid conversation under `source`; problems go to `report`.

    Nothing raised while reading one file or record escapes: it is recorded with its place."""
    first_seen: dict[tuple[str, str], str] = {}
    for path in source_files(source, report):
        for name, opener in _members(path, report):
            report.files.append(name)
            reader = _read_jsonl if name.lower().endswith(".jsonl") else _read_json
            try:
                for conv in reader(name, opener, default_user_id, limits, report):
                    identity = (conv.user_id, conv.id)
                    if identity in first_seen:
                        report.add(
                            Problem(
                                "rejected",
                                name,
                                conv.origin,
                                f"duplicate conversation id {conv.id!r} of user "
                                f"{conv.user_id!r} (first at {first_seen[identity]})",
                            )
                        )
                        continue
                    first_seen[identity] = f"{name}: {conv.origin}"
                    report.conversations += 1
                    report.turns += len(conv.turns)
                    yield conv
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                report.unreadable(name, "while reading", f"cannot be read: {_error_text(exc)}")


Opener = Callable[[], IO[bytes]]


def _members(path: Path, report: ParseReport) -> Iterator[tuple[str, Opener]]:
    """(display name, opener) for a plain file or each export file inside a zip (and inside
    zips within it); an archive that cannot be opened is reported, not raised."""
    if not path.name.lower().endswith(".zip"):
        yield str(path), lambda: path.open("rb")
        return
    try:
        with zipfile.ZipFile(path) as archive:
            yield from _archive_members(str(path), archive, report, depth=1)
    except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
        report.unreadable(str(path), "archive", f"cannot be opened: {_error_text(exc)}")


def _archive_members(
    name: str, archive: zipfile.ZipFile, report: ParseReport, depth: int
) -> Iterator[tuple[str, Opener]]:
    for info in sorted(archive.infolist(), key=lambda i: i.filename):
        member = f"{name}!{info.filename}"
        if info.is_dir() or not _is_export(info.filename):
            continue
        if not info.filename.lower().endswith(".zip"):
            yield member, partial(archive.open, info)
            continue
        if depth >= MAX_ZIP_DEPTH:
            report.unreadable(member, "archive", f"zip nested deeper than {MAX_ZIP_DEPTH}")
            continue
        try:
            with archive.open(info) as raw, zipfile.ZipFile(raw) as inner:
                yield from _archive_members(member, inner, report, depth + 1)
        except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
            report.unreadable(member, "archive", f"cannot be opened: {_error_text(exc)}")


# --------------------------------------------------------------------------- JSON arrays


# A JSON escaped backslash, a valid surrogate pair escape, or a lone surrogate escape (left to
# right, so `\\\\udfff` is a backslash and text, not an escape).
_JSON_ESCAPES = re.compile(
    r"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
    r"|\\u[dD][89a-fA-F][0-9a-fA-F]{2}"
)
_LONGEST_ESCAPE = 12  # a surrogate pair: \uXXXX\uXXXX


class _Utf8Repair(io.RawIOBase):
    """A byte stream that replaces invalid UTF-8 with U+FFFD and reports each byte offset, and
    rewrites lone surrogate escapes ("\\udfff") to "\\ufffd" with a report as well.

    ijson would otherwise stop at the first bad byte and lose the rest of the file, and its C
    backend raises on a lone surrogate escape.
    """

    def __init__(
        self,
        raw: IO[bytes],
        on_invalid: Callable[[int], None],
        on_surrogate: Callable[[int], None],
    ) -> None:
        self._raw = raw
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self._pending = b""
        self._carry = ""  # text held back: it may end inside an escape sequence
        self._emitted = 0  # source bytes already turned into text
        self._on_invalid = on_invalid
        self._on_surrogate = on_surrogate
        self._first = True
        self.offset = 0  # source bytes read so far

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = self._raw.read(_READ_SIZE)
            self.offset += len(chunk)
            text = self._carry + self._decoder.decode(chunk, final=not chunk)
            if self._first and text:
                text = text.removeprefix("\ufeff")
                self._first = False
            cut = len(text) if not chunk else _escape_safe_cut(text)
            text, self._carry = text[:cut], text[cut:]
            source_bytes = len(text.encode("utf-8", "surrogateescape"))
            if _ESCAPED_BYTES.search(text):
                text = self._repair(text)
            if "\\" in text:
                text = _JSON_ESCAPES.sub(self._lone_surrogate, text)
            self._emitted += source_bytes
            self._pending = text.encode("utf-8")
            if not chunk:
                break
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _repair(self, text: str) -> str:
        for match in _ESCAPED_BYTES.finditer(text):
            before = text[: match.start()].encode("utf-8", "surrogateescape")
            self._on_invalid(self._emitted + len(before))
        return _ESCAPED_BYTES.sub("\ufffd", text)

    def _lone_surrogate(self, match: re.Match[str]) -> str:
        if len(match.group()) in (2, _LONGEST_ESCAPE):  # "\\\\" or a valid pair
            return match.group()
        self._on_surrogate(self._emitted + match.start())
        return "\\ufffd"


def _escape_safe_cut(text: str) -> int:
    """Where to cut `text` so that no escape sequence is split: before the run of backslashes
    nearest the end, if one starts within an escape's length of it."""
    last = text.rfind("\\", max(0, len(text) - _LONGEST_ESCAPE))
    if last < 0:
        return len(text)
    while last > 0 and text[last - 1] == "\\":
        last -= 1
    return last


class _TooDeep(Exception):
    pass


def _json_values(events: Iterator[tuple[str, Any]]) -> Iterator[Any]:
    """The records of a JSON document from ijson.basic_parse events: each item of a top-level
    array, or the top-level object itself. Built iteratively; a record nested deeper than
    MAX_NESTING yields a _TooDeep in its place (its events are skipped, in linear time)."""
    depth = 0  # within the current record
    stack: list[Any] = []
    keys: list[str | None] = []
    skipping = False
    for event, value in events:
        if depth == 0 and event == "end_array":
            return  # end of the top-level array (a top-level object ends with its record)
        if event in ("start_map", "start_array"):
            depth += 1
            if skipping:
                continue
            if depth > MAX_NESTING:
                skipping = True
                continue
            container: Any = {} if event == "start_map" else []
            if stack:
                _attach(stack[-1], keys, container)
            stack.append(container)
            keys.append(None)
            continue
        if event in ("end_map", "end_array"):
            depth -= 1
            if not skipping:
                done = stack.pop()
                keys.pop()
                if not stack:
                    yield done
            elif depth == 0:
                skipping = False
                stack.clear()
                keys.clear()
                yield _TooDeep()
            continue
        if skipping:
            continue
        if event == "number" and type(value) is Decimal:
            value = float(value)
        if event == "map_key":
            keys[-1] = value
        elif stack:
            _attach(stack[-1], keys, value)
        else:
            yield value  # a scalar record (an array of numbers, say): rejected by shape


def _attach(container: Any, keys: list[str | None], value: Any) -> None:
    if isinstance(container, dict):
        container[keys[-1]] = value
    else:
        container.append(value)


def _read_json(
    name: str, opener: Opener, default_user: str, limits: Limits, report: ParseReport
) -> Iterator[Conversation]:
    with opener() as raw:
        stream = _Utf8Repair(
            raw,
            lambda at: report.add(
                Problem("warning", name, f"byte {at}", "invalid UTF-8 replaced with U+FFFD")
            ),
            lambda at: report.add(
                Problem(
                    "warning", name, f"near byte {at}", "lone surrogate escape replaced with U+FFFD"
                )
            ),
        )
        buffered = io.BufferedReader(stream, buffer_size=_READ_SIZE)
        index = -1
        try:
            # Not use_float=True: the C backend then fails on integers past 64 bits and on
            # 1e400 (valid JSON) and drops the rest of the file; decimals become floats below.
            events = ijson.basic_parse(buffered)
            top = next(events, ("", None))[0]
            if top not in ("start_array", "start_map"):
                raise ijson.JSONError("the file holds neither a JSON array nor an object")
            if top == "start_map":
                events = itertools.chain([("start_map", None)], events)
            for index, record in enumerate(_json_values(events)):
                report.records += 1
                origin = f"record {index} (near byte {stream.offset})"
                if isinstance(record, _TooDeep):
                    report.reject_record(
                        name, origin, f"nested deeper than {MAX_NESTING} levels; record skipped"
                    )
                    continue
                conv = _from_record(record, name, origin, default_user, limits, report)
                if conv is not None:
                    yield conv
        except ijson.JSONError as exc:
            report.unreadable(
                name,
                f"after record {index} (near byte {stream.offset})",
                f"file is truncated or not valid JSON, rest of file skipped: {exc}",
            )


def _from_record(
    record: Any, name: str, origin: str, default_user: str, limits: Limits, report: ParseReport
) -> Conversation | None:
    """The record as a conversation, or None with the reason recorded. Nothing raised by a
    record's content escapes: an unexpected error is that record's rejection."""
    try:
        if not isinstance(record, dict):
            raise BadRecord(f"expected an object, got {type(record).__name__}")
        if "mapping" in record:
            fmt, meta, raw_turns = "chatgpt", *_chatgpt(record, name, origin, limits, report)
        elif "chat_messages" in record:
            fmt, meta, raw_turns = "claude", *_claude(record, name, origin, report)
        elif isinstance(record.get("conversations"), list):
            fmt, meta, raw_turns = "sharegpt", *_sharegpt(record)
        else:
            raise BadRecord(
                "not a ChatGPT (mapping), Claude (chat_messages) or ShareGPT (conversations) "
                f"record; keys: {sorted(map(str, record))[:8]}"
            )
        return _build(fmt, meta, raw_turns, name, origin, default_user, limits, report)
    except BadRecord as exc:
        reason = str(exc)
    except Exception as exc:  # a shape no check foresaw: this record only
        reason = f"cannot be read as a conversation ({_error_text(exc)})"
    report.reject_record(name, origin, reason, _identity(record, default_user))
    return None


def _identity(record: Any, default_user: str) -> tuple[str, str] | None:
    """(user id, conversation id) of a declined record, when both can be read as ids."""
    if not isinstance(record, dict):
        return None
    conv_id = next(
        (record[k] for k in ("conversation_id", "id", "uuid") if record.get(k) is not None), None
    )
    account = record.get("account")
    user = account.get("uuid") if isinstance(account, dict) else record.get("user_id")
    try:
        return (_checked_id(user, "user id") if user else default_user), _checked_id(conv_id, "id")
    except BadRecord:
        return None


@dataclass
class _Meta:
    id: str | None
    user_id: str | None = None
    title: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


# Speaker names the exports use; anything else is kept (a tool's name, a custom persona) but
# counted, so a mis-mapped export shows up in the run's problems.
KNOWN_ROLES = frozenset(
    {
        "user",
        "assistant",
        "system",
        "tool",
        "function",
        "developer",
        "human",
        "gpt",
        "model",
        "bot",
        "chatgpt",
        "claude",
    }
)
MAX_ROLE_CHARS = 64
RawTurn = tuple[Any, Any, Any]  # role, content, created_at as found in the record


def _chatgpt(
    record: dict[str, Any], name: str, origin: str, limits: Limits, report: ParseReport
) -> tuple[_Meta, list[RawTurn]]:
    mapping = record["mapping"]
    if not isinstance(mapping, dict):
        raise BadRecord("'mapping' is not an object")
    node_id = record.get("current_node")
    if node_id is None:
        node_id = _latest_leaf(mapping, name, origin, report)
    branch: list[dict[str, Any]] = []
    seen: set[str] = set()
    while node_id is not None:
        if not isinstance(node_id, str):
            raise BadRecord(f"message tree refers to a node id that is not text: {node_id!r:.40}")
        if node_id in seen:
            raise BadRecord(f"message tree has a cycle at node {node_id!r}")
        if len(seen) >= limits.max_turns:
            raise BadRecord(f"message tree deeper than {limits.max_turns} nodes")
        seen.add(node_id)
        node = mapping.get(node_id)
        if not isinstance(node, dict):
            raise BadRecord(f"current branch refers to missing node {node_id!r}")
        branch.append(node)
        node_id = node.get("parent")
    turns: list[RawTurn] = []
    skipped_parts = 0
    for node in reversed(branch):
        message = node.get("message")
        if not isinstance(message, dict):
            continue
        metadata = message.get("metadata") or {}
        if isinstance(metadata, dict) and metadata.get("is_visually_hidden_from_conversation"):
            continue
        author = message.get("author")
        role = author.get("role") if isinstance(author, dict) else None
        text, skipped = _chatgpt_text(message.get("content"))
        skipped_parts += skipped
        if role == "system" and not (text or "").strip():
            continue  # the empty root and system scaffolding, not a user's message
        turns.append((role, text, message.get("create_time")))
    if skipped_parts:
        report.add(
            Problem("warning", name, origin, f"{skipped_parts} non-text message parts skipped")
        )
    meta = _Meta(
        id=record.get("conversation_id") or record.get("id"),
        title=record.get("title"),
        created_at=parse_timestamp(record.get("create_time")),
        updated_at=parse_timestamp(record.get("update_time")),
    )
    return meta, turns


def _latest_leaf(mapping: dict[str, Any], name: str, origin: str, report: ParseReport) -> Any:
    """Older exports name no current node: the leaf whose message is newest is the branch the
    user last saw (a regenerated answer is an older sibling); ties keep the later leaf."""
    leaves = [(k, v) for k, v in mapping.items() if isinstance(v, dict) and not v.get("children")]
    if not leaves:
        return None
    if len(leaves) > 1:
        report.add(
            Problem(
                "warning",
                name,
                origin,
                f"no current_node: the newest of {len(leaves)} branches was kept",
            )
        )

    def created(item: tuple[str, Any]) -> float:
        message = item[1].get("message")
        stamp = parse_timestamp(message.get("create_time")) if isinstance(message, dict) else None
        return stamp.timestamp() if stamp else float("-inf")

    return max(enumerate(leaves), key=lambda pair: (created(pair[1]), pair[0]))[1][0]


def _chatgpt_text(content: Any) -> tuple[Any, int]:
    """The text of a ChatGPT message's content, and how many non-text parts were left out."""
    if not isinstance(content, dict):
        return content, 0
    parts = content.get("parts")
    if isinstance(parts, list):
        texts = [
            p if isinstance(p, str) else p.get("text") if isinstance(p, dict) else None
            for p in parts
            if p is not None
        ]
        kept = [t for t in texts if isinstance(t, str)]
        return "\n".join(kept), len(texts) - len(kept)
    text = content.get("text") or content.get("result") or ""
    return text, 0


def _claude(
    record: dict[str, Any], name: str, origin: str, report: ParseReport
) -> tuple[_Meta, list[RawTurn]]:
    messages = record["chat_messages"]
    if not isinstance(messages, list):
        raise BadRecord("'chat_messages' is not a list")
    turns: list[RawTurn] = []
    skipped: Counter[str] = Counter()
    for m in messages:
        if not isinstance(m, dict):
            raise BadRecord("a chat message is not an object")
        text = m.get("text")
        content = m.get("content")
        blocks = content if isinstance(content, list) else []
        block_texts = []
        for block in blocks:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                block_texts.append(block["text"])
            elif kind != "text" or block.get("text") is not None:
                # tool_use, tool_result, thinking, images...: not the conversation's text
                skipped[str(kind)[:40]] += 1
        if not (isinstance(text, str) and text):
            text = "\n".join(block_texts)
        turns.append((m.get("sender"), text, m.get("created_at")))
    if skipped:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items()))
        report.add(Problem("warning", name, origin, f"content blocks not indexed: {kinds}"))
    account = record.get("account")
    meta = _Meta(
        id=record.get("uuid"),
        user_id=account.get("uuid") if isinstance(account, dict) else None,
        title=record.get("name"),
        created_at=parse_timestamp(record.get("created_at")),
        updated_at=parse_timestamp(record.get("updated_at")),
    )
    return meta, turns


def _sharegpt(record: dict[str, Any]) -> tuple[_Meta, list[RawTurn]]:
    turns: list[RawTurn] = []
    for m in record["conversations"]:
        if not isinstance(m, dict):
            raise BadRecord("a ShareGPT turn is not an object")
        turns.append((m.get("from"), m.get("value"), m.get("created_at")))
    meta = _Meta(
        id=record.get("id"),
        user_id=record.get("user_id"),
        title=record.get("title"),
        created_at=parse_timestamp(record.get("created_at")),
    )
    return meta, turns


def _checked_id(value: Any, what: str) -> str:
    """An id as text. Ids are compared exactly, so one that only cleaning could store (control
    characters, lone surrogates) is refused rather than merged with another id."""
    if value is None:
        raise BadRecord(f"conversation has no {what}")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadRecord(f"conversation {what} is not text: {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise BadRecord(f"conversation has no {what}")
    if _CONTROL_CHARS.search(text) or _SURROGATES.search(text):
        raise BadRecord(f"conversation {what} {text[:40]!r} holds control characters")
    return text


def _build(
    fmt: str,
    meta: _Meta,
    raw_turns: list[RawTurn],
    name: str,
    origin: str,
    default_user: str,
    limits: Limits,
    report: ParseReport,
) -> Conversation:
    conv_id = _checked_id(meta.id, "id")
    user_id = _checked_id(meta.user_id, "user id") if meta.user_id else default_user
    turns: list[Turn] = []
    for i, (role, content, created) in enumerate(raw_turns):
        where = f"{origin}, message {i}"
        if not isinstance(role, str) or not role.strip():
            report.add(Problem("rejected", name, where, "message has no role; message skipped"))
            continue
        if content is None:
            content = ""
        if not isinstance(content, str):
            report.add(Problem("rejected", name, where, "message content is not text; skipped"))
            continue
        if len(content) > limits.max_message_chars:
            report.add(
                Problem(
                    "rejected",
                    name,
                    where,
                    f"message of {len(content):,} characters exceeds the limit of "
                    f"{limits.max_message_chars:,}; message skipped",
                )
            )
            continue
        cleaned = _clean(content)
        if len(cleaned) != len(content):
            report.add(
                Problem(
                    "warning",
                    name,
                    where,
                    f"{len(content) - len(cleaned)} control characters removed",
                )
            )
        if _SURROGATES.search(cleaned):
            cleaned = _SURROGATES.sub("\ufffd", cleaned)
            report.add(
                Problem("warning", name, where, "lone surrogate escapes replaced with U+FFFD")
            )
        if not cleaned.strip():
            report.add(Problem("warning", name, where, "empty message skipped"))
            continue
        speaker = _text(role).strip()
        if speaker.lower() not in KNOWN_ROLES:
            report.add(
                Problem(
                    "warning",
                    name,
                    where,
                    f"unknown role {speaker[:40]!r} kept as the speaker's name",
                )
            )
        turns.append(Turn(speaker[:MAX_ROLE_CHARS], cleaned, parse_timestamp(created)))
    if not turns:
        raise BadRecord(f"conversation {conv_id!r} has no non-empty messages")
    if len(turns) > limits.max_turns:
        raise BadRecord(f"conversation {conv_id!r} has more than {limits.max_turns} messages")
    stamps = [t.created_at for t in turns if t.created_at]
    return Conversation(
        id=conv_id,
        user_id=user_id,
        title=_text(meta.title) if isinstance(meta.title, str) else None,
        source_format=fmt,
        origin=origin,
        turns=tuple(turns),
        created_at=meta.created_at or (min(stamps) if stamps else None),
        updated_at=meta.updated_at or (max(stamps) if stamps else None),
    )


def _clean(text: str) -> str:
    return _CONTROL_CHARS.sub("", text)


def _text(text: str) -> str:
    """Free text (titles, speaker names) as storable text: no control characters, no lone
    surrogates."""
    return _SURROGATES.sub("\ufffd", _clean(text))


def parse_timestamp(value: Any) -> datetime | None:
    """Epoch seconds or ISO-8601 text as an aware UTC datetime; anything else is None."""
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return datetime.fromtimestamp(value, tz=UTC)
        if isinstance(value, str) and value:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return None


# --------------------------------------------------------------------------- JSONL messages


def _read_jsonl(
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
            detail = exc.msg if isinstance(exc, json.JSONDecodeError) else _error_text(exc)
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
        meta = _Meta(id=conv_id, user_id=first.get("user_id"), title=first.get("title"))
        raw_turns: list[RawTurn] = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):  # OpenAI-style content parts
                content = "\n".join(
                    p["text"]
                    for p in content
                    if isinstance(p, dict) and isinstance(p.get("text"), str)
                )
            raw_turns.append((m.get("role"), content, m.get("created_at", m.get("timestamp"))))
        conversation = _build("jsonl", meta, raw_turns, name, origin, default_user, limits, report)
    except BadRecord as exc:
        reason = str(exc)
    except Exception as exc:  # a shape no check foresaw: this conversation only
        reason = f"cannot be read as a conversation ({_error_text(exc)})"
    else:
        yield conversation
        return
    identity = _identity(
        {"conversation_id": conv_id, "user_id": first.get("user_id")}, default_user
    )
    report.reject_record(name, origin, reason, identity)


class ConversationSourceResource(dg.ConfigurableResource):
    """Where raw conversations come from: an export file or a directory of them."""

    path: str = Field(
        default=str(SAMPLE_DATA_DIR),
        description="A ChatGPT/Claude/ShareGPT JSON export, a JSONL of messages, a zip of them, "
        "or a directory holding any of these. Default: the bundled samples.",
    )
    default_user_id: str = Field(
        default="local-user",
        description="User id for conversations whose export does not name one.",
    )
    max_message_chars: int = Field(
        default=Limits.max_message_chars,
        description="Longer messages are rejected (counted and reported), not stored.",
    )

    def read(self, report: ParseReport) -> Iterator[Conversation]:
        return read_conversations(
            Path(self.path).expanduser(),
            default_user_id=self.default_user_id,
            report=report,
            limits=Limits(max_message_chars=self.max_message_chars),
        )

    @property
    def source_key(self) -> str:
        """The identity conversations are filed under; deletions are scoped to it."""
        return str(Path(self.path).expanduser().resolve())
