"""The domain of a source read: conversations and turns, the read's report, and the one place
a format's raw turns become a stored conversation (checked ids, cleaned text, bounded sizes).

Two kinds of problem, kept apart because deletions depend on them:
- a part of the source that could not be read (a directory or file this process cannot open, a
  corrupt zip, JSON cut short, a JSONL line that is not JSON) makes the read *incomplete*: what
  it held is unknown, so nothing may be deleted;
- a record that was read but declined (wrong shape, no id, no text) is *rejected* and counted.
  The read stays complete; a rejected record whose id is known keeps its stored version.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

USER_ROLES = frozenset({"user", "human"})
# C0 controls other than tab, newline and carriage return (Postgres text cannot even hold NUL).
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Any UTF-16 surrogate left in decoded text is a lone one (JSON "\\udfff"): not encodable.
_SURROGATES = re.compile(r"[\ud800-\udfff]")
_MAX_KEPT_PROBLEMS = 200
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
# role, content, created_at as found in the record, and the speaker's name where the format has one
RawTurn = tuple[Any, ...]


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
    name: str | None = None  # the speaker's name ("Caroline") where the export records one

    @property
    def speaker(self) -> str:
        """Who spoke, as chunks show it: the name where known, else the role."""
        return self.name or self.role


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
        payload = [
            self.user_id,
            self.title,
            [[t.role, t.content, *([t.name] if t.name else [])] for t in self.turns],
        ]
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()

    def turns_json(self) -> list[dict[str, Any]]:
        return [
            {
                "role": t.role,
                "content": t.content,
                "created_at": t.created_at.isoformat() if t.created_at else None,
                **({"name": t.name} if t.name else {}),
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


@dataclass
class RecordMeta:
    id: str | None
    user_id: str | None = None
    title: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


def error_text(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def checked_id(value: Any, what: str) -> str:
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


def declined_identity(record: Any, default_user: str) -> tuple[str, str] | None:
    """(user id, conversation id) of a declined record, when both can be read as ids."""
    if not isinstance(record, dict):
        return None
    conv_id = next(
        (record[k] for k in ("conversation_id", "id", "uuid") if record.get(k) is not None), None
    )
    account = record.get("account")
    user = account.get("uuid") if isinstance(account, dict) else record.get("user_id")
    try:
        return (checked_id(user, "user id") if user else default_user), checked_id(conv_id, "id")
    except BadRecord:
        return None


def build_conversation(
    fmt: str,
    meta: RecordMeta,
    raw_turns: list[RawTurn],
    name: str,
    origin: str,
    default_user: str,
    limits: Limits,
    report: ParseReport,
) -> Conversation:
    conv_id = checked_id(meta.id, "id")
    user_id = checked_id(meta.user_id, "user id") if meta.user_id else default_user
    turns: list[Turn] = []
    for i, (role, content, created, *speaker_name) in enumerate(raw_turns):
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
        turns.append(
            Turn(
                speaker[:MAX_ROLE_CHARS],
                cleaned,
                parse_timestamp(created),
                _speaker_name(speaker_name[0] if speaker_name else None),
            )
        )
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


def _speaker_name(value: Any) -> str | None:
    """A speaker's name as stored: text, cleaned, bounded; anything else is no name."""
    if not isinstance(value, str):
        return None
    name = " ".join(_text(value).split())[:MAX_ROLE_CHARS]
    return name or None


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
