-- norm_summary: per-run outlier statistics and shape of the patch-token norm distribution.
-- Columns: run VARCHAR, threshold_run VARCHAR, threshold DOUBLE (q-quantile of threshold_run's
--          patch norms, linear interpolation),
--          n_patch_tokens BIGINT, n_outliers BIGINT (patch tokens with norm > threshold),
--          outlier_share DOUBLE (n_outliers / n_patch_tokens),
--          n_images BIGINT, n_images_with_outliers BIGINT, image_share DOUBLE,
--          outliers_per_image DOUBLE (n_outliers / n_images: mean over all images),
--          outliers_per_affected_image DOUBLE (n_outliers / n_images_with_outliers),
--          median_norm DOUBLE, max_norm DOUBLE, max_median_ratio DOUBLE,
--          skew_log, exkurt_log, bc_log DOUBLE: sample skewness g, sample excess kurtosis k
--              (bias-corrected, = scipy.stats.skew/kurtosis(bias=False)) and Sarle's bimodality
--              coefficient (g^2 + 1) / (k + 3 (n-1)^2 / ((n-2)(n-3))) of ln(norm);
--          skew, exkurt, bc DOUBLE: the same on the raw norms.
--          BC > 5/9 (uniform distribution) suggests bimodality.
--          separated_share DOUBLE: share of patch tokens whose ln(norm) lies more than 6 robust
--              standard deviations (1.4826 * MAD of ln(norm)) above the median ln(norm): a
--              high-norm group apart from the bulk, which a 2 % group only 6-10 sigma away leaves
--              under BC's 5/9 (a Gaussian bulk puts ~1e-9 there, heavy unimodal tails < 1 %).
-- All statistics are over patch tokens only (cls/reg excluded).
-- Parameters: $1 runs VARCHAR[], $2 q DOUBLE. Ordered by run.
WITH th AS (  -- threshold_norms, filtered by run: only the chosen runs are read
    SELECT run, any_value(threshold_run) AS threshold_run,
           quantile_cont(norm::DOUBLE, $2) AS threshold
    FROM threshold_norms WHERE list_contains($1, run) GROUP BY run
), p AS (
    SELECT t.run, t.image_id, t.norm::DOUBLE AS norm, t.norm > th.threshold AS is_out
    FROM tokens AS t JOIN th ON th.run = t.run
    WHERE t.kind = 'patch' AND t.norm > 0 AND list_contains($1, t.run)
), robust AS (
    SELECT run, median(ln(norm)) + 6 * 1.4826 * mad(ln(norm)) AS sep_cutoff FROM p GROUP BY run
), s AS (
    SELECT p.run,
           count(*) AS n,
           count(*) FILTER (WHERE is_out) AS n_outliers,
           count(DISTINCT image_id) AS n_images,
           count(DISTINCT image_id) FILTER (WHERE is_out) AS n_images_with_outliers,
           median(norm) AS median_norm,
           max(norm) AS max_norm,
           skewness(ln(norm)) AS skew_log, kurtosis(ln(norm)) AS exkurt_log,
           skewness(norm) AS skew, kurtosis(norm) AS exkurt,
           avg((ln(norm) > robust.sep_cutoff)::INTEGER) AS separated_share
    FROM p JOIN robust ON robust.run = p.run GROUP BY p.run, robust.sep_cutoff
)
SELECT th.run, th.threshold_run, th.threshold,
       s.n AS n_patch_tokens, s.n_outliers,
       s.n_outliers / s.n AS outlier_share,
       s.n_images, s.n_images_with_outliers,
       s.n_images_with_outliers / s.n_images AS image_share,
       s.n_outliers / s.n_images AS outliers_per_image,
       s.n_outliers / nullif(s.n_images_with_outliers, 0) AS outliers_per_affected_image,
       s.median_norm, s.max_norm, s.max_norm / s.median_norm AS max_median_ratio,
       s.skew_log, s.exkurt_log,
       (s.skew_log ^ 2 + 1) / (s.exkurt_log + 3 * (s.n - 1) ^ 2 / ((s.n - 2) * (s.n - 3))) AS bc_log,
       s.skew, s.exkurt,
       (s.skew ^ 2 + 1) / (s.exkurt + 3 * (s.n - 1) ^ 2 / ((s.n - 2) * (s.n - 3))) AS bc,
       s.separated_share
FROM th JOIN s ON s.run = th.run
ORDER BY th.run
