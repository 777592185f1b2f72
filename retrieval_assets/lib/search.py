"""Search: two-stage over LanceDB (coarse ANN over FastEmbed vectors, then a rerank by
sentence-transformers vectors), or the Titan vectors in Postgres through the match RPCs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from retrieval_assets.lib.columns import COARSE, FINE
from retrieval_assets.lib.lancedb_store import quote_literal
from retrieval_assets.lib.search_snapshot import SearchSnapshot, vector_matrix

COARSE_TOP_K = 100
# IVF partitions probed per query (the index has one per million vectors) and the HNSW search
# breadth: at 250,000 rows ef=150 gave recall@100 0.99 in 6 ms (tests/benchmarks prints a sweep).
DEFAULT_NPROBES = 4
DEFAULT_EF = 150
# A user filter matching at most this many vectors is searched exactly.
EXACT_FILTER_ROWS = 20_000
RESULT_COLUMNS = [
    "chunk_id",
    "conversation_id",
    "user_id",
    "tier",
    "turn_start",
    "turn_end",
    "roles",
    "content",
    "created_at",
]


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    conversation_id: str
    user_id: str
    roles: tuple[str, ...]
    turn_start: int
    turn_end: int
    content: str
    coarse_score: float
    score: float  # the rerank score; the coarse score where the row has no fine vector yet
    reranked: bool


def coarse_search(
    table: Any,
    query_vector: np.ndarray,
    top_k: int = COARSE_TOP_K,
    user: str | None = None,
    columns: list[str] | None = None,
    exact: bool = False,
    nprobes: int = DEFAULT_NPROBES,
    ef: int = DEFAULT_EF,
    snapshot: SearchSnapshot | None = None,
):
    """The `top_k` nearest chunks by FastEmbed vector (cosine): min(top_k, rows with a vector).

    Rows whose vector is still NULL are skipped by LanceDB itself. Without `user` the ANN index
    answers (rows not yet indexed are scanned). With `user`, a filter matching few rows is
    searched exactly (the scalar index on user_id finds them; scanning a few thousand vectors is
    cheap); a larger filtered set goes through the ANN index, and if the index's probes found
    fewer than min(top_k, matching rows) the query is answered exactly instead. `exact=True`
    bypasses the index (the ground truth for recall).

    A search snapshot (`snapshot`) of the table's current version answers instead when no user
    filter is set and it holds every column asked for.
    """
    wanted = columns or RESULT_COLUMNS
    if snapshot is not None and user is None and not exact and set(wanted) <= snapshot.columns:
        found = snapshot.top(query_vector, top_k) if snapshot.serves(table) else None
        if found is not None:
            return _snapshot_rows(snapshot, *found, wanted)
    where = None if user is None else f"user_id = {quote_literal(user)}"
    matching = None
    if where is not None and not exact:
        matching = table.count_rows(f"{where} AND {COARSE.column} IS NOT NULL")
        exact = matching <= EXACT_FILTER_ROWS

    def run(exact_search: bool):
        query = table.search(
            np.asarray(query_vector, dtype=np.float32), vector_column_name=COARSE.column
        ).distance_type("cosine")
        if where is not None:
            query = query.where(where, prefilter=True)
        query = query.select([*wanted, "_distance"]).limit(top_k)
        if exact_search:
            return query.bypass_vector_index().to_arrow()
        return query.nprobes(nprobes).ef(max(ef, top_k)).to_arrow()  # HNSW needs ef >= k

    result = run(exact)
    if matching is not None and not exact and result.num_rows < min(top_k, matching):
        result = run(True)
    return result


def _snapshot_rows(
    snapshot: SearchSnapshot, positions: np.ndarray, scores: np.ndarray, columns: list[str]
) -> pa.Table:
    """The snapshot's answer shaped as LanceDB's: the asked columns and `_distance` (cosine
    distance)."""
    rows = snapshot.rows_at(positions, [c for c in columns if c != FINE.column])
    out: dict[str, pa.Array] = {}
    for name in columns:
        if name == FINE.column:  # the fine vectors; NULL where the row had none
            fine = np.asarray(snapshot.fine[positions], dtype=np.float32)
            out[name] = pa.FixedSizeListArray.from_arrays(
                pa.array(fine.ravel()), fine.shape[1], mask=pa.array(~snapshot.has_fine[positions])
            )
        else:
            out[name] = rows.column(name)
    out["_distance"] = pa.array(1.0 - scores, pa.float32())
    return pa.table(out)


_QUERY_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fine-query")


def fine_scores(column: pa.ChunkedArray | pa.Array, query: np.ndarray) -> np.ndarray:
    """Cosine of each candidate's fine vector with the query (vectors are unit length); NaN
    where the row has no fine vector yet. One matrix product over the Arrow buffer."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    if len(column) == 0:
        return np.empty(0)
    vectors = vector_matrix(column)
    scores = (vectors @ np.asarray(query, dtype=np.float32)).astype(np.float64)
    scores[column.is_null().to_numpy(zero_copy_only=False)] = np.nan
    return scores


def search(
    table: Any,
    fastembed: Any,
    sentence_transformer: Any,
    query: str,
    k: int = 10,
    user: str | None = None,
    coarse_k: int = COARSE_TOP_K,
    snapshot: SearchSnapshot | None = None,
) -> list[Hit]:
    """Coarse top-`coarse_k` by FastEmbed, reranked by sentence-transformers; the best `k`.

    Candidates whose fine vector is still NULL (awaiting the backfill) follow the reranked ones in
    coarse order; scores from the two spaces are never compared with each other. The candidates
    are read once, with their rows (from `snapshot` when it serves the table's version): a
    second read for the `k` returned would cost a LanceDB call, and could meet a compacted table.
    """
    # The fine query embedding runs while the coarse stage does (both models and LanceDB release
    # the GIL), so the query pays for the longer of the two, not their sum.
    query_fine = _QUERY_POOL.submit(sentence_transformer.embed_query, query, alongside=True)
    candidates = coarse_search(
        table,
        fastembed.embed_query(query, alongside=True),
        coarse_k,
        user,
        columns=[*RESULT_COLUMNS, FINE.column],
        snapshot=snapshot,
    )
    fine = fine_scores(candidates.column(FINE.column), query_fine.result())
    coarse = 1.0 - candidates.column("_distance").to_numpy()
    reranked = ~np.isnan(fine)
    score = np.where(reranked, fine, coarse)
    best = np.lexsort((-score, ~reranked))[:k]  # reranked first, then by score
    rows = candidates.select(RESULT_COLUMNS).take(best).to_pylist()
    return [
        Hit(
            r["chunk_id"],
            r["conversation_id"],
            r["user_id"],
            tuple(r["roles"]),
            r["turn_start"],
            r["turn_end"],
            r["content"],
            float(coarse[i]),
            float(score[i]),
            bool(reranked[i]),
        )
        for i, r in zip(best, rows, strict=True)
    ]


@dataclass(frozen=True)
class PostgresHit:
    chunk_id: str
    conversation_id: str
    user_id: str
    tier: str
    roles: tuple[str, ...]
    turn_start: int
    turn_end: int
    content: str
    embedding_model: str
    score: float


def postgres_search(
    conn: Any,
    query_vector: np.ndarray,
    k: int = 10,
    user: str | None = None,
    tier: str | None = None,
    threshold: float = -1.0,
) -> list[PostgresHit]:
    """`match_conversation_chunks_by_tier` over the Titan vectors (HNSW): the `k` nearest chunks
    with cosine similarity >= `threshold` (default -1: no threshold), optionally one user's and
    one tier's. Exactly `k` rows come back whenever `k` rows qualify."""
    rows = conn.execute(
        "SELECT chunk_id, conversation_id, user_id, tier, roles, turn_start, turn_end, content, "
        "embedding_model, similarity FROM match_conversation_chunks_by_tier("
        "%s::vector, %s, %s, %s, %s)",
        [np.asarray(query_vector, dtype=np.float32), tier, threshold, k, user],
    ).fetchall()
    return [
        PostgresHit(r[0], r[1], r[2], r[3], tuple(r[4]), r[5], r[6], r[7], r[8], float(r[9]))
        for r in rows
    ]


PROBE_QUERIES = 20  # chunk texts a recall check queries with


def sample_recall(
    table,
    coarse_model: Any,
    queries: int = PROBE_QUERIES,
    k: int = 10,
    snapshot: SearchSnapshot | None = None,
) -> float:
    """Recall@k of the ANN search (`snapshot`'s where given) against exact search, for chunk
    texts used as queries."""
    sample = (
        table.search()
        .where(f"{COARSE.column} IS NOT NULL")
        .select(["content"])
        .limit(queries)
        .to_arrow()
        .column("content")
        .to_pylist()
    )
    if not sample:
        return 1.0
    found = []
    for text in sample:
        vector = coarse_model.embed_query(text[:500])
        approx = set(
            coarse_search(table, vector, k, columns=["chunk_id"], snapshot=snapshot)
            .column("chunk_id")
            .to_pylist()
        )
        exact = set(
            coarse_search(table, vector, k, columns=["chunk_id"], exact=True)
            .column("chunk_id")
            .to_pylist()
        )
        found.append(len(approx & exact) / max(len(exact), 1))
    return float(np.mean(found))
