-- outliers: patch tokens whose norm is above the threshold of their run's threshold_run
-- (runs.threshold_run: manifest 'outlier_ref' if set, else the run itself).
-- Columns: run, image_id, token, row, col, norm, attn, nbr_cos, slot (as in `tokens`),
--          threshold DOUBLE, threshold_run VARCHAR.
-- Parameters: none.
CREATE OR REPLACE VIEW outliers AS
SELECT t.run, t.image_id, t.token, t."row", t.col, t.norm, t.attn, t.nbr_cos, t.slot,
       th.threshold, r.threshold_run
FROM tokens AS t
JOIN runs AS r ON r.run = t.run
JOIN thresholds AS th ON th.run = r.threshold_run
WHERE t.kind = 'patch' AND t.norm > th.threshold
