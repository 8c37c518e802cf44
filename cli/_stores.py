"""The pixel stores an experiment shares: each (subset, resize recipe) that two or more of its runs
read is decoded once, before those runs, instead of once per run."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from tokenlake.extract import DataConfig, check_decoder, data_config, meta_backbone, resolve_model

PIXEL_KEYS = {"decoder", "min_runs"}


@dataclass(frozen=True)
class StoreSpec:
    subset: str
    cfg: DataConfig  # the recipe: size, interpolation, crop
    runs: tuple[str, ...]  # the runs that read it


@functools.cache
def _config(alias: str, px: int, preprocess: str) -> DataConfig:
    return data_config(meta_backbone(resolve_model(alias), px), img_size=px, preprocess=preprocess)


def pixel_options(raw: dict, where: str) -> dict:
    """The `[pixels]` table: decoder (pil | torchvision, default pil), min_runs (default 2)."""
    unknown = set(raw) - PIXEL_KEYS
    if unknown:
        raise ValueError(f"{where}: [pixels] has unknown key(s) {sorted(unknown)}; "
                         f"known: {sorted(PIXEL_KEYS)}")
    options = {"decoder": check_decoder(raw.get("decoder", "pil")),
               "min_runs": int(raw.get("min_runs", 2))}
    if options["min_runs"] < 1:
        raise ValueError(f"{where}: [pixels] min_runs must be at least 1")
    return options


def shared_stores(runs, *, min_runs: int) -> list[StoreSpec]:
    """Stores read by at least `min_runs` runs. keep-if-outlier runs do not count: they walk an
    unknown prefix of their subset (a 200k selection reads part of the 1.28M training images), so
    decoding all of it ahead would be waste."""
    groups: dict[tuple, list] = {}
    for run in runs:
        if run.keep_if_outlier:
            continue
        cfg = _config(run.model, run.img_size or resolve_model(run.model).img_size,
                      run.preprocess)
        key = (run.subset, cfg.img_size, cfg.interpolation, cfg.crop_pct, cfg.crop_mode)
        groups.setdefault(key, []).append((run, cfg))
    return [StoreSpec(members[0][0].subset, members[0][1], tuple(r.name() for r, _ in members))
            for members in groups.values() if len(members) >= min_runs]
