"""Finding a source's export files (directories, zips within zips) and streaming the records
of a JSON export out of them, whatever their bytes hold.

Nothing is loaded whole: JSON goes through ijson, record by record. Invalid UTF-8 and lone
surrogate escapes are replaced (and reported) before ijson sees them, a record nested too deep is
skipped in linear time, and a file cut short keeps the records before the cut.
"""

from __future__ import annotations

import codecs
import io
import itertools
import os
import re
import zipfile
import zlib
from collections.abc import Callable, Iterator
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import IO, Any

import ijson

from retrieval_assets.lib.sources.domain import ParseReport, Problem, error_text

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".zip")
# Zips inside zips are read too, down to this depth (a bound against archive bombs).
MAX_ZIP_DEPTH = 3
# Objects and arrays nested deeper than this inside one record reject that record (ijson's own
# builder is quadratic in depth: 200 KB of brackets took minutes).
MAX_NESTING = 64
_ESCAPED_BYTES = re.compile(r"[\udc80-\udcff]")
_READ_SIZE = 1 << 16


Opener = Callable[[], IO[bytes]]


def is_export(name: str) -> bool:
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
                f"cannot be listed: {error_text(error)}",
            )

    files = []
    for folder, dirs, names in os.walk(source, onerror=unreadable):
        dirs.sort()
        files += [Path(folder) / n for n in names if is_export(n)]
    files.sort()
    if not files and not report.incomplete_files:
        raise FileNotFoundError(
            f"conversation source {source} holds no {', '.join(SUPPORTED_SUFFIXES)} files"
        )
    return files


def members(path: Path, report: ParseReport) -> Iterator[tuple[str, Opener]]:
    """(display name, opener) for a plain file or each export file inside a zip (and inside
    zips within it); an archive that cannot be opened is reported, not raised."""
    if not path.name.lower().endswith(".zip"):
        yield str(path), lambda: path.open("rb")
        return
    try:
        with zipfile.ZipFile(path) as archive:
            yield from _archive_members(str(path), archive, report, depth=1)
    except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
        report.unreadable(str(path), "archive", f"cannot be opened: {error_text(exc)}")


def _archive_members(
    name: str, archive: zipfile.ZipFile, report: ParseReport, depth: int
) -> Iterator[tuple[str, Opener]]:
    for info in sorted(archive.infolist(), key=lambda i: i.filename):
        member = f"{name}!{info.filename}"
        if info.is_dir() or not is_export(info.filename):
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
            report.unreadable(member, "archive", f"cannot be opened: {error_text(exc)}")


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


class TooDeep(Exception):
    pass


def _json_values(events: Iterator[tuple[str, Any]]) -> Iterator[Any]:
    """The records of a JSON document from ijson.basic_parse events: each item of a top-level
    array, or the top-level object itself. Built iteratively; a record nested deeper than
    MAX_NESTING yields a TooDeep in its place (its events are skipped, in linear time)."""
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
                yield TooDeep()
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


def json_records(name: str, opener: Opener, report: ParseReport) -> Iterator[tuple[str, Any]]:
    """(origin, record) for each record of a JSON export (the items of its top-level array, or
    the top-level object). A record nested too deep is rejected here; a file cut short is
    reported unreadable after its last whole record."""
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
                if isinstance(record, TooDeep):
                    report.reject_record(
                        name, origin, f"nested deeper than {MAX_NESTING} levels; record skipped"
                    )
                    continue
                yield origin, record
        except ijson.JSONError as exc:
            report.unreadable(
                name,
                f"after record {index} (near byte {stream.offset})",
                f"file is truncated or not valid JSON, rest of file skipped: {exc}",
            )
