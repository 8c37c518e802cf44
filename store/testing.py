"""Synthetic runs with known contents, for tests and benchmarks of code that reads the lake."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["synthetic_run"]


def synthetic_run(
    *,
    n_inputs: int = 3,
    error_ids: tuple[int, ...] = (),
    n_reg: int = 4,
    grid: int = 4,
    dim: int = 8,
    patch: int = 2,
    seed: int = 0,
    model: str = "toy",
) -> dict[str, Any]:
    """Keyword arguments for `write_run`: every token stored (policy 'all'), random known values.

    Each kept input has 1 cls + n_reg reg + grid*grid patch tokens; `error_ids` become errors.
    Slots are dense (row k of arrays['tokens'] is token row k); image arrays follow `images` rows.
    """
    rng = np.random.default_rng(seed)
    ids = np.array([i for i in range(n_inputs) if i not in set(error_ids)], np.int64)
    n_img, n_tok = len(ids), 1 + n_reg + grid * grid
    kinds = ["cls"] + ["reg"] * n_reg + ["patch"] * grid * grid
    is_patch = np.tile(np.array(kinds) == "patch", n_img)
    grid_rc = np.full((n_tok, 2), -1, np.int16)
    grid_rc[1 + n_reg :] = np.stack(np.divmod(np.arange(grid * grid), grid), 1)
    rc = np.tile(grid_rc, (n_img, 1))
    norm = rng.gamma(4.0, 10.0, size=n_img * n_tok).astype(np.float32)
    tokens = pa.table(
        {
            "image_id": np.repeat(ids, n_tok),
            "token": np.tile(np.arange(n_tok, dtype=np.int32), n_img),
            "kind": pa.array(kinds * n_img, pa.string()),
            "row": pa.array(rc[:, 0], mask=~is_patch),
            "col": pa.array(rc[:, 1], mask=~is_patch),
            "norm": norm,
            "attn": rng.random(n_img * n_tok).astype(np.float32),
            "nbr_cos": pa.array(rng.random(n_img * n_tok).astype(np.float32), mask=~is_patch),
            "slot": np.arange(n_img * n_tok, dtype=np.int64),
        }
    )
    patch_norm = norm.reshape(n_img, n_tok)[:, 1 + n_reg :]
    images = pa.table(
        {
            "image_id": ids,
            "source_index": ids + 100,
            "source_id": pa.array([f"img{i}.jpg" for i in ids], pa.string()),
            "label": ids % 5,
            "width": np.full(n_img, 64, np.int32),
            "height": np.full(n_img, 48, np.int32),
            "n_tokens": np.full(n_img, n_tok, np.int32),
            "max_patch_norm": patch_norm.max(1),
            "mean_patch_norm": patch_norm.mean(1),
        }
    )
    err = np.array(sorted(error_ids), np.int64)
    errors = pa.table(
        {
            "image_id": err,
            "source_index": err + 100,
            "source_id": pa.array([f"img{i}.jpg" for i in err], pa.string()),
            "reason": pa.array(["unreadable"] * len(err), pa.string()),
        }
    )
    s = n_img * n_tok
    arrays = {
        "tokens": rng.standard_normal((s, dim)).astype(np.float16),
        "pixels": rng.integers(0, 256, (s, patch, patch, 3), dtype=np.uint8),
        "cls_post": rng.standard_normal((n_img, dim)).astype(np.float32),
        "patch_mean_post": rng.standard_normal((n_img, dim)).astype(np.float32),
    }
    if n_reg:  # only models with registers have registers_post
        arrays["registers_post"] = rng.standard_normal((n_img, n_reg, dim)).astype(np.float32)
    manifest = {
        "model": model,
        "timm_name": f"{model}_patch{patch}",
        "img_size": grid * patch,
        "subset": "tiny",
        "policy": "all",
        "weights": "sha256:0",
        "random_weights": True,
    }
    return {
        "images": images,
        "tokens": tokens,
        "errors": errors,
        "arrays": arrays,
        "manifest": manifest,
    }
