-- attn_topk_agreement: claim 1, per image, are the image's k most-attended patches its k norm
-- outliers? N = patch tokens with norm > the run's outlier threshold (the q-quantile of its
-- threshold_run's patch norms: the `outliers` view at q = 0.98); k = |N| for that image;
-- A_k = the k patch tokens with the highest attn (ties: lower token first; a NULL attn is never
-- in A_k). Unlike a fixed top-2 % of attention, k follows the image's own outlier count, so an
-- image with 1 outlier is asked for its 1 most-attended patch.
-- Columns: run VARCHAR, image_id BIGINT, n_patches BIGINT, n_attn BIGINT (patches with non-NULL
--          attn), k BIGINT (|N|), n_hit BIGINT (|A_k ∩ N|), agreement DOUBLE (n_hit / k),
--          norm_threshold DOUBLE.
-- Only images with k >= 1 (a run's agreement is sum(n_hit) / sum(k) over them).
-- Parameters: $1 runs VARCHAR[], $2 q DOUBLE (0.98 = top 2 %).
-- Ordered by run, image_id.
WITH th AS (  -- threshold_norms, filtered by run: only the chosen runs are read
    SELECT run, quantile_cont(norm::DOUBLE, $2) AS threshold
    FROM threshold_norms WHERE list_contains($1, run) GROUP BY run
), p AS (
    SELECT t.run, t.image_id, t.token, t.attn, t.norm > th.threshold AS in_n, th.threshold
    FROM tokens AS t JOIN th ON th.run = t.run
    WHERE t.kind = 'patch' AND list_contains($1, t.run)
), ranked AS (
    SELECT run, image_id, attn, in_n, threshold,
           count(*) FILTER (WHERE in_n) OVER img AS k,
           row_number() OVER (img ORDER BY attn DESC NULLS LAST, token) AS attn_rank
    FROM p
    WINDOW img AS (PARTITION BY run, image_id)
)
SELECT run, image_id, count(*) AS n_patches, count(attn) AS n_attn, any_value(k) AS k,
       count(*) FILTER (WHERE in_n AND attn IS NOT NULL AND attn_rank <= k) AS n_hit,
       count(*) FILTER (WHERE in_n AND attn IS NOT NULL AND attn_rank <= k) / any_value(k)
           AS agreement,
       any_value(threshold) AS norm_threshold
FROM ranked
GROUP BY run, image_id
HAVING any_value(k) > 0
ORDER BY run, image_id
