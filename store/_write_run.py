"""write_run: put a run computed elsewhere (JAX, another toolkit) into the lake in one call."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tokenlake.store._errors import ContractError
from tokenlake.store._layout import ArraySpec
from tokenlake.store._schema import TABLE_SCHEMAS, conform, to_arrow
from tokenlake.store._writer import RunWriter

TOKEN_ARRAYS = ("tokens", "pixels")
# images columns that are functions of the tokens table: derived when left out, checked when given
SUMMARY_COLUMNS = ("n_tokens", "max_patch_norm", "mean_patch_norm")
SUMMARY_RTOL = 1e-5  # float32 means summed in another order differ by a few ulps


def write_run(
    lake: str | Path,
    run: str,
    *,
    images: Any,
    tokens: Any,
    arrays: Mapping[str, np.ndarray],
    manifest: Mapping[str, Any],
    errors: Any | None = None,
    blocks: Any | None = None,
    shard_size: int | None = None,
    final_norm: Mapping[str, Any] | None = None,
) -> Path:
    """Validate a whole run against the contract and write it through RunWriter; returns manifest.json.

    tokens.slot are rows of arrays['tokens'] / arrays['pixels'] (dense, [S, ...]); every other array
    is per image and aligned with the rows of `images`. `manifest` doubles as the run's config:
    calling again with the same manifest is a no-op, with a different one raises RunExists.
    `final_norm` (store/_finalnorm.py) is the model's final norm; without it the run's output
    tokens (`Lake.gather(..., tokens="post")`) are unavailable.

    The per-image summaries `images.n_tokens`, `max_patch_norm` and `mean_patch_norm` are
    functions of `tokens`: a column left out is derived from it, a given one must agree with it
    (ContractError naming the first image that does not, before anything is written).
    """
    tokens = conform(tokens, "tokens")
    images = conform(with_image_summaries(images, tokens), "images")
    errors = conform(
        errors if errors is not None else TABLE_SCHEMAS["errors"].empty_table(), "errors"
    )
    blocks = conform(blocks, "blocks") if blocks is not None else None
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    specs = {}
    for name, a in arrays.items():
        if a.ndim < 2:
            raise ContractError(
                f"arrays[{name!r}]: needs at least 2 dimensions (rows, ...), got shape {a.shape}"
            )
        kind = "token" if name in TOKEN_ARRAYS else "image"
        specs[name] = ArraySpec(shape=a.shape[1:], dtype=a.dtype.name, kind=kind)
    n_slots = {a.shape[0] for n, a in arrays.items() if n in TOKEN_ARRAYS}
    if len(n_slots) > 1:
        raise ContractError(
            f"arrays 'tokens' and 'pixels' must have the same number of rows, got {sorted(n_slots)}"
        )
    n_total_slots = n_slots.pop() if n_slots else 0

    img_ids = images.column("image_id").to_numpy()
    err_ids = errors.column("image_id").to_numpy()
    all_ids = np.concatenate([img_ids, err_ids])
    if all_ids.size == 0:
        raise ContractError("write_run: no images and no errors; nothing to write")
    if all_ids.min() < 0:
        raise ContractError(f"image_id must be >= 0, got {int(all_ids.min())}")
    n_inputs = int(all_ids.max()) + 1
    ss = int(shard_size or n_inputs)
    n_shards = math.ceil(n_inputs / ss)

    slot = tokens.column("slot")
    slots = slot.drop_null().to_numpy()
    if slots.size and (slots.min() < 0 or slots.max() >= n_total_slots):
        raise ContractError(
            f"tokens.slot: out of range [0, {n_total_slots}) of arrays['tokens'] "
            f"(got [{slots.min()}, {slots.max()}])"
        )
    tok_shard = tokens.column("image_id").to_numpy() // ss
    slot_shard = tok_shard[pc.is_valid(slot).to_numpy(zero_copy_only=False)]
    per_shard = (
        np.bincount(slot_shard, minlength=n_shards) if slots.size else np.zeros(n_shards, int)
    )
    tpi = max(1, math.ceil(int(per_shard.max()) / ss)) if n_total_slots else 0

    writer = RunWriter(
        lake,
        run,
        config=manifest,
        shard_size=ss,
        n_shards=n_shards,
        tokens_per_image=tpi,
        arrays=specs,
    )
    img_shard, err_shard = img_ids // ss, err_ids // ss
    for i in range(n_shards):
        with writer.claim(i) as todo:
            if not todo:
                continue
            im = img_shard == i
            tk = tok_shard == i
            t = tokens.filter(pa.array(tk))
            shard_arrays = {}
            local = t.column("slot")
            if n_total_slots:
                g = local.to_numpy(zero_copy_only=False)
                valid = pc.is_valid(local).to_numpy(zero_copy_only=False)
                rows = np.sort(g[valid].astype(np.int64))
                loc = np.full(len(g), -1, np.int64)
                loc[valid] = np.searchsorted(rows, g[valid].astype(np.int64))
                local = pa.array(loc, mask=~valid)
                for n in TOKEN_ARRAYS:
                    if n in arrays:
                        shard_arrays[n] = arrays[n][rows]
            t = t.set_column(t.schema.get_field_index("slot"), "slot", local)
            for n, a in arrays.items():
                if n not in TOKEN_ARRAYS:
                    if a.shape[0] != len(img_ids):
                        raise ContractError(
                            f"arrays[{n!r}]: {a.shape[0]} rows but `images` has {len(img_ids)}; "
                            f"image arrays are aligned with the rows of `images`"
                        )
                    shard_arrays[n] = a[im]
            writer.write_shard(
                i,
                images=images.filter(pa.array(im)),
                tokens=t,
                errors=errors.filter(pa.array(err_shard == i)),
                arrays=shard_arrays,
                blocks=blocks.filter(pa.array(blocks.column("image_id").to_numpy() // ss == i))
                if blocks is not None
                else None,
            )
    if final_norm is not None:
        writer.write_final_norm(final_norm)
    return writer.commit(manifest)


def with_image_summaries(images: Any, tokens: pa.Table) -> pa.Table:
    """`images` (any table `conform` accepts) with SUMMARY_COLUMNS derived from `tokens` (a
    conformed tokens table) where absent, or checked where given: n_tokens = the image's token
    rows; max/mean_patch_norm = max/mean of its patch tokens' norm (NULL without patch tokens)."""
    images = to_arrow(images, "images")
    if "image_id" not in images.column_names:
        return images  # conform names the missing column
    ids = images.column("image_id").to_numpy(zero_copy_only=False).astype(np.int64)
    if np.unique(ids).size != ids.size:
        raise ContractError("images.image_id: duplicate ids; each image is one row")
    derived = _summaries(ids, tokens)
    for name in SUMMARY_COLUMNS:
        want, valid = derived[name]
        if name not in images.column_names:
            images = images.append_column(name, pa.array(want, mask=~valid))
            continue
        col = images.column(name)
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)
                or pa.types.is_null(col.type)):
            continue  # conform names the wrong type
        if col.null_count == len(col) and not valid.any():
            continue
        given_valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
        given = pc.fill_null(col, 0).to_numpy(zero_copy_only=False).astype(np.float64)
        if name == "n_tokens":
            agree = given_valid & (given == want)
        else:
            agree = (given_valid == valid) & (
                ~valid | np.isclose(given, want, rtol=SUMMARY_RTOL, atol=0.0))
        if not agree.all():
            k = int(np.flatnonzero(~agree)[0])
            got = f"{given[k]:.9g}" if given_valid[k] else "NULL"
            if name == "n_tokens":
                truth = f"it has {int(want[k])} token rows"
            else:
                stat = name.split("_")[0]
                truth = (f"the {stat} of its patch tokens' norm is {want[k]:.9g}" if valid[k]
                         else "it has no patch token")
            raise ContractError(
                f"images.{name} disagrees with the tokens table for {int((~agree).sum())} "
                f"image(s) (e.g. image_id {ids[k]}: {name} {got}, but {truth}); leave the "
                f"column out and write_run derives it"
            )
    return images


def _summaries(ids: np.ndarray, tokens: pa.Table) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (values, valid) per row of `ids`: token rows, and patch-norm max and mean."""
    n = len(ids)
    order = np.argsort(ids, kind="stable")

    def rows_of(image_id: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        t = image_id.to_numpy()
        pos = np.minimum(np.searchsorted(ids[order], t), max(n - 1, 0))
        known = (ids[order][pos] == t) if n else np.zeros(len(t), bool)
        return order[pos[known]], known

    row, _ = rows_of(tokens.column("image_id"))
    count = np.bincount(row, minlength=n).astype(np.int64)
    patch = tokens.filter(pc.equal(tokens.column("kind"), "patch"))
    agg = patch.group_by("image_id").aggregate([("norm", "max"), ("norm", "mean")])
    prow, known = rows_of(agg.column("image_id"))
    mx, mean, valid = np.zeros(n), np.zeros(n), np.zeros(n, bool)
    mx[prow] = agg.column("norm_max").to_numpy()[known]
    mean[prow] = agg.column("norm_mean").to_numpy()[known]
    valid[prow] = True
    return {"n_tokens": (count.astype(np.int32), np.ones(n, bool)),
            "max_patch_norm": (mx.astype(np.float32), valid),
            "mean_patch_norm": (mean.astype(np.float32), valid)}
