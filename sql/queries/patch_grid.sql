-- patch_grid: the patch tokens of chosen images of one run, laid out on the grid.
-- Columns: run VARCHAR, image_id BIGINT, source_id VARCHAR, token INTEGER, row SMALLINT,
--          col SMALLINT, norm FLOAT, attn FLOAT, nbr_cos FLOAT, slot BIGINT (NULL: no
--          embedding/pixels stored), is_outlier BOOLEAN (norm > $3).
-- Parameters: $1 run VARCHAR, $2 image_ids BIGINT[], $3 threshold DOUBLE (e.g. from
--             analysis_thresholds). Ordered by image_id, token.
SELECT t.run, t.image_id, i.source_id, t.token, t."row", t.col, t.norm, t.attn, t.nbr_cos,
       t.slot, t.norm > $3 AS is_outlier
FROM tokens AS t
JOIN images AS i ON i.run = t.run AND i.image_id = t.image_id
WHERE t.run = $1 AND list_contains($2, t.image_id) AND t.kind = 'patch'
ORDER BY t.image_id, t.token
