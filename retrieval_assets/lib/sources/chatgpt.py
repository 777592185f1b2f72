"""ChatGPT `conversations.json`: a `mapping` message tree; the branch ending at `current_node`
(an older export without it: the branch whose last message is newest)."""

from __future__ import annotations

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

NAME = "chatgpt"
DESCRIPTION = "ChatGPT (mapping)"


def recognises(record: dict[str, Any]) -> bool:
    return "mapping" in record


def read(
    record: dict[str, Any], name: str, origin: str, limits: Limits, report: ParseReport
) -> tuple[RecordMeta, list[RawTurn]]:
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
    meta = RecordMeta(
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
