-- patch_norm_sample: a deterministic pseudo-random sample of patch-token norms per run.
-- Each patch token is kept when hash(image_id, token) % n_patch_tokens < $2, so a run yields
-- about $2 rows whatever its size (all rows when $2 >= its patch count); same lake, same rows.
-- Columns: run VARCHAR, image_id BIGINT, token INTEGER, norm FLOAT.
-- Parameters: $1 runs VARCHAR[], $2 n BIGINT (target rows per run). Ordered by run, image_id, token.
WITH n AS (
    SELECT run, count(*) AS n FROM tokens
    WHERE kind = 'patch' AND list_contains($1, run) GROUP BY run
)
SELECT t.run, t.image_id, t.token, t.norm
FROM tokens AS t JOIN n ON n.run = t.run
WHERE t.kind = 'patch' AND list_contains($1, t.run)
  AND hash(t.image_id, t.token) % n.n::UBIGINT < $2::UBIGINT
ORDER BY t.run, t.image_id, t.token
