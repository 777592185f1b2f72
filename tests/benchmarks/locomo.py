"""LoCoMo's development split as a user's chat export, and its questions as retrieval probes.

Each LoCoMo conversation is one user's history (user `locomo-<id>`), each of its sessions one
conversation of a JSONL export: speaker A as `user`, speaker B as `assistant`, both with their
names (`name`), every turn stamped with its session's date. A shared photo's caption (LoCoMo's
`blip_caption`) is part of the turn's text, as an app that stores image descriptions would keep
it. A question hits when a returned chunk of the right session spans an evidence turn.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from retrieval_assets.lib.ingest import conversation_key

DEV_DIR = Path(__file__).parent / "locomo_dev"
CONVERSATIONS = ("26", "30", "41", "42", "43")
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}
_EVIDENCE = re.compile(r"D(\d+):(\d+)")


@dataclass(frozen=True)
class Question:
    conversation: str  # the LoCoMo conversation (one user)
    user: str
    text: str
    category: int
    evidence: frozenset[tuple[str, int]]  # (stored conversation key, turn index) per evidence turn

    @property
    def sessions(self) -> frozenset[str]:
        return frozenset(c for c, _ in self.evidence)


def session_id(conversation: str, session: int) -> str:
    """The export's conversation id of a session."""
    return f"locomo-{conversation}-session-{session:02d}"


def _when(text: str) -> datetime:
    return datetime.strptime(text.strip(), "%I:%M %p on %d %B, %Y").replace(tzinfo=UTC)


def write_export(path: Path, conversations: Iterable[str] = CONVERSATIONS) -> list[Question]:
    """Write the conversations as a JSONL export to `path`; their questions of categories 1-4
    with well-formed evidence (category 5 has no answer in the conversation)."""
    questions: list[Question] = []
    with path.open("w") as out:
        for conv in conversations:
            data = json.loads((DEV_DIR / f"{conv}.json").read_text())
            user = f"locomo-{conv}"
            position: dict[str, tuple[str, int]] = {}
            k = 1
            while f"session_{k}" in data:
                conv_id = session_id(conv, k)
                start = _when(data[f"session_{k}_date_time"])
                index = 0
                for turn in data[f"session_{k}"]:
                    text = turn["text"].strip()
                    if turn.get("blip_caption"):
                        text = f"{text} [shares a photo: {turn['blip_caption']}]".strip()
                    if not text:
                        continue
                    record = {
                        "conversation_id": conv_id,
                        "user_id": user,
                        "title": f"session {k}",
                        "role": "user" if turn["speaker"] == data["speaker_a"] else "assistant",
                        "name": turn["speaker"],
                        "content": text,
                        "created_at": (start + timedelta(seconds=index)).isoformat(),
                    }
                    out.write(json.dumps(record) + "\n")
                    # Stored (and returned) under its key per user and export id.
                    position[turn["dia_id"]] = (conversation_key(user, conv_id), index)
                    index += 1
                k += 1
            for qa in data["qa"]:
                if qa["category"] not in CATEGORIES:
                    continue
                evidence = frozenset(
                    position[f"D{m[1]}:{m[2]}"]
                    for e in qa["evidence"]
                    if (m := _EVIDENCE.fullmatch(e.strip())) and f"D{m[1]}:{m[2]}" in position
                )
                if evidence:
                    questions.append(Question(conv, user, qa["question"], qa["category"], evidence))
    return questions


METRICS = ("hit@1", "hit@5", "hit@10", "MRR@10", "session hit@1")


def score(question: Question, ranked: list[tuple[str, int, int]]) -> tuple[float, ...]:
    """The metrics of one ranking: (conversation id, turn start, turn end) per returned chunk."""
    first = next(
        (
            rank
            for rank, (conv, start, end) in enumerate(ranked[:10])
            if any(c == conv and start <= t <= end for c, t in question.evidence)
        ),
        None,
    )
    session = bool(ranked) and ranked[0][0] in question.sessions
    return (
        float(first == 0),
        float(first is not None and first < 5),
        float(first is not None),
        0.0 if first is None else 1.0 / (first + 1),
        float(session),
    )
