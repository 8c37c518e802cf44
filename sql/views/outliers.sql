-- outliers: patch tokens whose norm is above the threshold of their run's threshold_run
-- (runs.threshold_run: manifest 'outlier_ref' if set, else the run itself).
-- Columns: run, image_id, token, row, col, norm, attn, nbr_cos, slot (as in `tokens`),
--          threshold DOUBLE, threshold_run VARCHAR.
-- Parameters: none.
-- The threshold is grouped by the *using* run (not by threshold_run) so that a filter on `run`
-- reaches the quantile: asking for one small run does not compute every run's threshold
-- (0.3 s instead of 1.3 s beside a 52M-row run; bench/bench_lake.py).
CREATE OR REPLACE VIEW outliers AS
WITH th AS (
    SELECT r.run, r.threshold_run, quantile_cont(x.norm::DOUBLE, 0.98) AS threshold
    FROM runs AS r
    JOIN tokens AS x ON x.run = r.threshold_run
    WHERE x.kind = 'patch'
    GROUP BY r.run, r.threshold_run
)
SELECT t.run, t.image_id, t.token, t."row", t.col, t.norm, t.attn, t.nbr_cos, t.slot,
       th.threshold, th.threshold_run
FROM tokens AS t
JOIN th ON th.run = t.run
WHERE t.kind = 'patch' AND t.norm > th.threshold
