-- norm_percentiles: token-norm distribution per run and token kind.
-- Columns: run VARCHAR, kind VARCHAR, n BIGINT, p50, p90, p98, p99 DOUBLE (linear
--          interpolation), max FLOAT.
-- Parameters: none. Ordered by run, then kind (cls, patch, reg).
SELECT run,
       kind,
       count(*) AS n,
       quantile_cont(norm::DOUBLE, 0.50) AS p50,
       quantile_cont(norm::DOUBLE, 0.90) AS p90,
       quantile_cont(norm::DOUBLE, 0.98) AS p98,
       quantile_cont(norm::DOUBLE, 0.99) AS p99,
       max(norm) AS max
FROM tokens
GROUP BY run, kind
ORDER BY run, kind
