"""Search, in three modes on both stores.

- dense: in LanceDB two stages (coarse ANN over the FastEmbed vectors, a rerank by the
  sentence-transformers vectors); in Postgres the Titan vectors through the match RPCs.
- lexical: BM25 over chunk text (LanceDB's full-text index; in Postgres the tsvector column and
  per-user statistics of match_conversation_chunks_lexical).
- hybrid (the default): the best `HYBRID_CANDIDATES` of each, each list's scores standardised
  (z-scores), fused with weight `LEXICAL_WEIGHT` on the lexical side; a chunk one list did not
  return takes that list's lowest z-score. Each chunk then gains `CONTEXT_WEIGHT` times the best
  fused score among its neighbours in the candidates (see `fuse`). Postgres fuses the same way in
  SQL (match_conversation_chunks_hybrid), so the two stores agree.

The weights and depth were chosen by leave-one-conversation-out on the LoCoMo development split
(tests/benchmarks/test_quality_bench.py prints the choice per fold).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from retrieval_assets.lib.columns import COARSE, FINE
from retrieval_assets.lib.lancedb_store import quote_literal
from retrieval_assets.lib.lexical import TEXT_COLUMN
from retrieval_assets.lib.search_snapshot import SearchSnapshot, chunk_keys, vector_matrix

COARSE_TOP_K = 100
# IVF partitions probed per query (the index has one per million vectors) and the HNSW search
# breadth: at 250,000 rows ef=150 gave recall@100 0.99 in 6 ms (tests/benchmarks prints a sweep).
DEFAULT_NPROBES = 4
DEFAULT_EF = 150
# A user filter matching at most this many vectors is searched exactly.
EXACT_FILTER_ROWS = 20_000
MODES = ("dense", "lexical", "hybrid")
DEFAULT_MODE = "hybrid"
LEXICAL_WEIGHT = 0.6
# Of the best fused score among a chunk's neighbours (see fuse); chosen with LEXICAL_WEIGHT by
# leave-one-conversation-out on LoCoMo's development split (tests/benchmarks).
CONTEXT_WEIGHT = 0.3
HYBRID_CANDIDATES = 50
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
    """One chunk found, in either store and any mode."""

    chunk_id: str
    conversation_id: str
    user_id: str
    tier: str
    roles: tuple[str, ...]
    turn_start: int
    turn_end: int
    content: str
    created_at: datetime | None
    score: float  # what the hits are ordered by: the mode's score
    how: str  # "rerank", "coarse" (no fine vector yet), "titan", "lexical" or "hybrid"
    dense: float | None = None  # cosine similarity in the dense ranking, where it found the chunk
    lexical: float | None = None  # BM25, where the lexical ranking found the chunk
    model: str | None = None  # the Titan model of a Postgres dense score

    @property
    def reranked(self) -> bool:
        return self.how == "rerank"


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"search mode {mode!r}: expected one of {', '.join(MODES)}")


def _check_weights(lexical_weight: float, context_weight: float) -> None:
    for name, weight in (("lexical", lexical_weight), ("context", context_weight)):
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"{name} weight {weight} is not between 0 and 1")


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

    A search snapshot (`snapshot`) of the table's current version answers instead when it holds
    every column asked for: its HNSW without `user`, and with `user` an exact scoring of that
    user's rows (the same answer as LanceDB's exact filtered search, from memory).
    """
    wanted = columns or RESULT_COLUMNS
    if snapshot is not None and not exact and set(wanted) <= snapshot.columns:
        if snapshot.serves(table):
            found = (
                snapshot.top(query_vector, top_k)
                if user is None
                else snapshot.user_top(user, query_vector, top_k)
            )
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


_QUERY_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="search-query")


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
    *,
    coarse_k: int = COARSE_TOP_K,
    snapshot: SearchSnapshot | None = None,
    mode: str = DEFAULT_MODE,
    lexical_weight: float = LEXICAL_WEIGHT,
    context_weight: float = CONTEXT_WEIGHT,
) -> list[Hit]:
    """The best `k` chunks of the LanceDB table for `query` (one user's where `user` is set), by
    `mode`: dense (two stages), lexical (BM25) or hybrid (both, fused)."""
    _check_mode(mode)
    if mode == "dense":
        return dense_search(
            table, fastembed, sentence_transformer, query, k, user, coarse_k, snapshot
        )
    if mode == "lexical":
        return lexical_search(table, query, k, user, snapshot)
    depth = max(k, HYBRID_CANDIDATES)
    # The full-text query runs while the dense side embeds the query (both release the GIL).
    lexical = _QUERY_POOL.submit(lexical_search, table, query, depth, user, snapshot)
    dense = dense_search(
        table, fastembed, sentence_transformer, query, depth, user, max(coarse_k, depth), snapshot
    )
    return fuse(dense, lexical.result(), k, lexical_weight, context_weight)


def dense_search(
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
        _hit(r, float(score[i]), "rerank" if reranked[i] else "coarse", dense=float(score[i]))
        for i, r in zip(best, rows, strict=True)
    ]


def lexical_search(
    table: Any,
    query: str,
    k: int = 10,
    user: str | None = None,
    snapshot: SearchSnapshot | None = None,
) -> list[Hit]:
    """The best `k` chunks by BM25 over their text (LanceDB's full-text index; rows written
    since the index last caught up are searched too). Nothing when the query has no words.

    Where `snapshot` serves the table's version, LanceDB returns only the chunk ids and scores
    and the rows come from the snapshot: reading a few columns of 50 rows is most of a LanceDB
    full-text query's cost."""
    if not any(ch.isalnum() for ch in query):
        return []
    request = table.search(query, query_type="fts", fts_columns=TEXT_COLUMN)
    if user is not None:
        request = request.where(f"user_id = {quote_literal(user)}", prefilter=True)
    if snapshot is not None and snapshot.serves(table):
        found = request.select(["chunk_id", "_score"]).limit(k).to_arrow()
        positions = snapshot.positions_of(chunk_keys(found.column("chunk_id")))
        if (positions >= 0).all():  # else a chunk without a coarse vector: not in the snapshot
            rows = snapshot.rows_at(positions, RESULT_COLUMNS).to_pylist()
            scores = found.column("_score").to_pylist()
            return [
                _hit(r, float(s), "lexical", lexical=float(s))
                for r, s in zip(rows, scores, strict=True)
            ]
    rows = request.select([*RESULT_COLUMNS, "_score"]).limit(k).to_arrow().to_pylist()
    return [_hit(r, float(r["_score"]), "lexical", lexical=float(r["_score"])) for r in rows]


def fuse(
    dense: list[Hit],
    lexical: list[Hit],
    k: int,
    lexical_weight: float = LEXICAL_WEIGHT,
    context_weight: float = CONTEXT_WEIGHT,
) -> list[Hit]:
    """The best `k` of two rankings, fused.

    Each list's scores become z-scores (population standard deviation; 1 where it is 0), a chunk
    missing from a list taking that list's lowest; a chunk's fused score is
    (1 - lexical_weight) * z(dense) + lexical_weight * z(lexical). Then each chunk gains
    `context_weight` times the best fused score among its neighbours: the candidates of the same
    conversation and tier whose turns touch or overlap its own (the exchanges either side, or
    another window of the same exchange), or, where none is a candidate, the fused score of a
    chunk both lists missed. A question's words are often spread over neighbouring exchanges
    (the topic in one, the answer in the next). Ties go to the smaller chunk id, as in SQL."""
    _check_weights(lexical_weight, context_weight)
    dense_z = _z_scores({h.chunk_id: h.score for h in dense})
    lexical_z = _z_scores({h.chunk_id: h.score for h in lexical})
    dense_floor = min(dense_z.values(), default=0.0)
    lexical_floor = min(lexical_z.values(), default=0.0)
    by_id = {h.chunk_id: h for h in lexical} | {h.chunk_id: h for h in dense}
    dense_of = {h.chunk_id: h.score for h in dense}
    lexical_of = {h.chunk_id: h.score for h in lexical}
    fused = {
        c: (1 - lexical_weight) * dense_z.get(c, dense_floor)
        + lexical_weight * lexical_z.get(c, lexical_floor)
        for c in by_id
    }
    missed = (1 - lexical_weight) * dense_floor + lexical_weight * lexical_floor
    together: dict[tuple[str, str], list[Hit]] = defaultdict(list)
    for hit in by_id.values():
        together[hit.conversation_id, hit.tier].append(hit)
    final = {
        c: fused[c]
        + context_weight
        * max(
            (fused[n] for n in _neighbours(h, together[h.conversation_id, h.tier])),
            default=missed,
        )
        for c, h in by_id.items()
    }
    best = sorted(final, key=lambda c: (-final[c], c))[:k]
    return [
        replace(
            by_id[c],
            score=final[c],
            how="hybrid",
            dense=dense_of.get(c),
            lexical=lexical_of.get(c),
        )
        for c in best
    ]


def _neighbours(hit: Hit, together: list[Hit]) -> Iterator[str]:
    """The chunk ids of the hits `together` with `hit` (its conversation's and tier's) whose
    turns touch or overlap its own."""
    for other in together:
        if (
            other.chunk_id != hit.chunk_id
            and other.turn_start <= hit.turn_end + 1
            and other.turn_end >= hit.turn_start - 1
        ):
            yield other.chunk_id


def _z_scores(scores: dict[str, float]) -> dict[str, float]:
    if not scores:
        return {}
    values = np.fromiter(scores.values(), dtype=np.float64, count=len(scores))
    spread = float(values.std()) or 1.0
    mean = float(values.mean())
    return {c: (v - mean) / spread for c, v in scores.items()}


def _hit(row: dict[str, Any], score: float, how: str, **scores: Any) -> Hit:
    return Hit(
        row["chunk_id"],
        row["conversation_id"],
        row["user_id"],
        row["tier"],
        tuple(row["roles"]),
        row["turn_start"],
        row["turn_end"],
        row["content"],
        row["created_at"],
        score,
        how,
        **scores,
    )


_PG_COLUMNS = (
    "chunk_id, conversation_id, user_id, tier, roles, turn_start, turn_end, content, created_at"
)


def postgres_search(
    conn: Any,
    titan_model: Any,
    query: str,
    k: int = 10,
    user: str | None = None,
    *,
    tier: str | None = None,
    mode: str = DEFAULT_MODE,
    lexical_weight: float = LEXICAL_WEIGHT,
    context_weight: float = CONTEXT_WEIGHT,
) -> list[Hit]:
    """The best `k` chunks in Postgres for `query` by `mode`, through the match RPCs a Supabase
    client calls: dense (Titan vectors, HNSW), lexical (BM25 over the tsvector column) or hybrid
    (both fused in SQL, the same fusion as the LanceDB side)."""
    _check_mode(mode)
    if mode == "lexical":
        rows = _pg_rows(
            conn,
            f"SELECT {_PG_COLUMNS}, score FROM match_conversation_chunks_lexical(%s, %s, %s, %s)",
            [query, k, user, tier],
        )
        return [_hit(r, r["score"], "lexical", lexical=r["score"]) for r in rows]
    vector = titan_model.embed_query(query)
    if mode == "dense":
        return postgres_match(conn, vector, k, user, tier)
    _check_weights(lexical_weight, context_weight)
    rows = _pg_rows(
        conn,
        f"SELECT {_PG_COLUMNS}, score, embedding_model, dense_similarity, lexical_score "
        "FROM match_conversation_chunks_hybrid_by_tier(%s::vector, %s, %s, %s, %s, %s, %s, %s)",
        [
            np.asarray(vector, dtype=np.float32),
            query,
            tier,
            k,
            user,
            lexical_weight,
            HYBRID_CANDIDATES,
            context_weight,
        ],
    )
    return [
        _hit(
            r,
            r["score"],
            "hybrid",
            model=r["embedding_model"],
            dense=r["dense_similarity"],
            lexical=r["lexical_score"],
        )
        for r in rows
    ]


def postgres_match(
    conn: Any,
    query_vector: np.ndarray,
    k: int = 10,
    user: str | None = None,
    tier: str | None = None,
    threshold: float = -1.0,
) -> list[Hit]:
    """`match_conversation_chunks_by_tier` over the Titan vectors (HNSW): the `k` nearest chunks
    with cosine similarity >= `threshold` (default -1: no threshold), optionally one user's and
    one tier's. Exactly `k` rows come back whenever `k` rows qualify."""
    rows = _pg_rows(
        conn,
        f"SELECT {_PG_COLUMNS}, similarity, embedding_model FROM "
        "match_conversation_chunks_by_tier(%s::vector, %s, %s, %s, %s)",
        [np.asarray(query_vector, dtype=np.float32), tier, threshold, k, user],
    )
    return [
        _hit(r, r["similarity"], "titan", dense=r["similarity"], model=r["embedding_model"])
        for r in rows
    ]


def _pg_rows(conn: Any, query: str, params: list[Any]) -> list[dict[str, Any]]:
    """The rows of a match RPC by column name, as LanceDB's come (so `_hit` reads both)."""
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(query, params).fetchall()


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
