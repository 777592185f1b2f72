"""Chunker invariants: nothing lost, token budgets held, ids stable and local to edits."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrieval_assets.lib.chunking import Chunker, parse_tiers
from retrieval_assets.lib.models import DEFAULT_ST_MODEL, load_tokenizer
from retrieval_assets.lib.sources import Conversation, Turn

TIERS = "micro:16:4,medium:48:8"
WORDS = (
    "the starter smells like acetone feed it twice daily postgres index sort limit "
    "Lisbon tram café naïve résumé 42 3.14 don't C++ e-mail über 東京 🙂"
).split()


@pytest.fixture(scope="module")
def chunker() -> Chunker:
    return Chunker(load_tokenizer(DEFAULT_ST_MODEL), parse_tiers(TIERS), DEFAULT_ST_MODEL)


def conversation(turns: list[tuple[str, str]], conv_id: str = "c1") -> Conversation:
    return Conversation(
        conv_id, "u1", None, "test", "record 0", tuple(Turn(r, c) for r, c in turns), None, None
    )


texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=120).map(" ".join)
punctuated = st.tuples(texts, st.sampled_from(["", ".", "?!", ", ok.", "\n\nand more:"])).map(
    "".join
)
turn_lists = st.lists(
    st.tuples(st.sampled_from(["user", "assistant", "human", "gpt", "tool"]), punctuated),
    min_size=1,
    max_size=8,
)
hyp = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@hyp
@given(turn_lists)
def test_no_text_is_lost(chunker, turns):
    chunks = chunker.chunk(conversation(turns))
    for tier in chunker.tiers:
        tier_chunks = [c for c in chunks if c.tier == tier.name]
        for index, (_, content) in enumerate(turns):
            covering = " ".join(
                c.content for c in tier_chunks if c.turn_start <= index <= c.turn_end
            )
            for word in re.findall(r"\w+", content):
                assert word in covering, (tier.name, index, word)


@hyp
@given(turn_lists)
def test_every_chunk_fits_its_tier(chunker, turns):
    budgets = {t.name: t.max_tokens for t in chunker.tiers}
    for chunk in chunker.chunk(conversation(turns)):
        assert 0 < chunk.token_count <= budgets[chunk.tier]
        assert chunker.count_tokens(chunk.content) <= budgets[chunk.tier]


@hyp
@given(turn_lists)
def test_ids_are_stable_and_unique(chunker, turns):
    first = chunker.chunk(conversation(turns))
    again = chunker.chunk(conversation(turns))
    assert [c.chunk_id for c in first] == [c.chunk_id for c in again]
    assert len({c.chunk_id for c in first}) == len(first)


@hyp
@given(turn_lists, turn_lists)
def test_appending_turns_keeps_every_earlier_exchange(chunker, turns, more):
    more = [("user", more[0][1]), *more[1:]]  # a new exchange starts with the user
    before = {c.chunk_id for c in chunker.chunk(conversation(turns))}
    after = {c.chunk_id for c in chunker.chunk(conversation(turns + more))}
    assert before <= after


def test_editing_one_turn_changes_only_its_exchange(chunker):
    turns = [
        ("user", "first question about sourdough"),
        ("assistant", "first answer " * 30),
        ("user", "second question about postgres"),
        ("assistant", "second answer " * 30),
        ("user", "third question about lisbon"),
        ("assistant", "third answer " * 30),
    ]
    original = chunker.chunk(conversation(turns))
    edited_turns = list(turns)
    edited_turns[3] = ("assistant", "a corrected second answer " * 30)
    edited = chunker.chunk(conversation(edited_turns))
    changed = {c.chunk_id for c in original} ^ {c.chunk_id for c in edited}
    changed_chunks = [c for c in original + edited if c.chunk_id in changed]
    assert changed_chunks
    assert all(2 <= c.turn_start and c.turn_end <= 3 for c in changed_chunks)


def test_chunks_carry_roles_and_turn_spans(chunker):
    chunks = chunker.chunk(conversation([("user", "hi"), ("assistant", "hello"), ("user", "bye")]))
    medium = [c for c in chunks if c.tier == "medium"]
    assert [(c.turn_start, c.turn_end, c.roles) for c in medium] == [
        (0, 1, ("user", "assistant")),
        (2, 2, ("user",)),
    ]
    assert medium[0].content == "user: hi\nassistant: hello"


def test_one_enormous_word_is_still_cut_within_budget(chunker):
    chunks = chunker.chunk(conversation([("user", "x" * 3_000)]))
    assert all(chunker.count_tokens(c.content) <= 48 for c in chunks if c.tier == "medium")
    assert "".join(c.content for c in chunks if c.tier == "medium").count("x") >= 3_000


def test_same_text_in_two_conversations_gets_two_ids(chunker):
    a = chunker.chunk(conversation([("user", "same words")], "a"))
    b = chunker.chunk(conversation([("user", "same words")], "b"))
    assert {c.chunk_id for c in a}.isdisjoint({c.chunk_id for c in b})


def test_repeated_text_in_one_conversation_gets_distinct_ids(chunker):
    chunks = chunker.chunk(conversation([("user", "ok"), ("user", "ok"), ("user", "ok")]))
    assert len({c.chunk_id for c in chunks}) == len(chunks) == 6


@pytest.mark.parametrize("spec", ["", "a:4:0", "a:64:40", "a:64", "a:64:8,a:32:4"])
def test_bad_tier_specs_are_rejected(spec):
    with pytest.raises(ValueError):
        parse_tiers(spec)


def test_signature_changes_with_settings(chunker):
    other = Chunker(chunker._tokenizer, parse_tiers("medium:48:4"), DEFAULT_ST_MODEL)
    assert other.signature != chunker.signature


def test_chunks_name_their_speakers_where_the_export_does(chunker):
    named = Conversation(
        "c1",
        "u1",
        None,
        "test",
        "record 0",
        (Turn("user", "the starter smells", None, "Caroline"), Turn("assistant", "feed it")),
        None,
        None,
    )
    medium = [c for c in chunker.chunk(named) if c.tier == "medium"]
    assert medium[0].content == "Caroline: the starter smells\nassistant: feed it"
