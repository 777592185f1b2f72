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
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import re
import zipfile
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import dagster as dg
import ijson
from pydantic import Field

from retrieval_assets.lib.paths import SAMPLE_DATA_DIR

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".zip")
USER_ROLES = frozenset({"user", "human"})
# C0 controls other than tab, newline and carriage return (Postgres text cannot even hold NUL).
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_ESCAPED_BYTES = re.compile(r"[\udc80-\udcff]")
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
    incomplete_files: list[str] = field(default_factory=list)
    records: int = 0
    conversations: int = 0
    turns: int = 0
    rejected: int = 0
    warnings: int = 0
    errors: int = 0
    # Whole records (not single messages) that could not be read: their ids are unknown, so
    # absence from this read proves nothing and deletions must wait for a clean read.
    rejected_records: int = 0
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

    def reject_record(self, file: str, position: str, reason: str) -> None:
        self.rejected_records += 1
        self.add(Problem("rejected", file, position, reason))

    @property
    def complete(self) -> bool:
        """True when every file and record was read, so absence from the source means deletion."""
        return not self.incomplete_files and not self.rejected_records


def source_files(source: Path) -> list[Path]:
    """The export files under `source` (a file or a directory), in a stable order."""
    if not source.exists():
        raise FileNotFoundError(f"conversation source {source} does not exist")
    if source.is_file():
        return [source]
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix in SUPPORTED_SUFFIXES)
    if not files:
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
    """Yield every valid conversation under `source`; problems go to `report`."""
    first_seen: dict[str, str] = {}
    for path in source_files(source):
        for name, opener in _members(path):
            report.files.append(name)
            reader = _read_jsonl if name.endswith(".jsonl") else _read_json
            for conv in reader(name, opener, default_user_id, limits, report):
                if conv.id in first_seen:
                    report.add(
                        Problem(
                            "rejected",
                            name,
                            conv.origin,
                            f"duplicate conversation id {conv.id!r} "
                            f"(first at {first_seen[conv.id]})",
                        )
                    )
                    continue
                first_seen[conv.id] = f"{name}: {conv.origin}"
                report.conversations += 1
                report.turns += len(conv.turns)
                yield conv


Opener = Callable[[], IO[bytes]]


def _members(path: Path) -> Iterator[tuple[str, Opener]]:
    """(display name, opener) for a plain file or each export file inside a zip."""
    if path.suffix != ".zip":
        yield str(path), lambda: path.open("rb")
        return
    with zipfile.ZipFile(path) as archive:
        for info in sorted(archive.infolist(), key=lambda i: i.filename):
            if info.filename.endswith((".json", ".jsonl")) and not info.is_dir():
                yield f"{path}!{info.filename}", lambda info=info: archive.open(info)


# --------------------------------------------------------------------------- JSON arrays


class _Utf8Repair(io.RawIOBase):
    """A byte stream that replaces invalid UTF-8 with U+FFFD and reports each byte offset.

    ijson would otherwise stop at the first bad byte and lose the rest of the file.
    """

    def __init__(self, raw: IO[bytes], on_invalid: Callable[[int], None]) -> None:
        self._raw = raw
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self._pending = b""
        self._emitted = 0  # source bytes already turned into text
        self._on_invalid = on_invalid
        self._first = True
        self.offset = 0  # source bytes read so far

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = self._raw.read(_READ_SIZE)
            self.offset += len(chunk)
            text = self._decoder.decode(chunk, final=not chunk)
            if self._first and text:
                text = text.removeprefix("\ufeff")
                self._first = False
            if _ESCAPED_BYTES.search(text):
                text = self._repair(text)
            encoded = text.encode("utf-8")
            self._emitted += len(text.encode("utf-8", "surrogateescape"))
            self._pending = encoded
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


def _read_json(
    name: str, opener: Opener, default_user: str, limits: Limits, report: ParseReport
) -> Iterator[Conversation]:
    with opener() as raw:
        stream = _Utf8Repair(
            raw,
            lambda at: report.add(
                Problem("warning", name, f"byte {at}", "invalid UTF-8 replaced with U+FFFD")
            ),
        )
        buffered = io.BufferedReader(stream, buffer_size=_READ_SIZE)
        head = buffered.peek(_READ_SIZE).lstrip()[:1]
        prefix = "" if head == b"{" else "item"
        index = -1
        try:
            for index, record in enumerate(ijson.items(buffered, prefix, use_float=True)):
                report.records += 1
                origin = f"record {index} (near byte {stream.offset})"
                conv = _from_record(record, name, origin, default_user, limits, report)
                if conv is not None:
                    yield conv
        except ijson.JSONError as exc:
            report.incomplete_files.append(name)
            report.add(
                Problem(
                    "error",
                    name,
                    f"after record {index} (near byte {stream.offset})",
                    f"file is truncated or not valid JSON, rest of file skipped: {exc}",
                )
            )


def _from_record(
    record: Any, name: str, origin: str, default_user: str, limits: Limits, report: ParseReport
) -> Conversation | None:
    try:
        if not isinstance(record, dict):
            raise BadRecord(f"expected an object, got {type(record).__name__}")
        if "mapping" in record:
            fmt, meta, raw_turns = "chatgpt", *_chatgpt(record, limits)
        elif "chat_messages" in record:
            fmt, meta, raw_turns = "claude", *_claude(record)
        elif isinstance(record.get("conversations"), list):
            fmt, meta, raw_turns = "sharegpt", *_sharegpt(record)
        else:
            raise BadRecord(
                "not a ChatGPT (mapping), Claude (chat_messages) or ShareGPT (conversations) "
                f"record; keys: {sorted(record)[:8]}"
            )
        return _build(fmt, meta, raw_turns, name, origin, default_user, limits, report)
    except BadRecord as exc:
        report.reject_record(name, origin, str(exc))
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


def _chatgpt(record: dict[str, Any], limits: Limits) -> tuple[_Meta, list[RawTurn]]:
    mapping = record["mapping"]
    if not isinstance(mapping, dict):
        raise BadRecord("'mapping' is not an object")
    node_id = record.get("current_node")
    if node_id is None:  # older exports: take the last leaf
        leaves = [k for k, v in mapping.items() if isinstance(v, dict) and not v.get("children")]
        node_id = leaves[-1] if leaves else None
    branch: list[dict[str, Any]] = []
    seen: set[str] = set()
    while node_id is not None:
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
    for node in reversed(branch):
        message = node.get("message")
        if not isinstance(message, dict):
            continue
        metadata = message.get("metadata") or {}
        if isinstance(metadata, dict) and metadata.get("is_visually_hidden_from_conversation"):
            continue
        role = (message.get("author") or {}).get("role")
        text = _chatgpt_text(message.get("content"))
        if role == "system" and not (text or "").strip():
            continue  # the empty root and system scaffolding, not a user's message
        turns.append((role, text, message.get("create_time")))
    meta = _Meta(
        id=record.get("conversation_id") or record.get("id"),
        title=record.get("title"),
        created_at=parse_timestamp(record.get("create_time")),
        updated_at=parse_timestamp(record.get("update_time")),
    )
    return meta, turns


def _chatgpt_text(content: Any) -> Any:
    if not isinstance(content, dict):
        return content
    parts = content.get("parts")
    if isinstance(parts, list):
        texts = [p if isinstance(p, str) else p.get("text") for p in parts if p is not None]
        return "\n".join(t for t in texts if isinstance(t, str))
    return content.get("text") or content.get("result") or ""


def _claude(record: dict[str, Any]) -> tuple[_Meta, list[RawTurn]]:
    messages = record["chat_messages"]
    if not isinstance(messages, list):
        raise BadRecord("'chat_messages' is not a list")
    turns: list[RawTurn] = []
    for m in messages:
        if not isinstance(m, dict):
            raise BadRecord("a chat message is not an object")
        text = m.get("text")
        if not text and isinstance(m.get("content"), list):
            text = "\n".join(
                c.get("text", "")
                for c in m["content"]
                if isinstance(c, dict) and c.get("type") == "text"
            )
        turns.append((m.get("sender"), text, m.get("created_at")))
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
    if meta.id is None or (isinstance(meta.id, str) and not meta.id.strip()):
        raise BadRecord("conversation has no id")
    conv_id = _clean(str(meta.id)).strip()
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
        if not cleaned.strip():
            report.add(Problem("warning", name, where, "empty message skipped"))
            continue
        speaker = _clean(role).strip()
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
        user_id=_clean(str(meta.user_id)) if meta.user_id else default_user,
        title=_clean(meta.title) if isinstance(meta.title, str) else None,
        source_format=fmt,
        origin=origin,
        turns=tuple(turns),
        created_at=meta.created_at or (min(stamps) if stamps else None),
        updated_at=meta.updated_at or (max(stamps) if stamps else None),
    )


def _clean(text: str) -> str:
    return _CONTROL_CHARS.sub("", text)


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
                messages.append(json.loads(raw.readline()))
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


def _jsonl_messages(
    name: str, raw: IO[bytes], report: ParseReport
) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(line number, byte offset, message) for each valid line; bad lines are rejected by line."""
    offset = 0
    for line_no, line in enumerate(raw, start=1):
        start, offset = offset, offset + len(line)
        if not line.strip():
            continue
        report.records += 1
        where = f"line {line_no} (byte {start})"
        try:
            message = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            report.reject_record(name, where, f"invalid UTF-8 at byte {start + exc.start}")
            continue
        except json.JSONDecodeError as exc:
            reason = "truncated line" if not line.endswith(b"\n") else "invalid JSON"
            report.reject_record(name, where, f"{reason}: {exc.msg}")
            continue
        if not isinstance(message, dict):
            report.reject_record(name, where, "line is not a JSON object")
            continue
        conv_id = message.get("conversation_id", message.get("conversation"))
        if conv_id is None or not str(conv_id).strip():
            report.reject_record(name, where, "message has no conversation_id")
            continue
        message["conversation_id"] = str(conv_id)
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
    meta = _Meta(id=conv_id, user_id=first.get("user_id"), title=first.get("title"))
    raw_turns: list[RawTurn] = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # OpenAI-style content parts
            content = "\n".join(
                p.get("text", "") for p in content if isinstance(p, dict) and "text" in p
            )
        raw_turns.append((m.get("role"), content, m.get("created_at", m.get("timestamp"))))
    try:
        yield _build("jsonl", meta, raw_turns, name, origin, default_user, limits, report)
    except BadRecord as exc:
        report.reject_record(name, origin, str(exc))


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
