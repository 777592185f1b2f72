"""A small labelled canary for search quality over the bundled sample conversations.

Each probe is a question a user might ask of their memory, worded unlike the turn that answers
it, with the conversation (export id) and the turns that answer it. `canary_hit_at_5` searches
each probe within its user, hybrid, and counts the probes whose answer is in the top 5. The
retrieval_quality check warns when that falls below RECORDED_HIT_AT_5, the level measured with
the default models and fusion when the canary was written, so a model or configuration change
that degrades search shows up in the UI. Where the store does not hold the sample conversations
(a production corpus), the check has nothing to measure and says so. The samples' records that
name no user belong to DEFAULT_USER_ID's user, so their probes are asked as that user.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from retrieval_assets.lib.ingest import conversation_key
from retrieval_assets.lib.search import Hit
from retrieval_assets.lib.sources import DEFAULT_USER_ID


@dataclass(frozen=True)
class Probe:
    user: str
    question: str
    conversation: str  # the export's conversation id
    turns: tuple[int, ...]  # turn indexes (0-based) that answer it


def _id(n: int) -> str:
    return f"00000000-0000-0000-0000-00c0ffee{n:04x}"


PROBES = (
    Probe(DEFAULT_USER_ID, "keeping my bread culture warm in a cold kitchen", _id(0), (2, 3)),
    Probe(DEFAULT_USER_ID, "how soon can I chat with people in another language", _id(4), (0, 1)),
    Probe(DEFAULT_USER_ID, "how much cash to put aside for a rainy day", _id(8), (2, 3)),
    Probe(DEFAULT_USER_ID, "which part of town to book for my Portugal city break", _id(2), (0, 1)),
    Probe(DEFAULT_USER_ID, "what to eat during the long race", _id(6), (2, 3)),
    Probe(DEFAULT_USER_ID, "start a job once for each file that lands", _id(10), (0, 1)),
    Probe("sample-user-claude", "orders query got slow when sorting by date", _id(1), (0, 1)),
    Probe("sample-user-claude", "sore fingers from practising chords", _id(9), (2, 3)),
    Probe(
        "sample-user-claude", "compiler error about mutable and immutable borrows", _id(5), (0, 1)
    ),
    Probe("sample-user-jsonl", "medicine for my child's high temperature", _id(3), (2, 3)),
    Probe("sample-user-jsonl", "greenery that survives in a dark flat", _id(7), (0, 1)),
    Probe("sample-user-jsonl", "my coffee tastes acidic", _id(11), (0, 1)),
)
# Measured with the offline defaults (hybrid, both stores) when the canary was written.
RECORDED_HIT_AT_5 = 1.0


def _keys(probe: Probe, user: str) -> set[str]:
    # Conversations stored before revision 0007 kept their export id as key.
    return {conversation_key(user, probe.conversation), probe.conversation}


def answered(probe: Probe, hits: list[Hit], user: str) -> bool:
    keys = _keys(probe, user)
    return any(
        h.conversation_id in keys and any(h.turn_start <= t <= h.turn_end for t in probe.turns)
        for h in hits[:5]
    )


def canary_hit_at_5(
    search: Callable[[str, str], list[Hit]], default_user: str = DEFAULT_USER_ID
) -> float | None:
    """The share of probes answered in the top 5 by `search(question, user)`; None when the
    store holds none of the canary's conversations (nothing to measure). `default_user` is the
    user the source gave records that name none (the DEFAULT_USER_ID setting)."""
    users = [default_user if p.user == DEFAULT_USER_ID else p.user for p in PROBES]
    results = [(p, user, search(p.question, user)) for p, user in zip(PROBES, users, strict=True)]
    keys = set().union(*(_keys(p, user) for p, user, _ in results))
    if not any(h.conversation_id in keys for _, _, hits in results for h in hits):
        return None
    return sum(answered(p, hits, user) for p, user, hits in results) / len(PROBES)
