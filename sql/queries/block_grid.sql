-- block_grid: per-block norms of the patch tokens of chosen images of one run (appendix A).
-- Needs a run extracted with --blocks all (no rows otherwise).
-- Columns: run VARCHAR, image_id BIGINT, block SMALLINT, token INTEGER, row SMALLINT,
--          col SMALLINT, norm FLOAT (the block's output norm), q_norm, k_norm, v_norm FLOAT
--          (every block since schema 3; runs extracted before: the last block only, else NULL).
-- Parameters: $1 run VARCHAR, $2 image_ids BIGINT[]. Ordered by image_id, block, token.
SELECT b.run, b.image_id, b.block, b.token, t."row", t.col, b.norm, b.q_norm, b.k_norm, b.v_norm
FROM blocks AS b
JOIN tokens AS t ON t.run = b.run AND t.image_id = b.image_id AND t.token = b.token
WHERE b.run = $1 AND list_contains($2, b.image_id) AND t.kind = 'patch'
ORDER BY b.image_id, b.block, b.token
