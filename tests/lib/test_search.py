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
