-- neighbour_stats: claim 3, do outlier patches sit in low-information (redundant) areas?
-- A patch is an outlier when its norm > its run's threshold (q-quantile of threshold_run's patch
-- norms); it is "low-information" when its nbr_cos (mean cosine with its 4-neighbours after the
-- patch embedding) is above the p-quantile of nbr_cos over ALL patches of the run.
-- Columns: run VARCHAR, threshold DOUBLE, low_info_cutoff DOUBLE,
--          n_outlier, n_normal BIGINT, n_outlier_low, n_normal_low BIGINT,
--          p_low_outlier = n_outlier_low / n_outlier, p_low_normal = n_normal_low / n_normal,
--          ratio = p_low_outlier / p_low_normal (NULL when undefined),
--          median_cos_outlier, median_cos_normal, mean_cos_outlier, mean_cos_normal DOUBLE.
-- Patches with NULL nbr_cos are left out.
-- Parameters: $1 runs VARCHAR[], $2 q DOUBLE (outliers), $3 p DOUBLE (low-information quantile,
--             0.9). Ordered by run.
WITH th AS (  -- threshold_norms, filtered by run: only the chosen runs are read
    SELECT run, quantile_cont(norm::DOUBLE, $2) AS threshold
    FROM threshold_norms WHERE list_contains($1, run) GROUP BY run
), p AS (
    SELECT t.run, t.nbr_cos::DOUBLE AS c, t.norm > th.threshold AS is_out
    FROM tokens AS t JOIN th ON th.run = t.run
    WHERE t.kind = 'patch' AND t.nbr_cos IS NOT NULL AND list_contains($1, t.run)
), cut AS (
    SELECT run, quantile_cont(c, $3) AS cutoff FROM p GROUP BY run
), s AS (
    SELECT p.run, any_value(cut.cutoff) AS cutoff,
           count(*) FILTER (WHERE is_out) AS n_outlier,
           count(*) FILTER (WHERE NOT is_out) AS n_normal,
           count(*) FILTER (WHERE is_out AND c > cut.cutoff) AS n_outlier_low,
           count(*) FILTER (WHERE NOT is_out AND c > cut.cutoff) AS n_normal_low,
           median(c) FILTER (WHERE is_out) AS median_cos_outlier,
           median(c) FILTER (WHERE NOT is_out) AS median_cos_normal,
           avg(c) FILTER (WHERE is_out) AS mean_cos_outlier,
           avg(c) FILTER (WHERE NOT is_out) AS mean_cos_normal
    FROM p JOIN cut ON cut.run = p.run
    GROUP BY p.run
)
SELECT th.run, th.threshold, s.cutoff AS low_info_cutoff,
       s.n_outlier, s.n_normal, s.n_outlier_low, s.n_normal_low,
       s.n_outlier_low / nullif(s.n_outlier, 0) AS p_low_outlier,
       s.n_normal_low / nullif(s.n_normal, 0) AS p_low_normal,
       (s.n_outlier_low / nullif(s.n_outlier, 0))
           / nullif(s.n_normal_low / nullif(s.n_normal, 0), 0) AS ratio,
       s.median_cos_outlier, s.median_cos_normal, s.mean_cos_outlier, s.mean_cos_normal
FROM th JOIN s ON s.run = th.run
ORDER BY th.run
