-- Frozen: revisions 0001, 0004 and 0006 install this file as it stands. A change to these
-- functions is a new file and a new revision, never an edit here.
--
-- Nearest chunks to a query embedding by cosine similarity, optionally for one user and tier.
--
-- An HNSW scan yields at most hnsw.ef_search rows, and the user/tier/threshold filters discard
-- some of them; so ef_search is raised to at least match_count (and a floor that sets recall:
-- {ef_search_floor}, filled in by the migration that installs this file) and pgvector 0.8's iterative scan
-- keeps walking the graph until match_count rows qualify. relaxed_order returns rows slightly out
-- of order, hence the final ORDER BY. SECURITY INVOKER: row-level security of the caller applies.
-- The query arrives as `vector` (what clients send) and is cast once to the column's type,
-- {embedding_type}, so the operator matches the HNSW index's opclass.
CREATE OR REPLACE FUNCTION match_conversation_chunks_by_tier(
    query_embedding vector,
    match_tier text DEFAULT NULL,
    match_threshold double precision DEFAULT 0.0,
    match_count integer DEFAULT 10,
    filter_user_id text DEFAULT NULL
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
    similarity double precision
)
LANGUAGE plpgsql STABLE SECURITY INVOKER
AS $$
#variable_conflict use_column
DECLARE
    query {embedding_type} := query_embedding::{embedding_type};
BEGIN
    PERFORM set_config('hnsw.ef_search', greatest(match_count, {ef_search_floor})::text, true);
    PERFORM set_config('hnsw.iterative_scan', 'relaxed_order', true);
    RETURN QUERY
    WITH nearest AS MATERIALIZED (
        SELECT c.chunk_id, c.conversation_id, c.user_id, c.tier, c.turn_start, c.turn_end,
               c.roles, c.content, c.created_at, c.embedding_model,
               c.embedding <=> query AS distance
        FROM conversation_chunks c
        WHERE c.embedding IS NOT NULL
          AND (filter_user_id IS NULL OR c.user_id = filter_user_id)
          AND (match_tier IS NULL OR c.tier = match_tier)
          AND c.embedding <=> query <= 1 - match_threshold
        ORDER BY c.embedding <=> query
        LIMIT match_count
    )
    SELECT n.chunk_id, n.conversation_id, n.user_id, n.tier, n.turn_start, n.turn_end, n.roles,
           n.content, n.created_at, n.embedding_model, 1 - n.distance
    FROM nearest n
    ORDER BY n.distance;
END;
$$;

CREATE OR REPLACE FUNCTION match_conversation_chunks(
    query_embedding vector,
    match_threshold double precision DEFAULT 0.0,
    match_count integer DEFAULT 10,
    filter_user_id text DEFAULT NULL
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
    similarity double precision
)
LANGUAGE sql STABLE SECURITY INVOKER
AS $$
    SELECT * FROM match_conversation_chunks_by_tier(
        query_embedding, NULL, match_threshold, match_count, filter_user_id
    );
$$;
