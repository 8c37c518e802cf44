-- analysis_thresholds: the outlier threshold of each chosen run at any percentile.
-- Columns: run VARCHAR, threshold_run VARCHAR (manifest 'outlier_ref' or the run itself),
--          q DOUBLE, threshold DOUBLE (q-quantile of the threshold_run's patch-token norms,
--          linear interpolation = numpy.percentile(..., method='linear')),
--          n_ref_patch_tokens BIGINT (patch tokens the threshold was taken over).
-- Parameters: $1 runs VARCHAR[] (runs to report), $2 q DOUBLE (0.98 = top 2 %).
-- Runs whose threshold_run has no patch tokens are left out. Ordered by run.
SELECT r.run, r.threshold_run, th.q, th.threshold, th.n_patch_tokens AS n_ref_patch_tokens
FROM runs AS r
JOIN thresholds_at($2) AS th ON th.run = r.threshold_run
WHERE list_contains($1, r.run)
ORDER BY r.run
