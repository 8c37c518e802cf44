"""Decode a subset once per resize recipe into the lake's pixel store, with every CPU core.

Each worker process owns whole shards (decode -> timm resize/crop -> uint8), so the store is the
same whatever the number of workers, and an interrupted build resumes at the first missing shard.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import multiprocessing
import os

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from tokenlake import store
from tokenlake.extract._decode import ImageRejected, decode_image
from tokenlake.extract._preprocess import DataConfig, Resizer
from tokenlake.extract._sources import open_source


def _context():
    """fork where the platform has it: decoding never touches CUDA, and workers start in
    milliseconds instead of re-importing torch."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def recipe(*, subset: str, checksum: str, n: int, cfg: DataConfig, shard_size: int) -> dict:
    return {"subset": subset, "subset_checksum": checksum, "n": n, "shard_size": shard_size,
            "img_size": cfg.img_size, "interpolation": cfg.interpolation,
            "crop_pct": cfg.crop_pct, "crop_mode": cfg.crop_mode}


@functools.cache
def _open_source(data: str, split: str | None):
    return open_source(data, split=split)  # once per worker process, not once per shard


def _decode_shard(lake: str, name: str, data: str, split: str | None, indices: list[int | str],
                  shard: int, cfg: DataConfig) -> int:
    """Decode one shard. `indices` are source indices, or file paths already resolved by the
    parent (image folders), which spares every worker from indexing the dataset again."""
    pixel_store = store.PixelStore(lake, name)
    size = cfg.img_size
    resize = Resizer(cfg)
    lo = shard * pixel_store.recipe()["shard_size"]
    pixels = np.zeros((len(indices), size, size, 3), np.uint8)
    widths, heights, reasons = [], [], []
    for k, index in enumerate(indices):
        w = h = 0
        reason = None
        try:
            item = index if isinstance(index, str) else _open_source(data, split).record(index).data
            decoded = decode_image(item)
            pixels[k] = resize(decoded.image)
            w, h = decoded.width, decoded.height
        except ImageRejected as err:
            reason = err.reason
        except Exception as err:  # noqa: BLE001 - one broken record costs one row, not the store
            reason = f"{type(err).__name__}: {err}"
        widths.append(w)
        heights.append(h)
        reasons.append(reason)
    meta = pa.table({"position": np.arange(lo, lo + len(indices), dtype=np.int64),
                     "width": np.array(widths, np.int32), "height": np.array(heights, np.int32),
                     "reason": pa.array(reasons, pa.string())})
    pixel_store.write_shard(shard, pixels=pixels, meta=meta)
    return len(indices)


def _local_paths(data: str, split: str | None, indices: list[int]) -> list[str] | None:
    """File paths of an image-folder subset (None for datasets that hold bytes, e.g. the hub)."""
    source = _open_source(data, split)
    first = source.record(indices[0]).data if indices else None
    if not isinstance(first, str):
        return None
    return [str(source.record(i).data) for i in indices]


def build_pixel_store(lake: str, subset_name: str, cfg: DataConfig, *, shard_size: int = 256,
                      workers: int | None = None, quiet: bool = False) -> store.PixelStore:
    """Build (or finish) the store for this subset and recipe; returns it."""
    subset = store.read_subset(lake, subset_name)
    indices = subset.column("source_index").to_pylist()
    rec = recipe(subset=subset_name, checksum=store.subset_checksum(lake, subset_name),
                 n=len(indices), cfg=cfg, shard_size=shard_size)
    name = store.pixel_store_name(subset_name, rec)
    pixel_store = store.PixelStore(lake, name)
    pixel_store.create(rec)
    data = subset.column("source")[0].as_py()
    split = subset.column("split")[0].as_py()
    todo = sorted(set(range(pixel_store.n_shards)) - pixel_store.committed())
    workers = workers or max(1, os.cpu_count() or 1)
    bar = tqdm(total=len(indices), unit="img", desc=f"pixels {name}", disable=quiet,
               initial=len(indices) - sum(len(indices[s * shard_size:(s + 1) * shard_size])
                                          for s in todo))
    items = _local_paths(data, split, indices) or indices
    args = [(lake, name, data, split, items[s * shard_size:(s + 1) * shard_size], s, cfg)
            for s in todo]
    try:
        if workers == 1:
            for a in args:
                bar.update(_decode_shard(*a))
        else:
            with cf.ProcessPoolExecutor(workers, mp_context=_context()) as pool:
                for done in cf.as_completed([pool.submit(_decode_shard, *a) for a in args]):
                    bar.update(done.result())
    finally:
        bar.close()
    return pixel_store


def find_pixel_store(lake: str, subset_name: str, cfg: DataConfig) -> store.PixelStore | None:
    """The complete store matching this subset (same checksum) and recipe, if one was built."""
    root = store.PixelStore(lake, "x").dir.parent
    checksum = store.subset_checksum(lake, subset_name)
    for folder in sorted(root.glob(f"{subset_name}-*")) if root.is_dir() else []:
        candidate = store.PixelStore(lake, folder.name)
        rec = candidate.recipe() or {}
        expected = recipe(subset=subset_name, checksum=checksum, n=rec.get("n", -1), cfg=cfg,
                          shard_size=rec.get("shard_size", -1))
        if rec == expected and candidate.is_complete():
            return candidate
    return None


def _decode_resize(args: tuple[str, DataConfig]) -> int:
    path, cfg = args
    return Resizer(cfg)(decode_image(path).image).size


def decode_capacity(paths: list[str], cfg: DataConfig, *, workers: int) -> float:
    """img/s of decode + resize on `workers` processes, nothing written: the node's ceiling for
    building a pixel store (what `make bench` holds the build to)."""
    import time

    with cf.ProcessPoolExecutor(workers, mp_context=_context()) as pool:
        list(pool.map(_decode_resize, [(paths[0], cfg)] * workers))  # start every worker first
        start = time.perf_counter()
        list(pool.map(_decode_resize, [(p, cfg) for p in paths], chunksize=8))
        return len(paths) / (time.perf_counter() - start)
