-- norm_histogram: histogram of token norms per run and token kind on log-spaced bins.
-- Bins are shared by all kinds of a run: n_bins equal steps of log10(norm) between the run's
-- smallest and largest positive norm; the largest norm falls in the last bin.
-- Columns: run VARCHAR, kind VARCHAR (cls/reg/patch), bin INTEGER (0 .. n_bins-1),
--          lo DOUBLE, hi DOUBLE (bin edges in norm units), n BIGINT (tokens in the bin).
-- Empty bins are left out. Tokens with norm <= 0 are left out.
-- Parameters: $1 runs VARCHAR[], $2 n_bins INTEGER. Ordered by run, kind, bin.
WITH t AS (
    SELECT run, kind, log10(norm::DOUBLE) AS x
    FROM tokens WHERE list_contains($1, run) AND norm > 0
), r AS (
    SELECT run, min(x) AS x0, greatest(max(x) - min(x), 1e-9) AS w FROM t GROUP BY run
), b AS (
    SELECT t.run, t.kind, least(floor((t.x - r.x0) / r.w * $2)::INTEGER, $2 - 1) AS bin, r.x0, r.w
    FROM t JOIN r ON r.run = t.run
)
SELECT run, kind, bin,
       10 ^ (any_value(x0) + bin * any_value(w) / $2) AS lo,
       10 ^ (any_value(x0) + (bin + 1) * any_value(w) / $2) AS hi,
       count(*) AS n
FROM b GROUP BY run, kind, bin
ORDER BY run, kind, bin
