-- attn_norm_overlap: claim 1, do high-attention patches coincide with high-norm patches?
-- Per image: N = patch tokens with norm > the run's outlier threshold (q-quantile of its
-- threshold_run's patch norms); A = patch tokens with attn > the p-quantile of the run's own
-- patch attn (NULL attn never in A).
-- Columns: run VARCHAR, image_id BIGINT, source_id VARCHAR, n_patches BIGINT, n_norm BIGINT (|N|),
--          n_attn BIGINT (|A|), n_both BIGINT (|A ∩ N|), n_either BIGINT (|A ∪ N|),
--          precision DOUBLE (|A∩N|/|A|), recall DOUBLE (|A∩N|/|N|), jaccard DOUBLE (|A∩N|/|A∪N|);
--          each NULL when its denominator is 0. norm_threshold, attn_threshold DOUBLE.
-- Parameters: $1 runs VARCHAR[], $2 q DOUBLE (norm, 0.98), $3 p DOUBLE (attention, 0.98).
-- Ordered by run, image_id.
WITH th AS (  -- threshold_norms, filtered by run: only the chosen runs are read
    SELECT run, quantile_cont(norm::DOUBLE, $2) AS threshold
    FROM threshold_norms WHERE list_contains($1, run) GROUP BY run
), ath AS (
    SELECT run, quantile_cont(attn::DOUBLE, $3) AS attn_threshold
    FROM tokens WHERE kind = 'patch' AND attn IS NOT NULL AND list_contains($1, run)
    GROUP BY run
), f AS (
    SELECT t.run, t.image_id,
           t.norm > th.threshold AS in_n,
           coalesce(t.attn > ath.attn_threshold, false) AS in_a
    FROM tokens AS t JOIN th ON th.run = t.run LEFT JOIN ath ON ath.run = t.run
    WHERE t.kind = 'patch' AND list_contains($1, t.run)
), g AS (
    SELECT run, image_id, count(*) AS n_patches,
           count(*) FILTER (WHERE in_n) AS n_norm,
           count(*) FILTER (WHERE in_a) AS n_attn,
           count(*) FILTER (WHERE in_n AND in_a) AS n_both,
           count(*) FILTER (WHERE in_n OR in_a) AS n_either
    FROM f GROUP BY run, image_id
)
SELECT g.run, g.image_id, i.source_id, g.n_patches, g.n_norm, g.n_attn, g.n_both, g.n_either,
       g.n_both / nullif(g.n_attn, 0) AS precision,
       g.n_both / nullif(g.n_norm, 0) AS recall,
       g.n_both / nullif(g.n_either, 0) AS jaccard,
       th.threshold AS norm_threshold, ath.attn_threshold
FROM g
JOIN th ON th.run = g.run
LEFT JOIN ath ON ath.run = g.run
JOIN images AS i ON i.run = g.run AND i.image_id = g.image_id AND list_contains($1, i.run)
ORDER BY g.run, g.image_id
