"""Public helpers of tokenlake.extract that combine private steps: what the command line calls,
so a notebook can do the same."""

from __future__ import annotations

from importlib.metadata import version

from tokenlake import store


def library_versions() -> dict[str, str]:
    """The versions a run's config records: torch, timm and tokenlake. Resuming a run whose
    config holds others is refused unless asked (`ExtractRequest(allow_version_change=True)`,
    `--allow-version-change`)."""
    import timm
    import torch

    return {"tokenlake": version("tokenlake"), "timm": timm.__version__,
            "torch": torch.__version__}


def build_pixels(lake: str, subset: str, model: str, *, img_size: int | None = None,
                 preprocess: str = "model", decoder: str = "pil", device: str | None = None,
                 decode_workers: int | None = None, shard_size: int | None = None,
                 quiet: bool = False) -> store.PixelStore:
    """Decode `subset` once into the lake's pixel store with `model`'s input recipe (its size,
    interpolation and crop at `img_size`, default the alias's; `preprocess` as extraction's), so
    every extraction with that recipe reads it (`tokenlake pixels`). Returns the complete store.

    decoder 'pil' decodes on `decode_workers` processes (default: every core); 'torchvision'
    decodes JPEGs on `device` (default cuda if present) with `decode_workers` file-reading
    threads, into a store of its own that only `decoder='torchvision'` extractions read."""
    from tokenlake.extract._models import meta_backbone, resolve_model
    from tokenlake.extract._pixelstore import build_pixel_store
    from tokenlake.extract._preprocess import data_config

    if device is not None and decoder == "pil":
        raise ValueError("device goes with decoder 'torchvision' (PIL decodes on the CPU cores)")
    spec = resolve_model(model)
    px = img_size or spec.img_size
    cfg = data_config(meta_backbone(spec, px), img_size=px, preprocess=preprocess)
    return build_pixel_store(str(lake), subset, cfg, shard_size=shard_size,
                             workers=decode_workers, quiet=quiet, decoder=decoder, device=device)
