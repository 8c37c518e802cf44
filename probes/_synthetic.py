"""Runs with planted signals, written through `tokenlake.store.write_run` (tests and bench).

Every embedding is [pos part | pixel part]:
* normal patch: pos part = E[true position] (+ small noise), pixel part = its own pixels normalised
  as the model's input (so position and pixels are linearly decodable);
* outlier patch (norm column 100, normals 10, so the 98th percentile sits on the normals and
  exactly the planted outliers are above it): pos part = E[random position] + class_scale * C[label]
  (position scrambled, class carried), pixel part = noise (pixels not decodable);
* cls token: noise.  Image arrays: cls_post / patch_mean_post noise, registers_post carries the
  class (register_signal) or noise.

`seed` fixes the "model" (E, C, the final norm); `image_seed`, when given, draws the images
(labels, noise, pixels, outliers) apart from it: two runs with one seed and different image_seeds
are one model over different images (a training run and its test run). `final_norm` is written as
the run's final norm ("identity", "layer_norm" with a seeded affine, a dict, or None: a run
written before final norms were saved). `token_scale` hides the planted signal from the stored
tokens but not from the output tokens: every token gets two filler dimensions that give it zero
mean and one sum of squares (a LayerNorm maps it to a fixed multiple of itself), then is
multiplied by a seeded factor in [1/token_scale, token_scale].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tokenlake import store

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def planted_run(
    lake: str | Path,
    run: str,
    *,
    n_images: int = 300,
    grid: int = 8,
    patch: int = 2,
    pos_dim: int = 20,
    n_classes: int = 4,
    n_reg: int = 0,
    p_outlier: float = 0.8,
    class_scale: float = 3.0,
    noise: float = 0.05,
    labels: bool = True,
    store_patches: bool = True,
    all_outlier_free: bool = False,
    register_signal: bool = True,
    graded_noise: float | None = None,
    random_weights: bool = False,
    seed: int = 0,
    image_seed: int | None = None,
    shard_size: int | None = None,
    final_norm: str | dict[str, Any] | None = "identity",
    token_scale: float | None = None,
    unstored: float = 0.0,
    norm_scale: float = 1.0,
    source_prefix: str = "img",
    layout: dict[str, Any] | None = None,
    manifest_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the run; returns the ground truth (labels, outlier mask, embeddings dims).

    unstored: fraction of normal patch tokens written without a stored embedding (slot NULL).
    norm_scale: multiplies the norm column (normals 10, outliers 100 at 1.0).
    layout / manifest_extra: overrides of the manifest's token_layout / top-level fields.
    """
    model_rng = rng = np.random.default_rng(seed)
    if image_seed is not None:  # else one stream: runs written before image_seed are unchanged
        rng = np.random.default_rng([seed, image_seed])
    n_pix = patch * patch * 3
    dim = pos_dim + n_pix
    n_patch = grid * grid
    n_pre = 1 + n_reg
    n_tok = n_pre + n_patch
    label = rng.integers(0, n_classes, n_images)
    E = model_rng.standard_normal((n_patch, pos_dim)).astype(np.float32)
    C = model_rng.standard_normal((n_classes, pos_dim)).astype(np.float32)
    C /= np.linalg.norm(C, axis=1, keepdims=True) / np.sqrt(pos_dim)
    has_out = (rng.random(n_images) < p_outlier) & (not all_outlier_free)
    out_pos = rng.integers(0, n_patch, n_images)

    pixels = rng.integers(0, 256, (n_images, n_tok, patch, patch, 3), dtype=np.uint8)
    pixels[:, :n_pre] = 0
    pix_norm = ((pixels.astype(np.float32) / 255.0 - np.array(MEAN, np.float32))
                / np.array(STD, np.float32)).reshape(n_images, n_tok, n_pix)
    emb = np.zeros((n_images, n_tok, dim), np.float32)
    emb[:, :n_pre] = rng.standard_normal((n_images, n_pre, dim))
    emb[:, n_pre:, :pos_dim] = E[None] + noise * rng.standard_normal((n_images, n_patch, pos_dim))
    emb[:, n_pre:, pos_dim:] = pix_norm[:, n_pre:]
    norm = np.full((n_images, n_tok), 10.0, np.float32)
    if graded_noise is not None:  # higher norm, cleaner position (for the sweep)
        u = rng.random((n_images, n_patch)).astype(np.float32)
        norm[:, n_pre:] = 10.0 + 10.0 * u
        emb[:, n_pre:, :pos_dim] += (graded_noise * (1.0 - u))[..., None] * rng.standard_normal(
            (n_images, n_patch, pos_dim))
    norm[:, :n_pre] = 50.0
    outlier = np.zeros((n_images, n_patch), bool)
    for i in np.flatnonzero(has_out):
        p = out_pos[i]
        outlier[i, p] = True
        norm[i, n_pre + p] = 100.0 + rng.random()
        emb[i, n_pre + p, :pos_dim] = E[rng.integers(0, n_patch)] + class_scale * C[label[i]]
        emb[i, n_pre + p, pos_dim:] = rng.standard_normal(n_pix) * 2.0

    emb = emb.reshape(-1, dim)
    if token_scale is not None:
        emb = _scale_invariant(emb) * np.exp(
            rng.uniform(-1, 1, (len(emb), 1)) * np.log(token_scale)).astype(np.float32)
    dim = emb.shape[1]
    norm *= np.float32(norm_scale)
    ids = np.arange(n_images, dtype=np.int64)
    kinds = ["cls"] + ["reg"] * n_reg + ["patch"] * n_patch
    is_patch = np.tile(np.array(kinds) == "patch", n_images)
    rc = np.full((n_tok, 2), -1, np.int16)
    rc[n_pre:] = np.stack(np.divmod(np.arange(n_patch), grid), 1)
    rc = np.tile(rc, (n_images, 1))
    slot = np.arange(n_images * n_tok, dtype=np.int64)
    missing = is_patch if not store_patches else np.zeros_like(is_patch)
    if unstored:
        flat_out = np.zeros((n_images, n_tok), bool)
        flat_out[:, n_pre:] = outlier
        missing = missing | (is_patch & ~flat_out.reshape(-1)
                             & (rng.random(is_patch.size) < unstored))
    slot_arr = pa.array(slot, mask=missing)
    tokens = pa.table({
        "image_id": np.repeat(ids, n_tok),
        "token": np.tile(np.arange(n_tok, dtype=np.int32), n_images),
        "kind": pa.array(kinds * n_images, pa.string()),
        "row": pa.array(rc[:, 0], mask=~is_patch),
        "col": pa.array(rc[:, 1], mask=~is_patch),
        "norm": norm.reshape(-1),
        "attn": np.zeros(n_images * n_tok, np.float32),
        "nbr_cos": pa.array(np.zeros(n_images * n_tok, np.float32), mask=~is_patch),
        "slot": slot_arr,
    })
    pn = norm[:, n_pre:]
    images = pa.table({
        "image_id": ids,
        "source_index": ids,
        "source_id": pa.array([f"{source_prefix}{i}.jpg" for i in ids], pa.string()),
        "label": pa.array(label, pa.int64(), mask=np.full(n_images, not labels)),
        "width": np.full(n_images, grid * patch, np.int32),
        "height": np.full(n_images, grid * patch, np.int32),
        "n_tokens": np.full(n_images, n_tok, np.int32),
        "max_patch_norm": pn.max(1),
        "mean_patch_norm": pn.mean(1),
    })
    img_dim = 16
    arrays = {
        "tokens": emb.astype(np.float16),
        "pixels": pixels.reshape(-1, patch, patch, 3),
        "cls_post": rng.standard_normal((n_images, img_dim)).astype(np.float32),
        "patch_mean_post": rng.standard_normal((n_images, img_dim)).astype(np.float32),
    }
    if n_reg:
        reg = rng.standard_normal((n_images, n_reg, img_dim)).astype(np.float32)
        if register_signal:
            Cr = model_rng.standard_normal((n_classes, img_dim)).astype(np.float32) * 2.0
            reg[:, 0] += Cr[label]
        arrays["registers_post"] = reg
    manifest = {
        "model": "planted", "timm_name": "planted", "img_size": grid * patch, "subset": "planted",
        "policy": "all" if store_patches else "summary", "weights": "planted",
        "random_weights": random_weights,
        "token_layout": {"family": "vit", "n_cls": 1, "n_reg": n_reg, "grid": [grid, grid],
                         "cell": patch, "pixel_offset": 0, "embed_dim": dim, "depth": 1,
                         **(layout or {})},
        "data_config": {"img_size": grid * patch, "mean": list(MEAN), "std": list(STD)},
        **(manifest_extra or {}),
    }
    store.write_run(lake, run, images=images, tokens=tokens, arrays=arrays, manifest=manifest,
                    shard_size=shard_size, final_norm=_final_norm(final_norm, dim, model_rng))
    return {"label": label, "outlier": outlier, "dim": dim, "n_classes": n_classes}


def _scale_invariant(x: np.ndarray) -> np.ndarray:
    """x [n, d] -> [n, d + 2]: two filler values per row make every row's mean 0 and its sum of
    squares the same, so a LayerNorm maps each row to one fixed multiple of itself."""
    s, q = x.sum(1, dtype=np.float64), np.square(x, dtype=np.float64).sum(1)
    k = float((q + s**2 / 2).max()) * 1.1  # a + b = -s, a^2 + b^2 = k - q needs 2(k - q) >= s^2
    root = np.sqrt(2 * (k - q) - s**2)
    return np.concatenate([x, np.stack([(-s + root) / 2, (-s - root) / 2], 1)], 1).astype(
        np.float32)


def _final_norm(kind: str | dict[str, Any] | None, dim: int, rng) -> dict[str, Any] | None:
    if kind is None or isinstance(kind, dict):
        return kind
    if kind == "identity":
        return {"type": "identity", "dim": dim}
    if kind == "layer_norm":  # a non-trivial affine: a fresh LayerNorm's would hide its absence
        return {"type": "layer_norm", "dim": dim, "eps": 1e-6,
                "weight": rng.uniform(0.5, 2.0, dim).astype(np.float32),
                "bias": rng.standard_normal(dim).astype(np.float32)}
    raise ValueError(f"final_norm {kind!r}: 'identity', 'layer_norm', a dict or None")
