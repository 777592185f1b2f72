"""The rerank's scoring over Arrow columns as LanceDB returns them (chunked, sliced, with NULLs)."""

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
        return Hit(
            "c", conversation, user, "medium", ("user",), turn, turn, "x", None, 1.0, "hybrid"
        )

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
