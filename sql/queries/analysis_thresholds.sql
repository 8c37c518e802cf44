-- analysis_thresholds: the outlier threshold of each chosen run at any percentile.
-- Columns: run VARCHAR, threshold_run VARCHAR (manifest 'outlier_ref' or the run itself),
--          q DOUBLE, threshold DOUBLE (q-quantile of the threshold_run's patch-token norms,
--          linear interpolation = numpy.percentile(..., method='linear')),
--          n_ref_patch_tokens BIGINT (patch tokens the threshold was taken over).
-- Parameters: $1 runs VARCHAR[] (runs to report), $2 q DOUBLE (0.98 = top 2 %).
-- Runs whose threshold_run has no patch tokens are left out. Ordered by run.
SELECT run, any_value(threshold_run) AS threshold_run, $2::DOUBLE AS q,
       quantile_cont(norm::DOUBLE, $2) AS threshold, count(*) AS n_ref_patch_tokens
FROM threshold_norms  -- filtered by run: only the chosen runs and their threshold runs are read
WHERE list_contains($1, run)
GROUP BY run
ORDER BY run
