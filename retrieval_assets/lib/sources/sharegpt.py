"""ShareGPT JSON: `[{"id", "conversations": [{"from", "value"}]}]`, role names kept as given."""

from __future__ import annotations

from typing import Any

from retrieval_assets.lib.sources.domain import (
    BadRecord,
    Limits,
    ParseReport,
    RawTurn,
    RecordMeta,
    parse_timestamp,
)

NAME = "sharegpt"
DESCRIPTION = "ShareGPT (conversations)"


def recognises(record: dict[str, Any]) -> bool:
    return isinstance(record.get("conversations"), list)


def read(
    record: dict[str, Any], name: str, origin: str, limits: Limits, report: ParseReport
) -> tuple[RecordMeta, list[RawTurn]]:
    turns: list[RawTurn] = []
    for m in record["conversations"]:
        if not isinstance(m, dict):
            raise BadRecord("a ShareGPT turn is not an object")
        turns.append((m.get("from"), m.get("value"), m.get("created_at")))
    meta = RecordMeta(
        id=record.get("id"),
        user_id=record.get("user_id"),
        title=record.get("title"),
        created_at=parse_timestamp(record.get("created_at")),
    )
    return meta, turns
