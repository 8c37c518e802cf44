"""Runs with planted structure, for tests and benchmarks of the analysis jobs (no backbone)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["OUTLIER_CELLS", "planted_probe_result", "planted_run"]

OUTLIER_CELLS = ((1, 1), (1, 3), (3, 2))  # (row, col) of the planted outliers in image 0


def planted_run(*, n_images: int = 6, grid: int = 5, n_reg: int = 1, patch: int = 4, dim: int = 8,
                attention: str = "same", model: str = "dinov2_s", params: int | None = 22_000_000,
                random_weights: bool = False, outlier_norm: float = 1000.0,
                outlier_cells: tuple[tuple[int, int], ...] = OUTLIER_CELLS,
                blocks: int = 0, emerge_at: int | None = None, store: str = "all", seed: int = 0,
                layout_extra: dict[str, Any] | None = None, subset: str = "planted",
                native_img_size: int | bool = True, policy: str | None = None,
                config: dict[str, Any] | None = None, norms: str = "uniform") -> dict[str, Any]:
    """Keyword arguments for `write_run` with known structure.

    Patch norms are uniform in [10, 20) (norms='gaussian': normal with mean 15, sd 1.5, one mode in
    ln(norm), i.e. no outlier population) except `outlier_cells` of image 0 (norm `outlier_norm`);
    with the defaults (150 patches, 3 outliers) the 98th percentile leaves exactly those 3 above.
    nbr_cos: uniform in [0, 0.8) for normal patches, 0.95 for the outliers. attn: uniform in
    [0, 0.1); 0.9 on the outliers (attention='same') or on the mirrored cells of image 1
    (attention='elsewhere'). Pixels: the cell of patch (r, c) of image i is the colour
    (40 r, 40 c, 30 i). store: 'all' stores every token's embedding/pixels, 'prefix' only prefix
    tokens (no pixels for patches), 'none' no token arrays at all. blocks > 0 adds a blocks table
    (block b's norm = (b + 1) * final norm, q/k/v norms 1, 2, 3 times the norm on the last block).
    `emerge_at` (with blocks): the outliers emerge at that block instead: the outlier cells' block
    norm is 15 (a normal patch's) before it and `outlier_norm` from it on, except the first cell,
    which emerges one block earlier (a minority early: the median rule is not fooled by it).
    Source ids are `img{i}.jpg`, shared by every planted run.

    Manifest: img_size = grid * patch; `native_img_size` True records that size as the model's
    native resolution, an int records that value, False leaves the key out (a run extracted before
    tokenlake recorded it); `policy` (default: `store`) and `subset` as given; `config` becomes
    manifest['config'] (keep_if_outlier, test_time_registers, preprocess, ...) when given.
    """
    if emerge_at is not None and not 0 <= emerge_at < blocks:
        raise ValueError(f"emerge_at must be a block in 0..{blocks - 1}, got {emerge_at}")
    if norms not in ("uniform", "gaussian"):
        raise ValueError(f"norms must be 'uniform' or 'gaussian', got {norms!r}")
    rng = np.random.default_rng(seed)
    n_pre = 1 + n_reg
    n_patch = grid * grid
    n_tok = n_pre + n_patch
    kinds = ["cls"] + ["reg"] * n_reg + ["patch"] * n_patch
    rows = np.repeat(np.arange(grid), grid)
    cols = np.tile(np.arange(grid), grid)
    norm = np.zeros((n_images, n_tok), np.float32)
    norm[:, 0] = 50.0
    norm[:, 1:n_pre] = 200.0
    if norms == "uniform":
        norm[:, n_pre:] = rng.uniform(10, 20, (n_images, n_patch))
    else:
        norm[:, n_pre:] = rng.normal(15, 1.5, (n_images, n_patch)).clip(5, None)
    cos = rng.uniform(0, 0.8, (n_images, n_tok)).astype(np.float32)
    attn = rng.uniform(0, 0.1, (n_images, n_tok)).astype(np.float32)
    for r, c in outlier_cells:
        t = n_pre + r * grid + c
        norm[0, t] = outlier_norm
        cos[0, t] = 0.95
        if attention == "same":
            attn[0, t] = 0.9
        else:
            attn[1, n_pre + (grid - 1 - r) * grid + (grid - 1 - c)] = 0.9
    is_patch = np.tile(np.array(kinds) == "patch", n_images)
    rr = np.tile(np.concatenate([np.zeros(n_pre, np.int16), rows.astype(np.int16)]), n_images)
    cc = np.tile(np.concatenate([np.zeros(n_pre, np.int16), cols.astype(np.int16)]), n_images)
    ids = np.arange(n_images, dtype=np.int64)
    n_all = n_images * n_tok
    if store == "all":
        stored = np.ones(n_all, bool)
    elif store == "prefix":
        stored = ~is_patch
    else:
        stored = np.zeros(n_all, bool)
    slot = np.full(n_all, -1, np.int64)
    slot[stored] = np.arange(stored.sum())
    tokens = pa.table({
        "image_id": np.repeat(ids, n_tok),
        "token": np.tile(np.arange(n_tok, dtype=np.int32), n_images),
        "kind": pa.array(kinds * n_images, pa.string()),
        "row": pa.array(rr, mask=~is_patch),
        "col": pa.array(cc, mask=~is_patch),
        "norm": norm.ravel(),
        "attn": attn.ravel(),
        "nbr_cos": pa.array(cos.ravel(), mask=~is_patch),
        "slot": pa.array(slot, mask=~stored),
    })
    images = pa.table({
        "image_id": ids, "source_index": ids, "source_id": pa.array([f"img{i}.jpg" for i in ids]),
        "label": ids % 3, "width": np.full(n_images, grid * patch, np.int32),
        "height": np.full(n_images, grid * patch, np.int32),
        "n_tokens": np.full(n_images, n_tok, np.int32),
        "max_patch_norm": norm[:, n_pre:].max(1), "mean_patch_norm": norm[:, n_pre:].mean(1),
    })
    arrays: dict[str, np.ndarray] = {
        "cls_post": rng.standard_normal((n_images, dim)).astype(np.float32),
        "patch_mean_post": rng.standard_normal((n_images, dim)).astype(np.float32),
    }
    if store != "none":
        s = int(stored.sum())
        px = np.zeros((n_all, patch, patch, 3), np.uint8)
        img_of = np.repeat(ids, n_tok)
        px[:, :, :, 0] = (40 * rr)[:, None, None]
        px[:, :, :, 1] = (40 * cc)[:, None, None]
        px[:, :, :, 2] = (30 * img_of)[:, None, None]
        px[~is_patch] = 0
        arrays["tokens"] = rng.standard_normal((s, dim)).astype(np.float16)
        arrays["pixels"] = px[stored]
    layout = {"family": "vit", "n_cls": 1, "n_reg": n_reg, "grid": [grid, grid], "cell": patch,
              "pixel_offset": 0, "embed_dim": dim, "depth": max(blocks, 1), **(layout_extra or {})}
    manifest = {"model": model, "timm_name": f"planted_{model}", "img_size": grid * patch,
                "subset": subset, "policy": store if policy is None else policy,
                "weights": "random" if random_weights else "pretrained",
                "random_weights": random_weights, "token_layout": layout,
                "versions": {"tokenlake": "test"}}
    if native_img_size is not False:
        manifest["native_img_size"] = grid * patch if native_img_size is True else int(native_img_size)
    if config is not None:
        manifest["config"] = dict(config)
    if params is not None:
        manifest["params"] = params
    out: dict[str, Any] = {"images": images, "tokens": tokens, "arrays": arrays, "manifest": manifest}
    if blocks:
        img = np.repeat(ids, n_tok)
        tok = np.tile(np.arange(n_tok, dtype=np.int32), n_images)
        parts = []
        for b in range(blocks):
            last = b == blocks - 1
            f = norm * (b + 1)
            if emerge_at is not None:
                for k, (r, c) in enumerate(outlier_cells):
                    f[0, n_pre + r * grid + c] = outlier_norm if b >= emerge_at - (k == 0) else 15.0
            f = f.ravel()
            q = [pa.array(norm.ravel() * k if last else np.full(n_all, np.nan, np.float32),
                          pa.float32(), mask=None if last else np.ones(n_all, bool)) for k in (1, 2, 3)]
            parts.append(pa.table({"image_id": img, "block": np.full(n_all, b, np.int16), "token": tok,
                                   "norm": f.astype(np.float32), "q_norm": q[0], "k_norm": q[1],
                                   "v_norm": q[2]}))
        out["blocks"] = pa.concat_tables(parts).sort_by([("image_id", "ascending"),
                                                          ("block", "ascending"), ("token", "ascending")])
    return out


def planted_probe_result(lake: Any, run: str, probe: str, *, values: dict[tuple[str, str], float],
                         config: dict[str, Any] | None = None,
                         choices: dict[str, Any] | None = None) -> str:
    """Commit a probe result with known numbers, as tokenlake.probes writes one: rows
    (token_group, metric, value) for the probe_results view and result.json carrying the config
    (e.g. tokens, test_run) and choices (e.g. test: {run, n_images}). Returns its config hash."""
    from tokenlake.store import probe_config_hash, write_probe_result

    cfg = {"probe": probe, "run": run, **(config or {})}
    h = probe_config_hash(cfg)
    metrics: dict[str, dict[str, float]] = {}
    for (group, metric), v in values.items():
        metrics.setdefault(group, {})[metric] = v
    write_probe_result(lake, run, probe, h, config=cfg,
                       result={"metrics": metrics, "config": cfg, "choices": choices or {}},
                       rows=[(g, m, v) for (g, m), v in values.items()])
    return h
