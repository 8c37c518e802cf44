-- outliers: patch tokens whose norm is above the threshold of their run's threshold_run
-- (runs.threshold_run: manifest 'outlier_ref' if set, else the run itself).
-- Columns: run, image_id, token, row, col, norm, attn, nbr_cos, slot (as in `tokens`),
--          threshold DOUBLE, threshold_run VARCHAR.
-- Parameters: none.
-- The threshold comes from the base view `threshold_norms`, whose branch for each run reads that
-- run's threshold_run and carries the run's own name as a constant: a filter on `run` reaches it,
-- so asking for one run reads that run and its threshold run only (not every run's tokens: on a
-- 76-run lake, bench/bench_open.py: 4.7 s before, 0.15 s now; a damaged other run is never read).
CREATE OR REPLACE VIEW outliers AS
WITH th AS (
    SELECT run, any_value(threshold_run) AS threshold_run,
           quantile_cont(norm::DOUBLE, 0.98) AS threshold
    FROM threshold_norms
    GROUP BY run
)
SELECT t.run, t.image_id, t.token, t."row", t.col, t.norm, t.attn, t.nbr_cos, t.slot,
       th.threshold, th.threshold_run
FROM tokens AS t
JOIN th ON th.run = t.run
WHERE t.kind = 'patch' AND t.norm > th.threshold
