-- cards: the outlier card of every complete run: does the model have artifacts, where, how bad.
-- One row per complete run (every row of `runs`; NULLs where a run lacks what a field needs).
-- Outliers: patch tokens whose norm > threshold (the `outliers` view's rule, in one scan here).
-- Columns:
--   run, model, subset VARCHAR, img_size INTEGER, weights VARCHAR, random_weights BOOLEAN,
--       threshold_run VARCHAR: as in `runs` (analyze/_cards.py adds family and params).
--   threshold DOUBLE: 98th percentile (linear interpolation) of threshold_run's patch norms.
--   n_patch_tokens, n_outliers, n_images (images with patch tokens), n_images_with_outliers BIGINT.
--   image_share DOUBLE: n_images_with_outliers / n_images (share of images with >= 1 outlier).
--   outliers_per_affected_image DOUBLE: n_outliers / n_images_with_outliers.
--   median_norm, max_norm, max_median_ratio DOUBLE: of the patch norms; max / median.
--   bc_log, separated_share DOUBLE: as sql/queries/norm_summary.sql at q = 0.98, over the patch
--       tokens with norm > 0: Sarle's bimodality coefficient (g^2 + 1) / (k + 3 (n-1)^2 /
--       ((n-2)(n-3))) of ln(norm) (g, k bias-corrected skewness and excess kurtosis); share of
--       patch tokens with ln(norm) > median + 6 * 1.4826 * MAD of ln(norm).
--   n_blocks INTEGER, emergence_block SMALLINT: from the `emergence` view (the first block whose
--       median output norm at the run's final outlier patches exceeds the threshold); NULL
--       without a blocks table. emergence_depth DOUBLE: (emergence_block + 1) / n_blocks, the
--       share of the network's blocks run through when the outliers emerge (1 = the last block).
--   attn_hits BIGINT, attn_agreement DOUBLE: claim 1's pooled top-k agreement, as
--       sql/queries/attn_topk_agreement.sql: per image, k = its outliers, A_k = its k
--       most-attended patches (ties: lower token first; NULL attn never in A_k); attn_hits =
--       sum over images of |A_k ∩ outliers|; attn_agreement = attn_hits / n_outliers
--       (= Σ hits / Σ k over images with k >= 1). NULL without outliers.
--   low_info_cutoff DOUBLE: 90th percentile of nbr_cos over the run's patches (non-NULL nbr_cos).
--   low_info_share DOUBLE: claim 3's P(low-info | outlier), as sql/queries/neighbour_stats.sql
--       at p = 0.9: share of the outliers (with nbr_cos) whose nbr_cos > low_info_cutoff.
--   low_info_ratio DOUBLE: P(low-info | outlier) / P(low-info | normal patch).
--   neuron_run VARCHAR: the run whose register-neuron ranking (`neurons` view) the card shows:
--       the run's own, else that of the first run (by name) of the same model and weights
--       (rankings come from --record-mlp runs); NULL when there is none.
--   neuron_method VARCHAR, neuron_detect_block, neuron_highest_block SMALLINT: the ranking's.
--   top_neurons VARCHAR: its 3 best-ranked neurons, best first, as 'b<block>:n<neuron>, ...'.
-- Parameters: none. Ordered by run. Evaluated only when queried; `WHERE run = '...'` reaches
-- every scan of tokens and blocks, so other runs are not read (nor is a damaged one reached).
CREATE OR REPLACE VIEW cards AS
WITH pt AS NOT MATERIALIZED (  -- one reference to `tokens`: binding it is the view's cost
    SELECT run, image_id, token, norm, attn, nbr_cos FROM tokens WHERE kind = 'patch'
), th AS NOT MATERIALIZED (  -- threshold_norms: a filter on `run` reaches its scan too
    SELECT run, quantile_cont(norm::DOUBLE, 0.98) AS threshold FROM threshold_norms GROUP BY run
), p AS NOT MATERIALIZED (  -- inlined where used, so `WHERE run = ...` reaches every scan (a
    -- CTE DuckDB materialises is computed for every run first; inlined it costs no more: 1.18 s
    -- instead of 1.12 s for every card of 4 runs of 0.5M tokens, 0.30 s instead of 0.34 s for one)
    SELECT t.run, t.image_id, t.token, t.norm::DOUBLE AS norm, t.attn, t.nbr_cos::DOUBLE AS c,
           t.norm > th.threshold AS is_out
    FROM pt AS t JOIN th ON th.run = t.run
), robust AS (
    SELECT run, median(ln(norm)) + 6 * 1.4826 * mad(ln(norm)) AS sep_cutoff
    FROM p WHERE norm > 0 GROUP BY run
), s AS (
    SELECT p.run,
           count(*) AS n_patch_tokens,
           count(*) FILTER (WHERE is_out) AS n_outliers,
           count(DISTINCT image_id) AS n_images,
           count(DISTINCT image_id) FILTER (WHERE is_out) AS n_images_with_outliers,
           median(norm) AS median_norm,
           max(norm) AS max_norm,
           count(*) FILTER (WHERE norm > 0) AS n_pos,
           skewness(ln(norm)) FILTER (WHERE norm > 0) AS skew_log,
           kurtosis(ln(norm)) FILTER (WHERE norm > 0) AS exkurt_log,
           avg((ln(norm) > robust.sep_cutoff)::INTEGER) FILTER (WHERE norm > 0) AS separated_share
    FROM p LEFT JOIN robust ON robust.run = p.run
    GROUP BY p.run, robust.sep_cutoff
), ranked AS (
    SELECT run, image_id, is_out, attn,
           count(*) FILTER (WHERE is_out) OVER img AS k,
           row_number() OVER (img ORDER BY attn DESC NULLS LAST, token) AS attn_rank
    FROM p
    WINDOW img AS (PARTITION BY run, image_id)
), agree AS (
    SELECT run, count(*) FILTER (WHERE is_out AND attn IS NOT NULL AND attn_rank <= k) AS attn_hits
    FROM ranked GROUP BY run
), cut AS (
    SELECT run, quantile_cont(c, 0.9) AS cutoff FROM p WHERE c IS NOT NULL GROUP BY run
), nb AS (
    SELECT p.run, any_value(cut.cutoff) AS cutoff,
           count(*) FILTER (WHERE is_out AND c > cut.cutoff) / nullif(count(*) FILTER (WHERE is_out), 0)
               AS p_low_outlier,
           count(*) FILTER (WHERE NOT is_out AND c > cut.cutoff)
               / nullif(count(*) FILTER (WHERE NOT is_out), 0) AS p_low_normal
    FROM p JOIN cut ON cut.run = p.run
    WHERE p.c IS NOT NULL
    GROUP BY p.run
), em AS (
    SELECT run, any_value(n_blocks) AS n_blocks, any_value(emergence_block) AS emergence_block
    FROM emergence GROUP BY run
), ranking AS (
    SELECT run, any_value(method) AS method, any_value(detect_block) AS detect_block,
           any_value(highest_block) AS highest_block,
           string_agg('b' || block || ':n' || neuron, ', ' ORDER BY rank)
               FILTER (WHERE rank <= 3) AS top_neurons
    FROM neurons GROUP BY run
), nmatch AS (
    SELECT r.run, k.run AS neuron_run, k.method, k.detect_block, k.highest_block, k.top_neurons,
           row_number() OVER (PARTITION BY r.run ORDER BY k.run <> r.run, k.run) AS pick
    FROM runs AS r
    JOIN runs AS o ON o.model = r.model AND o.weights IS NOT DISTINCT FROM r.weights
        AND o.random_weights IS NOT DISTINCT FROM r.random_weights
    JOIN ranking AS k ON k.run = o.run
)
SELECT r.run, r.model, r.subset, r.img_size, r.weights, r.random_weights, r.threshold_run,
       th.threshold,
       s.n_patch_tokens, s.n_outliers, s.n_images, s.n_images_with_outliers,
       s.n_images_with_outliers / s.n_images AS image_share,
       s.n_outliers / nullif(s.n_images_with_outliers, 0) AS outliers_per_affected_image,
       s.median_norm, s.max_norm, s.max_norm / nullif(s.median_norm, 0) AS max_median_ratio,
       (s.skew_log ^ 2 + 1)
           / (s.exkurt_log + 3 * (s.n_pos - 1) ^ 2 / ((s.n_pos - 2) * (s.n_pos - 3))) AS bc_log,
       s.separated_share,
       em.n_blocks, em.emergence_block,
       (em.emergence_block + 1) / em.n_blocks AS emergence_depth,
       agree.attn_hits,
       agree.attn_hits / nullif(s.n_outliers, 0) AS attn_agreement,
       nb.cutoff AS low_info_cutoff,
       nb.p_low_outlier AS low_info_share,
       nb.p_low_outlier / nullif(nb.p_low_normal, 0) AS low_info_ratio,
       nm.neuron_run, nm.method AS neuron_method, nm.detect_block AS neuron_detect_block,
       nm.highest_block AS neuron_highest_block, nm.top_neurons
FROM runs AS r
LEFT JOIN th ON th.run = r.run
LEFT JOIN s ON s.run = r.run
LEFT JOIN agree ON agree.run = r.run
LEFT JOIN nb ON nb.run = r.run
LEFT JOIN em ON em.run = r.run
LEFT JOIN nmatch AS nm ON nm.run = r.run AND nm.pick = 1
ORDER BY r.run
