"""Synthetic runs with planted signals: the one generator behind the tests of the store, the SQL
views, the analysis jobs, the report and the probes (and `make bench`). No backbone and no image
is involved: every table and array of a run is drawn here with known structure.

    from tokenlake.store import write_run
    from tokenlake.store.testing import synthetic_run

    r = synthetic_run(n_images=6, seed=1)      # write_run's keyword arguments, a dict ...
    write_run(lake, "a", **r)                  # ... that a test may alter before writing
    r = synthetic_run(embeddings="planted", p_outlier=0.8, n_images=300).write(lake, "b")
    r.truth["label"], r.truth["outlier"]       # what was planted

What each run holds (every part is a parameter of `synthetic_run`):

* Tokens: 1 cls, `n_reg` registers, then `grid` x `grid` patches (row-major) for each of the
  `n_images` images. The input stream has n_images + len(error_ids) positions: those at
  `error_ids` are `errors` rows ("unreadable"), the others the images, in order (image_id = the
  position, source_id `{source_prefix}{position}.jpg`).
* Norms (the `norm` column): cls 50, registers 200; patches drawn by `norms`: 'uniform' in
  [10, 20), 'gaussian' (mean 15, sd 1.5, clipped at 5: one mode in ln(norm), no outlier
  population), 'gamma' (shape 4, scale 10: a skewed spread with natural outliers in any image) or
  'constant' (10). Outliers have norm `outlier_norm` (+ `outlier_spread` x uniform [0, 1)): the
  `outlier_cells` of the first image (the default `OUTLIER_CELLS`: with 6 images of 25 patches,
  the 98th percentile leaves exactly those 3 above), or, with `p_outlier`, one random cell in
  each image with that probability. `norm_scale` multiplies every norm.
* Attention (`attn`): uniform in [0, 0.1), and 0.9 on the outliers (attention='same'), or on the
  mirrored cell (r, c) -> (grid-1-r, grid-1-c) of the next image (attention='elsewhere'), or
  nowhere (attention='noise').
* Neighbour cosine (`nbr_cos`): uniform in [0, 0.8) for normal patches, 0.95 on the outliers.
* Pixels (cells of `patch` px): pixels='grid' paints the cell of patch (r, c) of image i with the
  colour (40 r, 40 c, 30 i) (mod 256); pixels='random' draws every value. Prefix tokens: zeros.
* Embeddings, for the tokens `store` keeps ('all'; 'prefix': prefix tokens only; 'none': no token
  arrays; `unstored`: that fraction of the normal patches loses its slot too):
  embeddings='random' draws them (width `dim`); embeddings='planted' makes each token
  [position part (`pos_dim`) | pixel part (3 patch^2)]: a normal patch holds E[its position]
  (+ `noise`) and its own pixels normalised as the model's input (both linearly decodable); an
  outlier holds E[a random position] + `class_scale` C[its label] (position scrambled, class
  carried) and noise instead of pixels; prefix tokens hold noise. `graded_noise` (with uniform
  norms) adds position noise that shrinks as the norm grows (the sweep probe's signal).
  `token_scale` hides the planted signal from the stored tokens but not from the output tokens:
  two filler dimensions give every token zero mean and one sum of squares (a LayerNorm maps it to
  a fixed multiple of itself), then it is multiplied by a seeded factor in [1/s, s].
* Image arrays: cls_post and patch_mean_post noise (width `img_dim`); with registers,
  registers_post, whose first register carries the class (`register_signal`) or noise.
* Labels: drawn in [0, `n_classes`) (NULL in the table with labels=False; the class signal is
  planted all the same).
* `blocks` > 0 adds a blocks table: block b's norm = (b + 1) x the token's norm, q/k/v norms 1, 2
  and 3 x the norm on the last block (NULL elsewhere). With `emerge_at` the outliers emerge at
  that block instead: their block norm is 15 (a normal patch's) before it and `outlier_norm` from
  it on, except the first outlier, which emerges one block earlier (a minority early).
* The final norm (`final_norm`): 'identity', 'layer_norm' (a seeded non-trivial affine), a dict
  (store/_finalnorm.py) or None (a run written before final norms were saved).
* Manifest: `model`, `params`, `random_weights` (weights 'random', else 'pretrained'), `subset`,
  `policy` (default: 'all' when every token is stored, 'sample' with `unstored`, else
  'summary'), img_size = grid x patch, `native_img_size` (True: that size; an int: that value;
  False: absent, as in runs extracted before tokenlake recorded it), `config`
  (manifest['config']), a token_layout (`layout` overrides it), data_config (ImageNet mean/std),
  then `manifest_extra` over all of it.

Two presets are `synthetic_run` with other defaults (functools.partial: any keyword overrides):
`tiny_run`, the store and SQL tests' run (3 images of 1 cls + 4 registers + 4 x 4 patches of
2 px = 21 tokens, D 8 (image arrays too), gamma norms and no planted outlier, attention noise,
model 'toy' without a parameter count, random weights, no final norm), and `probe_run`, what the probes read (planted embeddings over random
pixels, 300 images of 8 x 8 patches, no register, normal patches at norm 10 and, in 80 % of the
images, one outlier in [100, 101), so with 64 patches the 98th percentile sits on the normals;
model 'planted').

`seed` fixes the "model" (E, C, the register classes, the final norm's affine) and, unless
`image_seed` is given, the images; two runs with one seed and different image_seeds are one model
over different images (a training run and its test run).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["OUTLIER_CELLS", "SyntheticRun", "probe_run", "synthetic_probe_result", "synthetic_run",
           "tiny_run"]

OUTLIER_CELLS = ((1, 1), (1, 3), (3, 2))  # (row, col) of the default planted outliers, image 0
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
NORMS = ("uniform", "gaussian", "gamma", "constant")
ATTENTION = ("same", "elsewhere", "noise")
STORE = ("all", "prefix", "none")


class SyntheticRun(dict):
    """`write_run`'s keyword arguments (images, tokens, errors, arrays, manifest, and blocks and
    final_norm when the run has them), plus `truth`: what was planted (label [n_images],
    outlier [n_images, grid * grid], image_id, dim (token width), n_classes)."""

    def __init__(self, kwargs: dict[str, Any], truth: dict[str, Any]):
        super().__init__(kwargs)
        self.truth = truth

    def write(self, lake: str | Path, run: str, **kw: Any) -> SyntheticRun:
        """`write_run(lake, run, **self, **kw)` (kw: e.g. shard_size); returns self."""
        from tokenlake.store._write_run import write_run

        write_run(lake, run, **self, **kw)
        return self


def synthetic_run(
    *,
    n_images: int = 6,
    error_ids: Sequence[int] = (),
    grid: int = 5,
    n_reg: int = 1,
    patch: int = 4,
    norms: str = "uniform",
    norm_scale: float = 1.0,
    outlier_cells: Sequence[tuple[int, int]] | None = None,
    p_outlier: float | None = None,
    outlier_norm: float = 1000.0,
    outlier_spread: float = 0.0,
    attention: str = "same",
    store: str = "all",
    unstored: float = 0.0,
    embeddings: str = "random",
    dim: int = 8,
    pos_dim: int = 20,
    class_scale: float = 3.0,
    noise: float = 0.05,
    graded_noise: float | None = None,
    token_scale: float | None = None,
    pixels: str = "grid",
    img_dim: int = 16,
    labels: bool = True,
    n_classes: int = 4,
    register_signal: bool = True,
    blocks: int = 0,
    emerge_at: int | None = None,
    final_norm: str | Mapping[str, Any] | None = "identity",
    model: str = "dinov2_s",
    params: int | None = 22_000_000,
    random_weights: bool = False,
    subset: str = "planted",
    policy: str | None = None,
    native_img_size: int | bool = True,
    config: Mapping[str, Any] | None = None,
    layout: Mapping[str, Any] | None = None,
    manifest_extra: Mapping[str, Any] | None = None,
    source_prefix: str = "img",
    seed: int = 0,
    image_seed: int | None = None,
) -> SyntheticRun:
    """A run with the planted structure of the module doc; `.write(lake, run)` writes it."""
    _check(norms, NORMS, "norms")
    _check(attention, ATTENTION, "attention")
    _check(store, STORE, "store")
    _check(embeddings, ("random", "planted"), "embeddings")
    _check(pixels, ("grid", "random"), "pixels")
    n_inputs = n_images + len(error_ids)
    errs = sorted({int(i) for i in error_ids})
    if len(errs) != len(error_ids) or (errs and not 0 <= errs[0] <= errs[-1] < n_inputs):
        raise ValueError(f"error_ids must be distinct positions in 0..{n_inputs - 1} "
                         f"(n_images + len(error_ids) inputs), got {tuple(error_ids)}")
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    if p_outlier is not None and outlier_cells is not None:
        raise ValueError("give outlier_cells (planted in the first image) or p_outlier (one "
                         "random cell per image), not both")
    cells = tuple(OUTLIER_CELLS if outlier_cells is None and p_outlier is None
                  else outlier_cells or ())
    if any(not (0 <= r < grid and 0 <= c < grid) for r, c in cells):
        raise ValueError(f"outlier_cells {cells} must lie in the {grid} x {grid} grid")
    if emerge_at is not None and not 0 <= emerge_at < blocks:
        raise ValueError(f"emerge_at must be a block in 0..{blocks - 1}, got {emerge_at}")
    if graded_noise is not None and (embeddings != "planted" or norms != "uniform"):
        raise ValueError("graded_noise needs embeddings='planted' and norms='uniform'")
    if token_scale is not None and embeddings != "planted":
        raise ValueError("token_scale needs embeddings='planted'")

    mrng = np.random.default_rng(seed)  # the "model"
    irng = np.random.default_rng([seed, 0 if image_seed is None else image_seed + 1])
    n_pre, n_patch = 1 + n_reg, grid * grid
    n_tok = n_pre + n_patch
    ids = np.array([i for i in range(n_inputs) if i not in set(errs)], np.int64)
    label = irng.integers(0, n_classes, n_images)

    # norms and outliers
    u = irng.random((n_images, n_patch))
    norm = np.empty((n_images, n_tok), np.float64)
    norm[:, 0], norm[:, 1:n_pre] = 50.0, 200.0
    norm[:, n_pre:] = {"uniform": lambda: 10.0 + 10.0 * u,
                       "gaussian": lambda: irng.normal(15.0, 1.5, u.shape).clip(5.0, None),
                       "gamma": lambda: irng.gamma(4.0, 10.0, u.shape),
                       "constant": lambda: np.full(u.shape, 10.0)}[norms]()
    outlier = np.zeros((n_images, n_patch), bool)
    if p_outlier is not None:
        if not 0.0 <= p_outlier <= 1.0:
            raise ValueError(f"p_outlier must be in [0, 1], got {p_outlier}")
        has = irng.random(n_images) < p_outlier
        outlier[np.flatnonzero(has), irng.integers(0, n_patch, n_images)[has]] = True
    else:
        for r, c in cells:
            outlier[0, r * grid + c] = True
    norm[:, n_pre:][outlier] = outlier_norm + outlier_spread * irng.random(int(outlier.sum()))
    cos = irng.uniform(0.0, 0.8, (n_images, n_tok))
    cos[:, n_pre:][outlier] = 0.95
    attn = irng.uniform(0.0, 0.1, (n_images, n_tok))
    img_of, cell_of = np.nonzero(outlier)
    if attention == "same":
        attn[img_of, n_pre + cell_of] = 0.9
    elif attention == "elsewhere":
        r, c = np.divmod(cell_of, grid)
        attn[(img_of + 1) % n_images, n_pre + (grid - 1 - r) * grid + (grid - 1 - c)] = 0.9

    # pixels
    kinds = np.array(["cls"] + ["reg"] * n_reg + ["patch"] * n_patch)
    rows = np.concatenate([np.zeros(n_pre, np.int64), np.repeat(np.arange(grid), grid)])
    cols = np.concatenate([np.zeros(n_pre, np.int64), np.tile(np.arange(grid), grid)])
    if pixels == "grid":
        px = np.empty((n_images, n_tok, patch, patch, 3), np.uint8)
        px[..., 0] = (40 * rows % 256)[None, :, None, None]
        px[..., 1] = (40 * cols % 256)[None, :, None, None]
        px[..., 2] = (30 * ids % 256)[:, None, None, None]
    else:
        px = irng.integers(0, 256, (n_images, n_tok, patch, patch, 3), dtype=np.uint8)
    px[:, :n_pre] = 0

    # which tokens keep an embedding
    is_patch = np.broadcast_to(kinds == "patch", (n_images, n_tok))
    stored = np.full((n_images, n_tok), store == "all")
    if store == "prefix":
        stored = ~is_patch.copy()
    if unstored:
        drop = irng.random((n_images, n_patch)) < unstored
        stored[:, n_pre:] &= ~(drop & ~outlier)
    stored = stored.reshape(-1)

    # embeddings
    width = dim
    emb = None
    if store != "none":
        if embeddings == "random":
            emb = irng.standard_normal((n_images * n_tok, dim)).astype(np.float32)
        else:
            emb, width = _planted_embeddings(
                mrng, irng, px, label, outlier, u, n_pre=n_pre, pos_dim=pos_dim,
                n_classes=n_classes, class_scale=class_scale, noise=noise,
                graded_noise=graded_noise, token_scale=token_scale)
    elif embeddings == "planted":
        width = pos_dim + patch * patch * 3 + (2 if token_scale is not None else 0)

    norm = (norm * norm_scale).astype(np.float32)
    slot = np.full(n_images * n_tok, -1, np.int64)
    slot[stored] = np.arange(int(stored.sum()))
    patch_flat = is_patch.reshape(-1)
    tokens = pa.table({
        "image_id": np.repeat(ids, n_tok),
        "token": np.tile(np.arange(n_tok, dtype=np.int32), n_images),
        "kind": pa.array(np.tile(kinds, n_images), pa.string()),
        "row": pa.array(np.tile(rows.astype(np.int16), n_images), mask=~patch_flat),
        "col": pa.array(np.tile(cols.astype(np.int16), n_images), mask=~patch_flat),
        "norm": norm.reshape(-1),
        "attn": attn.astype(np.float32).reshape(-1),
        "nbr_cos": pa.array(cos.astype(np.float32).reshape(-1), mask=~patch_flat),
        "slot": pa.array(slot, mask=~stored),
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
        "mean_patch_norm": pn.mean(1, dtype=np.float64).astype(np.float32),
    })
    err = np.array(errs, np.int64)
    errors = pa.table({
        "image_id": err,
        "source_index": err,
        "source_id": pa.array([f"{source_prefix}{i}.jpg" for i in err], pa.string()),
        "reason": pa.array(["unreadable"] * len(err), pa.string()),
    })
    arrays: dict[str, np.ndarray] = {
        "cls_post": irng.standard_normal((n_images, img_dim)).astype(np.float32),
        "patch_mean_post": irng.standard_normal((n_images, img_dim)).astype(np.float32),
    }
    if n_reg:  # only models with registers have registers_post
        reg = irng.standard_normal((n_images, n_reg, img_dim)).astype(np.float32)
        if register_signal:
            reg[:, 0] += 2.0 * mrng.standard_normal((n_classes, img_dim)).astype(np.float32)[label]
        arrays["registers_post"] = reg
    if emb is not None:
        arrays["tokens"] = emb[stored].astype(np.float16)
        arrays["pixels"] = px.reshape(-1, patch, patch, 3)[stored]

    manifest: dict[str, Any] = {
        "model": model, "timm_name": f"synthetic_{model}", "img_size": grid * patch,
        "subset": subset,
        "policy": policy or ("summary" if store != "all" else "sample" if unstored else "all"),
        "weights": "random" if random_weights else "pretrained",
        "random_weights": random_weights,
        "token_layout": {"family": "vit", "n_cls": 1, "n_reg": n_reg, "grid": [grid, grid],
                         "cell": patch, "pixel_offset": 0, "embed_dim": width,
                         "depth": max(blocks, 1), **(layout or {})},
        "data_config": {"img_size": grid * patch, "mean": list(MEAN), "std": list(STD)},
        "versions": {"tokenlake": "test"},
    }
    if native_img_size is not False:
        manifest["native_img_size"] = (grid * patch if native_img_size is True
                                       else int(native_img_size))
    if config is not None:
        manifest["config"] = dict(config)
    if params is not None:
        manifest["params"] = params
    manifest.update(manifest_extra or {})
    out: dict[str, Any] = {"images": images, "tokens": tokens, "errors": errors,
                           "arrays": arrays, "manifest": manifest}
    if blocks:
        out["blocks"] = _blocks(ids, norm, outlier, blocks=blocks, emerge_at=emerge_at,
                                n_pre=n_pre, outlier_norm=outlier_norm * norm_scale)
    fn = _final_norm(final_norm, width, mrng)
    if fn is not None:
        out["final_norm"] = fn
    truth = {"label": label, "outlier": outlier, "image_id": ids, "dim": width,
             "n_classes": n_classes}
    return SyntheticRun(out, truth)


def _check(value: str, allowed: tuple[str, ...], name: str) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _planted_embeddings(mrng, irng, px, label, outlier, u, *, n_pre, pos_dim, n_classes,
                        class_scale, noise, graded_noise, token_scale):
    """[n_images * n_tok, width] float32 embeddings of the module doc, and width."""
    n_images, n_tok = px.shape[:2]
    n_patch = n_tok - n_pre
    n_pix = int(np.prod(px.shape[2:]))
    width = pos_dim + n_pix
    E = mrng.standard_normal((n_patch, pos_dim)).astype(np.float32)
    C = mrng.standard_normal((n_classes, pos_dim)).astype(np.float32)
    C /= np.linalg.norm(C, axis=1, keepdims=True) / np.sqrt(pos_dim)
    pix = ((px.astype(np.float32) / 255.0 - np.array(MEAN, np.float32))
           / np.array(STD, np.float32)).reshape(n_images, n_tok, n_pix)
    emb = np.zeros((n_images, n_tok, width), np.float32)
    emb[:, :n_pre] = irng.standard_normal((n_images, n_pre, width))
    emb[:, n_pre:, :pos_dim] = E[None] + noise * irng.standard_normal((n_images, n_patch, pos_dim))
    emb[:, n_pre:, pos_dim:] = pix[:, n_pre:]
    if graded_noise is not None:  # higher norm (u), cleaner position
        emb[:, n_pre:, :pos_dim] += (graded_noise * (1.0 - u))[..., None] * irng.standard_normal(
            (n_images, n_patch, pos_dim))
    img, cell = np.nonzero(outlier)
    emb[img, n_pre + cell, :pos_dim] = (E[irng.integers(0, n_patch, img.size)]
                                        + class_scale * C[label[img]])
    emb[img, n_pre + cell, pos_dim:] = 2.0 * irng.standard_normal((img.size, n_pix))
    emb = emb.reshape(-1, width)
    if token_scale is not None:
        emb = _scale_invariant(emb) * np.exp(
            irng.uniform(-1, 1, (len(emb), 1)) * np.log(token_scale)).astype(np.float32)
    return emb, emb.shape[1]


def _scale_invariant(x: np.ndarray) -> np.ndarray:
    """x [n, d] -> [n, d + 2]: two filler values per row make every row's mean 0 and its sum of
    squares the same, so a LayerNorm maps each row to one fixed multiple of itself."""
    s, q = x.sum(1, dtype=np.float64), np.square(x, dtype=np.float64).sum(1)
    k = float((q + s**2 / 2).max()) * 1.1  # a + b = -s, a^2 + b^2 = k - q needs 2(k - q) >= s^2
    root = np.sqrt(2 * (k - q) - s**2)
    return np.concatenate([x, np.stack([(-s + root) / 2, (-s - root) / 2], 1)], 1).astype(
        np.float32)


def _blocks(ids, norm, outlier, *, blocks, emerge_at, n_pre, outlier_norm) -> pa.Table:
    """The blocks table of the module doc, sorted by (image_id, block, token)."""
    n_images, n_tok = norm.shape
    f = norm[:, None, :] * np.arange(1, blocks + 1, dtype=np.float32)[None, :, None]
    if emerge_at is not None:
        img, cell = np.nonzero(outlier)
        first = np.arange(img.size) == 0  # the first outlier emerges one block early
        for b in range(blocks):
            f[img, b, n_pre + cell] = np.where(b >= emerge_at - first, outlier_norm, 15.0)
    last = np.arange(blocks) == blocks - 1
    qkv = [np.where(last[None, :, None], norm[:, None, :] * k, np.nan).astype(np.float32)
           for k in (1, 2, 3)]
    mask = np.broadcast_to(~last[None, :, None], f.shape).reshape(-1)
    return pa.table({
        "image_id": np.repeat(ids, blocks * n_tok),
        "block": np.tile(np.repeat(np.arange(blocks, dtype=np.int16), n_tok), n_images),
        "token": np.tile(np.arange(n_tok, dtype=np.int32), n_images * blocks),
        "norm": f.astype(np.float32).reshape(-1),
        "q_norm": pa.array(qkv[0].reshape(-1), mask=mask),
        "k_norm": pa.array(qkv[1].reshape(-1), mask=mask),
        "v_norm": pa.array(qkv[2].reshape(-1), mask=mask),
    })


def _final_norm(kind: str | Mapping[str, Any] | None, dim: int, rng) -> dict[str, Any] | None:
    if kind is None or isinstance(kind, Mapping):
        return None if kind is None else dict(kind)
    if kind == "identity":
        return {"type": "identity", "dim": dim}
    if kind == "layer_norm":  # a non-trivial affine: a fresh LayerNorm's would hide its absence
        return {"type": "layer_norm", "dim": dim, "eps": 1e-6,
                "weight": rng.uniform(0.5, 2.0, dim).astype(np.float32),
                "bias": rng.standard_normal(dim).astype(np.float32)}
    raise ValueError(f"final_norm {kind!r}: 'identity', 'layer_norm', a dict or None")


tiny_run = partial(synthetic_run, n_images=3, grid=4, n_reg=4, patch=2, img_dim=8, norms="gamma",
                   outlier_cells=(), attention="noise", model="toy", params=None,
                   random_weights=True, final_norm=None)
probe_run = partial(synthetic_run, n_images=300, grid=8, n_reg=0, patch=2, embeddings="planted",
                    pixels="random", norms="constant", p_outlier=0.8, outlier_norm=100.0,
                    outlier_spread=1.0,
                    model="planted", params=None)


def synthetic_probe_result(lake: Any, run: str, probe: str, *,
                           values: Mapping[tuple[str, str], float],
                           config: Mapping[str, Any] | None = None,
                           choices: Mapping[str, Any] | None = None) -> str:
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
                       result={"metrics": metrics, "config": cfg, "choices": dict(choices or {})},
                       rows=[(g, m, v) for (g, m), v in values.items()])
    return h
