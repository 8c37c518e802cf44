-- emergence: the block where a run's outliers emerge, from its per-block norms (`--blocks all`).
-- The ONE definition of it: the `cards` view and `tokenlake neurons`' default detection block
-- (analyze/_neurons.py `emergence`) both read this view.
-- One row per (run, block) for every run with a `blocks` table and at least one outlier.
-- Columns: run VARCHAR, block SMALLINT, n_blocks INTEGER (1 + the run's last block index),
--          threshold DOUBLE, threshold_run VARCHAR (the run's outlier threshold, as `outliers`:
--              98th percentile of its threshold run's patch norms),
--          n_outliers BIGINT (the run's final outlier patch tokens, all images pooled: the
--              `outliers` view, whose norm is the last block's output before the final norm),
--          median_norm DOUBLE (median of this block's output norm at those tokens, interpolated
--              between the two middle values, = numpy.median),
--          above BOOLEAN (median_norm > threshold, strictly),
--          emergence_block SMALLINT (the run's first block with `above`; the same on every row of
--              the run; NULL if no block's median exceeds the threshold).
-- The median asks when MOST of the final outliers have become outliers; a first-exceeding-token
-- rule would fire on the odd normal token that crosses the threshold early.
-- Runs without a blocks table, or without an outlier, have no rows.
-- Parameters: none.
CREATE OR REPLACE VIEW emergence AS
WITH m AS (
    SELECT b.run, b.block, any_value(o.threshold) AS threshold,
           any_value(o.threshold_run) AS threshold_run,
           count(*) AS n_outliers, median(b.norm::DOUBLE) AS median_norm
    FROM blocks AS b
    JOIN outliers AS o ON o.run = b.run AND o.image_id = b.image_id AND o.token = b.token
    GROUP BY b.run, b.block
)
SELECT run, block,
       (max(block) OVER (PARTITION BY run) + 1)::INTEGER AS n_blocks,
       threshold, threshold_run, n_outliers, median_norm,
       median_norm > threshold AS above,
       min(block) FILTER (WHERE median_norm > threshold) OVER (PARTITION BY run) AS emergence_block
FROM m
