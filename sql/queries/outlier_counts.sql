-- outlier_counts: how many outlier tokens and images each complete run has.
-- Columns: run VARCHAR, threshold_run VARCHAR, threshold DOUBLE,
--          n_outliers BIGINT (patch tokens above the threshold),
--          n_patch_tokens BIGINT, token_share DOUBLE (n_outliers / n_patch_tokens),
--          n_images BIGINT, n_images_with_outliers BIGINT (images with >= 1 outlier),
--          image_share DOUBLE (n_images_with_outliers / n_images).
-- Parameters: none. Runs whose threshold_run has no patch tokens are left out.
WITH per_run AS (
    SELECT run, count(*) AS n_outliers, count(DISTINCT image_id) AS n_images_with_outliers
    FROM outliers
    GROUP BY run
), patches AS (
    SELECT run, count(*) AS n_patch_tokens FROM tokens WHERE kind = 'patch' GROUP BY run
)
SELECT r.run,
       r.threshold_run,
       th.threshold,
       coalesce(o.n_outliers, 0) AS n_outliers,
       coalesce(p.n_patch_tokens, 0) AS n_patch_tokens,
       coalesce(o.n_outliers, 0) / nullif(p.n_patch_tokens, 0) AS token_share,
       r.n_images,
       coalesce(o.n_images_with_outliers, 0) AS n_images_with_outliers,
       coalesce(o.n_images_with_outliers, 0) / nullif(r.n_images, 0) AS image_share
FROM runs AS r
JOIN thresholds AS th ON th.run = r.threshold_run
LEFT JOIN per_run AS o ON o.run = r.run
LEFT JOIN patches AS p ON p.run = r.run
ORDER BY r.run
