"""Turn-aware chunking sized in tokens of the embedding model's tokenizer.

A conversation is cut into exchanges (a user turn and the replies up to the next user turn);
an exchange longer than a tier's budget is split into token windows that overlap and end on word
boundaries. Exchanges never share a chunk, so editing one turn changes only the chunks of its
exchange, and appending turns leaves earlier chunks untouched.

Each tier (e.g. micro / medium / macro) is one token budget; every tier runs the same algorithm.
Chunk ids hash the conversation, tier and chunk text (plus an occurrence counter for repeated
text), so they are stable across re-ingests and independent of chunk position.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field, PrivateAttr

from retrieval_assets.lib.models import DEFAULT_ST_MODEL, load_tokenizer
from retrieval_assets.lib.sources import USER_ROLES, Conversation

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer

# Bump when the algorithm changes: stored chunks made by another version are rebuilt.
CHUNKER_VERSION = 1
# Sized for all-MiniLM-L6-v2 (256 positions including [CLS]/[SEP]); add micro/macro tiers by config.
DEFAULT_TIERS = "medium:240:32"


@dataclass(frozen=True)
class Tier:
    name: str
    max_tokens: int
    overlap_tokens: int

    def __post_init__(self) -> None:
        if self.max_tokens < 8:
            raise ValueError(f"tier {self.name!r}: max_tokens must be at least 8")
        if not 0 <= self.overlap_tokens <= self.max_tokens // 2:
            raise ValueError(
                f"tier {self.name!r}: overlap_tokens must be between 0 and max_tokens/2"
            )


def parse_tiers(spec: str) -> tuple[Tier, ...]:
    """`"micro:64:8,medium:240:32"` → tiers (name:max_tokens:overlap_tokens)."""
    tiers = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            name, max_tokens, overlap = part.split(":")
            tiers.append(Tier(name.strip(), int(max_tokens), int(overlap)))
        except ValueError as exc:
            raise ValueError(
                f"bad chunk tier {part!r} in {spec!r}: expected name:max_tokens:overlap ({exc})"
            ) from exc
    if not tiers or len({t.name for t in tiers}) != len(tiers):
        raise ValueError(f"chunk tiers {spec!r} must name at least one tier, each once")
    return tuple(tiers)


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    conversation_id: str
    user_id: str
    tier: str
    chunk_index: int
    turn_start: int
    turn_end: int
    roles: tuple[str, ...]
    content: str
    content_hash: str
    token_count: int
    created_at: datetime | None


@dataclass(frozen=True)
class _Exchange:
    text: str
    first_turn: int
    line_starts: tuple[int, ...]  # char offset in `text` where each turn's line begins
    roles: tuple[str, ...]
    created_at: tuple[datetime | None, ...]


class Chunker:
    """Chunks conversations with one tokenizer and a set of tiers."""

    def __init__(self, tokenizer: Tokenizer, tiers: tuple[Tier, ...], tokenizer_name: str) -> None:
        self._tokenizer = tokenizer
        self.tiers = tiers
        spec = ",".join(f"{t.name}:{t.max_tokens}:{t.overlap_tokens}" for t in tiers)
        self.signature = f"v{CHUNKER_VERSION}|{tokenizer_name}|{spec}"

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def chunk(self, conversation: Conversation) -> list[Chunk]:
        exchanges = _exchanges(conversation)
        encodings = self._tokenizer.encode_batch(
            [e.text for e in exchanges], add_special_tokens=False
        )
        chunks: list[Chunk] = []
        for tier in self.tiers:
            seen: Counter[str] = Counter()
            index = 0
            for exchange, encoding in zip(exchanges, encodings, strict=True):
                for start, end, tokens in self._windows(exchange.text, encoding, tier):
                    chunks.append(
                        _make_chunk(conversation, tier, index, exchange, start, end, tokens, seen)
                    )
                    index += 1
        return chunks

    def _windows(self, text: str, enc: Encoding, tier: Tier) -> list[tuple[int, int, int]]:
        """(char start, char end, token count) windows covering all of `text`."""
        offsets, words = enc.offsets, enc.word_ids
        n = len(offsets)
        if n <= tier.max_tokens:
            return [(0, len(text), n)]
        word_starts = [i for i in range(n) if i == 0 or words[i] != words[i - 1]]
        windows: list[tuple[int, int, int]] = []
        start = 0
        while True:
            end = min(start + tier.max_tokens, n)
            if end < n:
                end = _snap_down(word_starts, end, floor=start + 1)
            char_start = 0 if start == 0 else offsets[start][0]
            char_end = len(text) if end == n else offsets[end][0]
            piece = text[char_start:char_end]
            tokens = end - start
            if not (_is_boundary(word_starts, start) and _is_boundary(word_starts, end, n)):
                # A mid-word cut may tokenize differently on its own: count, and shrink to fit.
                tokens = self.count_tokens(piece)
                while tokens > tier.max_tokens and end - start > 1:
                    end -= 1
                    char_end = offsets[end][0]
                    piece = text[char_start:char_end]
                    tokens = self.count_tokens(piece)
            windows.append((char_start, char_end, tokens))
            if end >= n:
                return windows
            next_start = _snap_down(word_starts, end - tier.overlap_tokens, floor=start + 1)
            start = max(next_start, start + 1)


def _snap_down(word_starts: list[int], position: int, floor: int) -> int:
    """The last word start at or before `position` and at or after `floor`, else `position`."""
    i = bisect.bisect_right(word_starts, position) - 1
    if i >= 0 and word_starts[i] >= floor:
        return word_starts[i]
    return position


def _is_boundary(word_starts: list[int], position: int, n: int = -1) -> bool:
    if position == n:
        return True
    i = bisect.bisect_left(word_starts, position)
    return i < len(word_starts) and word_starts[i] == position


def _exchanges(conversation: Conversation) -> list[_Exchange]:
    groups: list[list[int]] = []
    for i, turn in enumerate(conversation.turns):
        if not groups or turn.role.lower() in USER_ROLES:
            groups.append([])
        groups[-1].append(i)
    exchanges = []
    for group in groups:
        lines, starts, at = [], [], 0
        for i in group:
            line = f"{conversation.turns[i].speaker}: {conversation.turns[i].content}"
            starts.append(at)
            lines.append(line)
            at += len(line) + 1
        exchanges.append(
            _Exchange(
                text="\n".join(lines),
                first_turn=group[0],
                line_starts=tuple(starts),
                roles=tuple(conversation.turns[i].role for i in group),
                created_at=tuple(conversation.turns[i].created_at for i in group),
            )
        )
    return exchanges


def _make_chunk(
    conversation: Conversation,
    tier: Tier,
    index: int,
    exchange: _Exchange,
    char_start: int,
    char_end: int,
    tokens: int,
    seen: Counter[str],
) -> Chunk:
    content = exchange.text[char_start:char_end]
    first = bisect.bisect_right(exchange.line_starts, char_start) - 1
    last = bisect.bisect_right(exchange.line_starts, max(char_end - 1, char_start)) - 1
    content_hash = hashlib.sha256(content.encode()).hexdigest()
    occurrence = seen[content_hash]
    seen[content_hash] += 1
    identity = "\x1f".join([conversation.id, tier.name, content_hash, str(occurrence)])
    roles = tuple(dict.fromkeys(exchange.roles[first : last + 1]))
    return Chunk(
        chunk_id=hashlib.sha256(identity.encode()).hexdigest()[:32],
        conversation_id=conversation.id,
        user_id=conversation.user_id,
        tier=tier.name,
        chunk_index=index,
        turn_start=exchange.first_turn + first,
        turn_end=exchange.first_turn + last,
        roles=roles,
        content=content,
        content_hash=content_hash,
        token_count=tokens,
        created_at=exchange.created_at[first] or conversation.created_at,
    )


class ChunkerResource(dg.ConfigurableResource):
    """The chunker: the embedding model's tokenizer and the tier budgets."""

    tokenizer_model: str = Field(
        default=DEFAULT_ST_MODEL,
        description="Model whose tokenizer sizes chunks (the sentence-transformers model).",
    )
    tiers: str = Field(
        default=DEFAULT_TIERS,
        description="Comma-separated name:max_tokens:overlap_tokens, e.g. "
        "'micro:64:8,medium:240:32'. Changing it re-chunks every conversation.",
    )

    _chunker: Chunker | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._chunker = self.build()

    def build(self) -> Chunker:
        return Chunker(
            load_tokenizer(self.tokenizer_model), parse_tiers(self.tiers), self.tokenizer_model
        )

    @property
    def chunker(self) -> Chunker:
        if self._chunker is None:
            self._chunker = self.build()
        return self._chunker
