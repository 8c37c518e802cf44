-- thresholds_at(q): table macro, the q-quantile of patch-token norms of each complete run.
-- Columns: run VARCHAR, q DOUBLE, threshold DOUBLE (linear interpolation), n_patch_tokens BIGINT.
-- Parameters: q, a fraction in [0, 1] (0.98 = the 98th percentile used by `thresholds`).
-- Example: SELECT * FROM thresholds_at(0.99)
CREATE OR REPLACE MACRO thresholds_at(q) AS TABLE
SELECT run,
       q::DOUBLE AS q,
       quantile_cont(norm::DOUBLE, q) AS threshold,
       count(*) AS n_patch_tokens
FROM tokens
WHERE kind = 'patch'
GROUP BY run
