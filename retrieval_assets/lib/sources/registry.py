"""The export formats, recognised per record: each JSON record goes to the first format that
recognises it. Adding a format is one module (NAME, DESCRIPTION, recognises, read; see
chatgpt.py) and one line in RECORD_FORMATS. JSONL is a format of the whole file (jsonl.py)."""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile
import zlib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from retrieval_assets.lib.paths import SAMPLE_DATA_DIR
from retrieval_assets.lib.sources import chatgpt, claude, jsonl, sharegpt
from retrieval_assets.lib.sources.domain import (
    BadRecord,
    Conversation,
    Limits,
    ParseReport,
    Problem,
    build_conversation,
    declined_identity,
    error_text,
)
from retrieval_assets.lib.sources.files import (
    Opener,
    json_records,
    members,
    source_files,
)

RECORD_FORMATS = (chatgpt, claude, sharegpt)

# The user of conversations whose export names none, unless DEFAULT_USER_ID says otherwise.
DEFAULT_USER_ID = "local-user"


def from_record(
    record: Any, name: str, origin: str, default_user: str, limits: Limits, report: ParseReport
) -> Conversation | None:
    """The record as a conversation, or None with the reason recorded. Nothing raised by a
    record's content escapes: an unexpected error is that record's rejection."""
    try:
        if not isinstance(record, dict):
            raise BadRecord(f"expected an object, got {type(record).__name__}")
        fmt = next((f for f in RECORD_FORMATS if f.recognises(record)), None)
        if fmt is None:
            *others, last = (f.DESCRIPTION for f in RECORD_FORMATS)
            known = f"{', '.join(others)} or {last}" if others else last
            raise BadRecord(f"not a {known} record; keys: {sorted(map(str, record))[:8]}")
        meta, raw_turns = fmt.read(record, name, origin, limits, report)
        return build_conversation(
            fmt.NAME, meta, raw_turns, name, origin, default_user, limits, report
        )
    except BadRecord as exc:
        reason = str(exc)
    except Exception as exc:  # a shape no check foresaw: this record only
        reason = f"cannot be read as a conversation ({error_text(exc)})"
    report.reject_record(name, origin, reason, declined_identity(record, default_user))
    return None


def read_json(
    name: str, opener: Opener, default_user: str, limits: Limits, report: ParseReport
) -> Iterator[Conversation]:
    for origin, record in json_records(name, opener, report):
        conv = from_record(record, name, origin, default_user, limits, report)
        if conv is not None:
            yield conv


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
        for name, opener in members(path, report):
            report.files.append(name)
            reader = jsonl.read if name.lower().endswith(jsonl.SUFFIX) else read_json
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
                report.unreadable(name, "while reading", f"cannot be read: {error_text(exc)}")


class ConversationSourceResource(dg.ConfigurableResource):
    """Where raw conversations come from: an export file or a directory of them."""

    path: str = Field(
        default=str(SAMPLE_DATA_DIR),
        description="A ChatGPT/Claude/ShareGPT JSON export, a JSONL of messages, a zip of them, "
        "or a directory holding any of these. Default: the bundled samples.",
    )
    default_user_id: str = Field(
        default=DEFAULT_USER_ID,
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

    def fingerprint(self) -> str | None:
        """A digest of everything a read of the source depends on: the names and bytes of its
        export files, this resource's settings and the readers' own code. Equal digests read
        alike. None where the source cannot be walked or read cleanly (a read says why)."""
        report = ParseReport()
        try:
            files = source_files(Path(self.path).expanduser(), report)
        except OSError:
            return None
        if report.incomplete_files:
            return None
        digest = hashlib.blake2b(digest_size=20)
        for part in (self.source_key, self.default_user_id, str(self.max_message_chars)):
            digest.update(part.encode() + b"\0")
        digest.update(_READER_CODE)
        try:
            for path in files:
                with path.open("rb") as f:
                    digest.update(f"{path}\0{os.fstat(f.fileno()).st_size}\0".encode())
                    while block := f.read(_HASH_BLOCK):
                        digest.update(block)
        except OSError:
            return None
        return digest.hexdigest()


_HASH_BLOCK = 1 << 20


def _code_digest() -> bytes:
    """A digest of the package's code (readers, ingest, the assets and all) and of the JSON
    parser and Python it runs on: after any change to them, the first read of a source is a
    full one. Taken at import, so a process labels reads with the code it runs."""
    package = Path(__file__).parents[2]
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{sys.version}\0{metadata.version('ijson')}\0".encode())
    for module in sorted(package.rglob("*.py")):
        digest.update(str(module.relative_to(package)).encode() + b"\0" + module.read_bytes())
    return digest.digest()


_READER_CODE = _code_digest()
