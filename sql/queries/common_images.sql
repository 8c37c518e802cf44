-- common_images: images (by source_id) present in every chosen run, most outlier-rich first.
-- Columns: source_id VARCHAR, n_runs BIGINT, n_runs_with_outliers BIGINT (runs in which the
--          image's max patch norm exceeds that run's threshold), max_ratio DOUBLE (largest
--          max_patch_norm / threshold over the runs), first_image_id BIGINT (smallest image_id).
-- Parameters: $1 runs VARCHAR[], $2 thresholds DOUBLE[] (aligned with $1).
-- Ordered by n_runs_with_outliers DESC, max_ratio DESC, first_image_id, source_id.
WITH th AS (SELECT unnest($1) AS run, unnest($2) AS threshold)
SELECT i.source_id,
       count(DISTINCT i.run) AS n_runs,
       count(DISTINCT i.run) FILTER (WHERE i.max_patch_norm > th.threshold) AS n_runs_with_outliers,
       max(i.max_patch_norm / th.threshold) AS max_ratio,
       min(i.image_id) AS first_image_id
FROM images AS i JOIN th ON th.run = i.run
WHERE list_contains($1, i.run)
GROUP BY i.source_id
HAVING count(DISTINCT i.run) = len($1)
ORDER BY n_runs_with_outliers DESC, max_ratio DESC, first_image_id, i.source_id
