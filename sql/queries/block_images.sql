-- block_images: which runs have per-block norms (extracted with --blocks all), and for which images.
-- Columns: run VARCHAR, image_id BIGINT, n_blocks BIGINT, has_qkv BOOLEAN (q/k/v norms present).
-- Parameters: $1 runs VARCHAR[]. Ordered by run, image_id.
SELECT run, image_id, count(DISTINCT block) AS n_blocks, bool_or(q_norm IS NOT NULL) AS has_qkv
FROM blocks
WHERE list_contains($1, run)
GROUP BY run, image_id
ORDER BY run, image_id
