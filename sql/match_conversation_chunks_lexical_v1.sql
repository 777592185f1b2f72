-- Frozen: revision 0009 installs this file as it stands. A change to these functions is a new
-- file and a new revision, never an edit here.
--
-- Lexical and hybrid search over conversation_chunks.
--
-- Lexical: BM25 (k1 = 1.2, b = 0.75, as LanceDB's full-text index scores) over the generated
-- `content_tsv` (to_tsvector('english', content): Snowball stemming, English stop words), matched
-- through its GIN index. Statistics are per user: chunk_lexicon holds how many of a user's
-- chunks hold each lexeme and chunk_lexicon_stats their count and mean length, so a user's
-- search is scored against that user's own history and no client learns from the statistics
-- which words other users wrote (row-level security on Supabase: a user reads their own rows).
-- refresh_chunk_lexicon() rebuilds the statistics of users whose chunks changed (the graph calls
-- it after chunks are written); until then new chunks are found and scored with the last
-- statistics. Query terms are ORed: a question rarely shares every word with its answer.
--
-- Hybrid: the `candidates` best chunks by each ranking (at least match_count), each list's scores
-- standardised (z-scores), fused as (1 - lexical_weight) * dense + lexical_weight * lexical; a
-- chunk one list did not return takes that list's lowest z-score. The dense list comes from
-- match_conversation_chunks_by_tier (HNSW, iterative scan: the full count under a user filter).
-- SECURITY INVOKER everywhere: row-level security of the caller applies.

CREATE OR REPLACE FUNCTION refresh_chunk_lexicon()
RETURNS TABLE (users_refreshed bigint, users bigint, chunks bigint)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
BEGIN
    -- One refresh at a time; searches keep reading the committed statistics meanwhile.
    LOCK TABLE chunk_lexicon_stats IN SHARE ROW EXCLUSIVE MODE;
    DROP TABLE IF EXISTS pg_temp.lexicon_now, pg_temp.lexicon_changed;
    CREATE TEMP TABLE lexicon_now ON COMMIT DROP AS
        SELECT c.user_id, count(*)::bigint AS chunks,
               coalesce(avg(c.content_tokens), 0)::double precision AS avg_tokens,
               sum(hashtextextended(c.chunk_id, 0))::numeric AS fingerprint
        FROM conversation_chunks c GROUP BY c.user_id;
    CREATE TEMP TABLE lexicon_changed ON COMMIT DROP AS
        SELECT coalesce(n.user_id, s.user_id) AS user_id
        FROM lexicon_now n FULL OUTER JOIN chunk_lexicon_stats s ON s.user_id = n.user_id
        WHERE n.user_id IS NULL OR s.user_id IS NULL
           OR s.chunks <> n.chunks OR s.fingerprint <> n.fingerprint;
    DELETE FROM chunk_lexicon l USING lexicon_changed x WHERE l.user_id = x.user_id;
    DELETE FROM chunk_lexicon_stats s USING lexicon_changed x WHERE s.user_id = x.user_id;
    INSERT INTO chunk_lexicon (user_id, lexeme, chunks)
        SELECT c.user_id, d.lexeme, count(*)
        FROM conversation_chunks c
        JOIN lexicon_changed x ON x.user_id = c.user_id
        CROSS JOIN LATERAL unnest(c.content_tsv) d
        GROUP BY c.user_id, d.lexeme;
    INSERT INTO chunk_lexicon_stats (user_id, chunks, avg_tokens, fingerprint, refreshed_at)
        SELECT n.user_id, n.chunks, n.avg_tokens, n.fingerprint, now()
        FROM lexicon_now n JOIN lexicon_changed x ON x.user_id = n.user_id;
    RETURN QUERY SELECT (SELECT count(*) FROM lexicon_changed),
                        (SELECT count(*) FROM lexicon_now),
                        (SELECT coalesce(sum(n.chunks), 0)::bigint FROM lexicon_now n);
END;
$$;

CREATE OR REPLACE FUNCTION match_conversation_chunks_lexical(
    query_text text,
    match_count integer DEFAULT 10,
    filter_user_id text DEFAULT NULL,
    match_tier text DEFAULT NULL
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
    score double precision
)
LANGUAGE sql STABLE SECURITY INVOKER
AS $$
    WITH stats AS (
        SELECT greatest(coalesce(sum(s.chunks), 0), 1)::double precision AS n,
               greatest(coalesce(sum(s.chunks * s.avg_tokens) / nullif(sum(s.chunks), 0), 1), 1)
                   AS avg_tokens
        FROM chunk_lexicon_stats s
        WHERE filter_user_id IS NULL OR s.user_id = filter_user_id
    ),
    terms AS (
        SELECT t.lexeme, ln(1 + (stats.n - f.df + 0.5) / (f.df + 0.5)) AS idf
        FROM unnest(to_tsvector('english', query_text)) t
        CROSS JOIN stats
        CROSS JOIN LATERAL (
            SELECT least(coalesce(sum(l.chunks), 0), stats.n) AS df
            FROM chunk_lexicon l
            WHERE l.lexeme = t.lexeme AND (filter_user_id IS NULL OR l.user_id = filter_user_id)
        ) f
    ),
    wanted AS (
        SELECT string_agg(quote_literal(terms.lexeme), ' | ')::tsquery AS q FROM terms
    ),
    matched AS MATERIALIZED (
        SELECT c.chunk_id, c.conversation_id, c.user_id, c.tier, c.turn_start, c.turn_end,
               c.roles, c.content, c.created_at, c.content_tsv, c.content_tokens
        FROM conversation_chunks c, wanted
        WHERE wanted.q IS NOT NULL
          AND c.content_tsv @@ wanted.q
          AND (filter_user_id IS NULL OR c.user_id = filter_user_id)
          AND (match_tier IS NULL OR c.tier = match_tier)
    )
    SELECT m.chunk_id, m.conversation_id, m.user_id, m.tier, m.turn_start, m.turn_end, m.roles,
           m.content, m.created_at,
           (SELECT sum(terms.idf * tf.n * 2.2
                       / (tf.n + 1.2 * (0.25 + 0.75 * m.content_tokens / stats.avg_tokens)))
            FROM unnest(m.content_tsv) d
            JOIN terms ON terms.lexeme = d.lexeme
            CROSS JOIN LATERAL (
                SELECT coalesce(array_length(d.positions, 1), 1)::double precision AS n
            ) tf
           ) AS score
    FROM matched m, stats
    ORDER BY score DESC, m.chunk_id
    LIMIT match_count;
$$;

CREATE OR REPLACE FUNCTION match_conversation_chunks_hybrid_by_tier(
    query_embedding vector,
    query_text text,
    match_tier text DEFAULT NULL,
    match_count integer DEFAULT 10,
    filter_user_id text DEFAULT NULL,
    lexical_weight double precision DEFAULT {lexical_weight},
    candidates integer DEFAULT {candidates}
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
    fused AS (
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
               (1 - lexical_weight) * coalesce(d.z, lowest.dense_z)
               + lexical_weight * coalesce(l.z, lowest.lexical_z) AS score
        FROM dense d
        FULL OUTER JOIN lexical l ON l.chunk_id = d.chunk_id
        CROSS JOIN lowest
    )
    SELECT f.chunk_id, f.conversation_id, f.user_id, f.tier, f.turn_start, f.turn_end, f.roles,
           f.content, f.created_at, f.embedding_model, f.dense_similarity, f.lexical_score,
           f.score
    FROM fused f
    ORDER BY f.score DESC, f.chunk_id
    LIMIT match_count;
$$;

CREATE OR REPLACE FUNCTION match_conversation_chunks_hybrid(
    query_embedding vector,
    query_text text,
    match_count integer DEFAULT 10,
    filter_user_id text DEFAULT NULL,
    lexical_weight double precision DEFAULT {lexical_weight}
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
        query_embedding, query_text, NULL, match_count, filter_user_id, lexical_weight
    );
$$;
