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
from tokenlake.store._schema import TABLE_SCHEMAS, conform
from tokenlake.store._writer import RunWriter

TOKEN_ARRAYS = ("tokens", "pixels")


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
    """
    images = conform(images, "images")
    tokens = conform(tokens, "tokens")
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
