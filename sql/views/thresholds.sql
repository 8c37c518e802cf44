-- thresholds: the outlier threshold of each complete run.
-- One row per run with at least one patch token.
-- Columns: run VARCHAR, threshold DOUBLE (98th percentile of patch-token norms, linear
--          interpolation = numpy.percentile(..., method='linear')), n_patch_tokens BIGINT.
-- Parameters: none (see thresholds_at(q) for other percentiles).
CREATE OR REPLACE VIEW thresholds AS
SELECT run,
       quantile_cont(norm::DOUBLE, 0.98) AS threshold,
       count(*) AS n_patch_tokens
FROM tokens
WHERE kind = 'patch'
GROUP BY run
