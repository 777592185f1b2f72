"""Claude `conversations.json`: `chat_messages` (`sender`, `text` or its `text` blocks), the
account uuid as the user; tool use, tool results and other non-text blocks are counted, not
indexed."""

from __future__ import annotations

from collections import Counter
from typing import Any

from retrieval_assets.lib.sources.domain import (
    BadRecord,
    Limits,
    ParseReport,
    Problem,
    RawTurn,
    RecordMeta,
    parse_timestamp,
)

NAME = "claude"
DESCRIPTION = "Claude (chat_messages)"


def recognises(record: dict[str, Any]) -> bool:
    return "chat_messages" in record


def read(
    record: dict[str, Any], name: str, origin: str, limits: Limits, report: ParseReport
) -> tuple[RecordMeta, list[RawTurn]]:
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
    meta = RecordMeta(
        id=record.get("uuid"),
        user_id=account.get("uuid") if isinstance(account, dict) else None,
        title=record.get("name"),
        created_at=parse_timestamp(record.get("created_at")),
        updated_at=parse_timestamp(record.get("updated_at")),
    )
    return meta, turns
