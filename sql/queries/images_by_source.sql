-- images_by_source: where given inputs (by source_id) sit in each chosen run.
-- Columns: run VARCHAR, source_id VARCHAR, image_id BIGINT, width INTEGER, height INTEGER,
--          max_patch_norm FLOAT. One row per (run, image) whose source_id is listed.
-- Parameters: $1 runs VARCHAR[], $2 source_ids VARCHAR[]. Ordered by run, image_id.
SELECT run, source_id, image_id, width, height, max_patch_norm
FROM images
WHERE list_contains($1, run) AND list_contains($2, source_id)
ORDER BY run, image_id
