"""The rerank's scoring over Arrow columns as LanceDB returns them (chunked, sliced, with NULLs),
the hybrid fusion's arithmetic and the canary's counting."""

import numpy as np
import pyarrow as pa

from retrieval_assets.lib.search import fine_scores


def test_fine_scores_match_row_by_row_dot_products_and_mark_missing_vectors():
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(7, 5)).astype(np.float32)
    rows = [list(v) for v in vectors]
    rows[2] = None
    rows[5] = None
    array = pa.array(rows, type=pa.list_(pa.float32(), 5))
    column = pa.chunked_array([array.slice(0, 3), array.slice(3)])  # two chunks, one offset
    query = rng.normal(size=5).astype(np.float32)

    scores = fine_scores(column, query)

    expected = [np.nan if r is None else float(np.dot(r, query)) for r in rows]
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    assert np.isnan(scores[[2, 5]]).all()
    assert fine_scores(pa.chunked_array([], array.type), query).shape == (0,)


def test_the_canary_counts_answers_in_the_top_5_and_says_when_nothing_was_measured():
    from retrieval_assets.lib.canary import PROBES, canary_hit_at_5
    from retrieval_assets.lib.ingest import conversation_key
    from retrieval_assets.lib.search import Hit

    def hit(conversation: str, user: str, turn: int) -> Hit:
        return _hit("c", 1.0, conversation, (turn, turn), user=user)

    answers = {p.question: p for p in PROBES}

    def perfect(question: str, user: str) -> list[Hit]:
        p = answers[question]
        return [hit(conversation_key(user, p.conversation), user, p.turns[0])]

    def late(question: str, user: str) -> list[Hit]:  # the answer at rank 6: not in the top 5
        p = answers[question]
        key = conversation_key(user, p.conversation)
        return [hit(key, user, 99)] * 5 + [hit(key, user, p.turns[0])]

    assert canary_hit_at_5(perfect) == 1.0
    assert canary_hit_at_5(late) == 0.0
    assert canary_hit_at_5(lambda q, u: []) is None  # no sample conversation stored
    half = iter(range(len(PROBES)))
    assert canary_hit_at_5(lambda q, u: perfect(q, u) if next(half) % 2 else late(q, u)) == 0.5
    # Where DEFAULT_USER_ID names another user, the samples' records without a user are that
    # user's: their probes are asked, and answered, as that user.
    asked = set()

    def as_asked(question: str, user: str) -> list[Hit]:
        asked.add(user)
        return perfect(question, user)

    assert canary_hit_at_5(as_asked, "prod-user") == 1.0
    assert "prod-user" in asked and "local-user" not in asked
    assert canary_hit_at_5(lambda q, u: perfect(q, "local-user" if u == "prod-user" else u)) == 1.0
    assert canary_hit_at_5(lambda q, u: perfect(q, "local-user" if u == "prod-user" else u),
                           "prod-user") == 0.5  # fmt: skip


def _hit(
    chunk: str,
    score: float,
    conversation: str = "c1",
    turns: tuple[int, int] = (0, 1),
    tier: str = "medium",
    user: str = "u",
):
    from retrieval_assets.lib.search import Hit

    return Hit(chunk, conversation, user, tier, ("user",), *turns, chunk, None, score, "dense")


def test_fusion_adds_the_best_neighbours_score_within_a_conversation_and_tier():
    from retrieval_assets.lib.search import fuse

    # "a" and "b" tie on both lists; "a" has a strong neighbour ("n", the next exchange), "b"
    # only chunks that are not its neighbours: a gap of one turn, another tier, another
    # conversation.
    dense = [
        _hit("n", 0.9, turns=(2, 3)),
        _hit("a", 0.5, turns=(0, 1)),
        _hit("b", 0.5, turns=(10, 11)),
        _hit("gap", 0.9, turns=(13, 14)),
        _hit("tier", 0.9, turns=(10, 11), tier="micro"),
        _hit("other", 0.9, conversation="c2", turns=(10, 11)),
        _hit("low", 0.1, turns=(40, 41)),
    ]
    lexical = [_hit("a", 2.0, turns=(0, 1)), _hit("b", 2.0, turns=(10, 11))]

    plain = {h.chunk_id: h.score for h in fuse(dense, lexical, 10, 0.5, 0.0)}
    assert plain["a"] == plain["b"]
    fused = {h.chunk_id: h.score for h in fuse(dense, lexical, 10, 0.5, 0.3)}
    # a gains 0.3 x n's fused score; b, with no neighbour among the candidates, 0.3 x the score
    # of a chunk both lists missed (each list's lowest z-score).
    lowest = 0.5 * min(_z(dense)) + 0.5 * min(_z(lexical))
    assert np.isclose(fused["a"], plain["a"] + 0.3 * plain["n"])
    assert np.isclose(fused["b"], plain["b"] + 0.3 * lowest)
    assert fused["a"] > fused["b"]
    # An overlapping window of the same exchange is a neighbour too.
    window = [*dense, _hit("w", 0.9, turns=(11, 11))]
    overlapped = {h.chunk_id: h.score for h in fuse(window, lexical, 10, 0.5, 0.3)}
    base = {h.chunk_id: h.score for h in fuse(window, lexical, 10, 0.5, 0.0)}
    assert np.isclose(overlapped["b"], base["b"] + 0.3 * base["w"])


def _z(hits):
    scores = np.array([h.score for h in hits])
    return (scores - scores.mean()) / (scores.std() or 1.0)


def test_fusion_weights_outside_0_to_1_are_refused():
    import pytest

    from retrieval_assets.lib.search import fuse

    for weights in ((1.5, 0.3), (0.5, -0.1), (0.5, 1.01)):
        with pytest.raises(ValueError, match="weight"):
            fuse([_hit("a", 1.0)], [], 10, *weights)
