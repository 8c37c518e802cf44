-- neighbour_histogram: histogram of patch nbr_cos for outlier vs normal patches, per run.
-- Bins: n_bins equal steps over [-1, 1]; cosine 1 falls in the last bin.
-- Columns: run VARCHAR, group VARCHAR ('outlier' | 'normal'), bin INTEGER, lo DOUBLE, hi DOUBLE,
--          n BIGINT. Empty bins are left out; patches with NULL nbr_cos are left out.
-- Outlier: norm > q-quantile of the threshold_run's patch norms (as in analysis_thresholds).
-- Parameters: $1 runs VARCHAR[], $2 q DOUBLE, $3 n_bins INTEGER. Ordered by run, group, bin.
WITH th AS (  -- threshold_norms, filtered by run: only the chosen runs are read
    SELECT run, quantile_cont(norm::DOUBLE, $2) AS threshold
    FROM threshold_norms WHERE list_contains($1, run) GROUP BY run
), b AS (
    SELECT t.run,
           CASE WHEN t.norm > th.threshold THEN 'outlier' ELSE 'normal' END AS "group",
           least(greatest(floor((t.nbr_cos::DOUBLE + 1) / 2 * $3)::INTEGER, 0), $3 - 1) AS bin
    FROM tokens AS t JOIN th ON th.run = t.run
    WHERE t.kind = 'patch' AND t.nbr_cos IS NOT NULL AND list_contains($1, t.run)
)
SELECT run, "group", bin, -1 + 2 * bin / $3 AS lo, -1 + 2 * (bin + 1) / $3 AS hi, count(*) AS n
FROM b GROUP BY run, "group", bin
ORDER BY run, "group", bin
