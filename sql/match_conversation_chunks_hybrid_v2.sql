-- Frozen: revision 0010 installs this file as it stands (filling in {lexical_weight},
-- {candidates} and {context_weight}). A change to these functions is a new file and a new
-- revision, never an edit here.
--
-- Hybrid search with conversational context. As in v1 (match_conversation_chunks_lexical_v1.sql):
-- the `candidates` best chunks by each ranking (at least match_count), each list's scores
-- standardised (z-scores), fused as (1 - lexical_weight) * dense + lexical_weight * lexical, a
-- chunk one list did not return taking that list's lowest z-score. New: each chunk then gains
-- context_weight times the best fused score among its neighbours, the candidates of the same
-- conversation and tier whose turns touch or overlap its own (the exchanges either side, or
-- another window of the same exchange); where no neighbour is a candidate, the fused score of a
-- chunk both lists missed. A question's words are often spread over neighbouring exchanges (the
-- topic in one, the answer in the next). The same fusion as retrieval_assets.lib.search.fuse.
-- A NULL weight means its default (a client of the RPC may send one).
-- The dense list comes from match_conversation_chunks_by_tier (HNSW, iterative scan: the full
-- count under a user filter). SECURITY INVOKER: row-level security of the caller applies.

DROP FUNCTION IF EXISTS match_conversation_chunks_hybrid(
    vector, text, integer, text, double precision
);
DROP FUNCTION IF EXISTS match_conversation_chunks_hybrid_by_tier(
    vector, text, text, integer, text, double precision, integer
);

CREATE FUNCTION match_conversation_chunks_hybrid_by_tier(
    query_embedding vector,
    query_text text,
    match_tier text DEFAULT NULL,
    match_count integer DEFAULT 10,
    filter_user_id text DEFAULT NULL,
    lexical_weight double precision DEFAULT {lexical_weight},
    candidates integer DEFAULT {candidates},
    context_weight double precision DEFAULT {context_weight}
)
RETURNS TABLE (
    chunk_id text,
    conversation_id text,
    user_id text,
    tier text,
    turn_start integer,
    turn_end integer,
    roles text[],
    content text,
    created_at timestamptz,
    embedding_model text,
    dense_similarity double precision,
    lexical_score double precision,
    score double precision
)
LANGUAGE sql STABLE SECURITY INVOKER
AS $$
    WITH dense AS MATERIALIZED (
        SELECT d.*,
               (d.similarity - avg(d.similarity) OVER ())
               / coalesce(nullif(stddev_pop(d.similarity) OVER (), 0), 1) AS z
        FROM match_conversation_chunks_by_tier(
            query_embedding, match_tier, -1.0, greatest(match_count, candidates), filter_user_id
        ) d
    ),
    lexical AS MATERIALIZED (
        SELECT l.*,
               (l.score - avg(l.score) OVER ())
               / coalesce(nullif(stddev_pop(l.score) OVER (), 0), 1) AS z
        FROM match_conversation_chunks_lexical(
            query_text, greatest(match_count, candidates), filter_user_id, match_tier
        ) l
    ),
    lowest AS (
        SELECT (SELECT coalesce(min(z), 0) FROM dense) AS dense_z,
               (SELECT coalesce(min(z), 0) FROM lexical) AS lexical_z
    ),
    fused AS MATERIALIZED (
        SELECT coalesce(d.chunk_id, l.chunk_id) AS chunk_id,
               coalesce(d.conversation_id, l.conversation_id) AS conversation_id,
               coalesce(d.user_id, l.user_id) AS user_id,
               coalesce(d.tier, l.tier) AS tier,
               coalesce(d.turn_start, l.turn_start) AS turn_start,
               coalesce(d.turn_end, l.turn_end) AS turn_end,
               coalesce(d.roles, l.roles) AS roles,
               coalesce(d.content, l.content) AS content,
               coalesce(d.created_at, l.created_at) AS created_at,
               d.embedding_model,
               d.similarity AS dense_similarity,
               l.score AS lexical_score,
               (1 - w.lexical) * coalesce(d.z, lowest.dense_z)
               + w.lexical * coalesce(l.z, lowest.lexical_z) AS score,
               (1 - w.lexical) * lowest.dense_z + w.lexical * lowest.lexical_z AS missed,
               w.context
        FROM dense d
        FULL OUTER JOIN lexical l ON l.chunk_id = d.chunk_id
        CROSS JOIN lowest
        CROSS JOIN (
            SELECT coalesce(lexical_weight, {lexical_weight}) AS lexical,
                   coalesce(context_weight, {context_weight}) AS context
        ) w
    )
    SELECT f.chunk_id, f.conversation_id, f.user_id, f.tier, f.turn_start, f.turn_end, f.roles,
           f.content, f.created_at, f.embedding_model, f.dense_similarity, f.lexical_score,
           f.score + f.context * coalesce(n.best, f.missed) AS score
    FROM fused f
    LEFT JOIN LATERAL (
        SELECT max(g.score) AS best
        FROM fused g
        WHERE g.conversation_id = f.conversation_id
          AND g.tier = f.tier
          AND g.chunk_id <> f.chunk_id
          AND g.turn_start <= f.turn_end + 1
          AND g.turn_end >= f.turn_start - 1
    ) n ON true
    ORDER BY 13 DESC, f.chunk_id
    LIMIT match_count;
$$;

CREATE FUNCTION match_conversation_chunks_hybrid(
    query_embedding vector,
    query_text text,
    match_count integer DEFAULT 10,
    filter_user_id text DEFAULT NULL,
    lexical_weight double precision DEFAULT {lexical_weight},
    context_weight double precision DEFAULT {context_weight}
)
RETURNS TABLE (
    chunk_id text,
    conversation_id text,
    user_id text,
    tier text,
    turn_start integer,
    turn_end integer,
    roles text[],
    content text,
    created_at timestamptz,
    embedding_model text,
    dense_similarity double precision,
    lexical_score double precision,
    score double precision
)
LANGUAGE sql STABLE SECURITY INVOKER
AS $$
    SELECT * FROM match_conversation_chunks_hybrid_by_tier(
        query_embedding, query_text, NULL, match_count, filter_user_id, lexical_weight,
        context_weight => context_weight
    );
$$;
