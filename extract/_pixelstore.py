"""Decode a subset once per resize recipe into the lake's pixel store.

Two decoders, each its own recipe (their pixels differ by a few grey levels):

- "pil": every CPU core. Each worker process owns whole shards (decode -> timm resize/crop ->
  uint8), so the store is the same whatever the number of workers.
- "torchvision": one process; threads read the files (and their headers) while the device (a GPU
  where there is one) decodes JPEGs in batches and resizes them; other inputs go through the PIL
  path one by one (see `_tvdecode`), and writer threads hash and write finished shards.

Either way an interrupted build resumes at the first missing shard.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import functools
import multiprocessing
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from tokenlake import store
from tokenlake.extract._decode import decode_image
from tokenlake.extract._loader import usable_cpus
from tokenlake.extract._preprocess import DataConfig, Resizer
from tokenlake.extract._sources import image_folder_root, open_source
from tokenlake.extract._tvdecode import (
    DEFAULT_MEMORY_BUDGET,
    Decoded,
    TorchvisionDecoder,
    check_decoder,
    pil_row,
    read_input,
    sniff,
)


def pool_context():
    """fork where the platform has it and this process has not started CUDA: decoding never
    touches CUDA, and workers start in milliseconds instead of re-importing torch. A forked child
    of a process with a CUDA context inherits a context it cannot use (its first CUDA call, even
    one deep in a library, fails), so after CUDA: forkserver, whose server was never CUDA's."""
    methods = multiprocessing.get_all_start_methods()
    if torch.cuda.is_initialized():
        return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def recipe(*, subset: str, checksum: str, n: int, cfg: DataConfig, shard_size: int,
           decoder: str = "pil") -> dict:
    return {"subset": subset, "subset_checksum": checksum, "n": n, "shard_size": shard_size,
            "img_size": cfg.img_size, "interpolation": cfg.interpolation,
            "crop_pct": cfg.crop_pct, "crop_mode": cfg.crop_mode, "decoder": decoder}


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
    out = Decoded(np.zeros((len(indices), size, size, 3), np.uint8), [], [], [], [])
    for k, index in enumerate(indices):
        try:
            item = index if isinstance(index, str) else _open_source(data, split).record(index).data
        except Exception as err:  # noqa: BLE001 - one broken record costs one row, not the store
            row = (None, 0, 0, f"{type(err).__name__}: {err}")
        else:
            row = pil_row(item, resize)
        if row[0] is not None:
            out.pixels[k] = row[0]
        out.width.append(row[1])
        out.height.append(row[2])
        out.reason.append(row[3])
        out.decoder.append(None if row[0] is None else "pil")
    return _write(pixel_store, shard, out)


def _write(pixel_store: store.PixelStore, shard: int, out: Decoded) -> int:
    """Commit one decoded shard; returns its number of inputs."""
    lo = shard * pixel_store.recipe_cached["shard_size"]
    n = len(out.reason)
    meta = pa.table({"position": np.arange(lo, lo + n, dtype=np.int64),
                     "width": np.array(out.width, np.int32),
                     "height": np.array(out.height, np.int32),
                     "reason": pa.array(out.reason, pa.string()),
                     "decoder": pa.array(out.decoder, pa.string())})
    pixel_store.write_shard(shard, pixels=out.pixels, meta=meta)
    return n


def _local_paths(data: str, split: str | None, indices: list[int],
                 source_ids: list[str]) -> list[str] | None:
    """File paths of an image-folder subset (None for datasets that hold bytes, e.g. the hub).

    An image folder's source_id is the path relative to its root, so its paths need no indexing
    of the folder (which costs longer than decoding a few shards)."""
    root = image_folder_root(data, split)
    if root is not None:
        return [str(root / sid) for sid in source_ids]
    source = _open_source(data, split)  # here, so that forked workers inherit it
    first = source.record(indices[0]).data if indices else None
    if not isinstance(first, str):
        return None
    return [str(source.record(i).data) for i in indices]


def default_shard_size(n: int, *, workers: int, decoder: str) -> int:
    """PIL: whole shards are a worker's unit of work, so aim at >= 4 shards per worker (20 shards
    on 16 workers would run in two waves, the second a quarter busy), 16 to 256 images each.
    torchvision: 256, one device batch per shard."""
    if decoder == "torchvision":
        return 256
    return int(min(256, max(16, -(-n // (4 * workers)))))


def build_pixel_store(lake: str, subset_name: str, cfg: DataConfig, *,
                      shard_size: int | None = None, workers: int | None = None,
                      quiet: bool = False, decoder: str = "pil",
                      device: str | torch.device | None = None,
                      memory_budget: int | None = None, log=print) -> store.PixelStore:
    """Build (or finish) the store for this subset, recipe and decoder; returns it.

    decoder "pil": `workers` decoding processes (default: every core). decoder "torchvision":
    one process decoding on `device` (default cuda if present, else cpu), `workers` file-reading
    threads (default: every core, at most 16), decode+resize groups within `memory_budget` device
    bytes (default `DEFAULT_MEMORY_BUDGET`); the rows it left to PIL, and why, are logged.
    shard_size: by default the unfinished store's own, else `default_shard_size`."""
    check_decoder(decoder)
    subset = store.read_subset(lake, subset_name)
    indices = subset.column("source_index").to_pylist()
    if shard_size is None:
        probe = recipe(subset=subset_name, checksum="", n=0, cfg=cfg, shard_size=0, decoder=decoder)
        started = store.PixelStore(lake, store.pixel_store_name(subset_name, probe)).recipe()
        shard_size = started["shard_size"] if started else default_shard_size(
            len(indices), workers=workers or usable_cpus(), decoder=decoder)
    rec = recipe(subset=subset_name, checksum=store.subset_checksum(lake, subset_name),
                 n=len(indices), cfg=cfg, shard_size=shard_size, decoder=decoder)
    name = store.pixel_store_name(subset_name, rec)
    pixel_store = store.PixelStore(lake, name)
    pixel_store.create(rec)
    data = subset.column("source")[0].as_py()
    split = subset.column("split")[0].as_py()
    todo = sorted(set(range(pixel_store.n_shards)) - pixel_store.committed())
    bar = tqdm(total=len(indices), unit="img", desc=f"pixels {name}", disable=quiet,
               initial=len(indices) - sum(len(indices[s * shard_size:(s + 1) * shard_size])
                                          for s in todo))
    items = indices
    if todo:
        items = _local_paths(data, split, indices, subset.column("source_id").to_pylist()) or items
    if decoder == "torchvision":
        try:
            fallbacks = _build_torchvision(pixel_store, data, split, items, todo, cfg,
                                           device=device, threads=workers or _threads(), bar=bar,
                                           memory_budget=memory_budget or DEFAULT_MEMORY_BUDGET)
        finally:
            bar.close()
        if fallbacks and not quiet:
            log(f"pixels {name}: torchvision fallbacks "
                + ", ".join(f"{k} {v}" for k, v in sorted(fallbacks.items()))
                + " (the store's `decoder` column says which rows PIL made)")
        return pixel_store
    workers = workers or usable_cpus()
    args = [(lake, name, data, split, items[s * shard_size:(s + 1) * shard_size], s, cfg)
            for s in todo]
    try:
        if workers == 1:
            for a in args:
                bar.update(_decode_shard(*a))
        else:
            with cf.ProcessPoolExecutor(workers, mp_context=pool_context()) as pool:
                for done in cf.as_completed([pool.submit(_decode_shard, *a) for a in args]):
                    bar.update(done.result())
    finally:
        bar.close()
    return pixel_store


def _threads() -> int:
    return min(16, usable_cpus())


def _stream(chunks: list[list[int | str]], decoder: TorchvisionDecoder, *, threads: int,
            data: str | None = None, split: str | None = None) -> Iterator[Decoded]:
    """Decode `chunks` (file paths, or source indices of `data`) in order. Threads read the next
    chunk's bytes and headers while the device decodes this one."""
    def load(item: bytes | str) -> tuple[bytes | str, tuple[int, int] | None]:
        raw = read_input(item)
        return raw, sniff(raw, max_pixels=decoder.max_pixels)

    def read(chunk: list[int | str]) -> list[tuple[bytes | str, tuple[int, int] | None]]:
        if chunk and not isinstance(chunk[0], str):  # a dataset holding bytes (the hub)
            chunk = [r.data for r in _open_source(data, split).records(chunk)]
        return list(readers.map(load, chunk))

    with cf.ThreadPoolExecutor(threads) as readers, cf.ThreadPoolExecutor(1) as ahead:
        following = ahead.submit(read, chunks[0]) if chunks else None
        for i in range(len(chunks)):
            loaded = following.result()
            if i + 1 < len(chunks):
                following = ahead.submit(read, chunks[i + 1])
            yield decoder([raw for raw, _ in loaded], [header for _, header in loaded])


def _build_torchvision(pixel_store: store.PixelStore, data: str, split: str | None,
                       items: list[int | str], todo: list[int], cfg: DataConfig, *,
                       device: str | torch.device | None, threads: int, bar,
                       memory_budget: int) -> collections.Counter:
    """Returns the decoder's fallback counts (see `_tvdecode.FALLBACKS`)."""
    step = pixel_store.recipe_cached["shard_size"]
    decoder = TorchvisionDecoder(cfg, device=device, batch_size=step, memory_budget=memory_budget)
    chunks = [items[s * step:(s + 1) * step] for s in todo]
    writing: collections.deque[cf.Future] = collections.deque()
    # hashing and writing a shard runs beside the next shard's decoding (hashlib and file writes
    # release the GIL); at most a few decoded shards wait in memory
    n_writers = max(2, min(4, usable_cpus() // 4))
    with cf.ThreadPoolExecutor(n_writers) as writers:
        for shard, decoded in zip(todo, _stream(chunks, decoder, threads=threads, data=data,
                                                split=split)):
            writing.append(writers.submit(_write, pixel_store, shard, decoded))
            while len(writing) > n_writers:
                bar.update(writing.popleft().result())
        while writing:
            bar.update(writing.popleft().result())
    return decoder.fallbacks


def find_pixel_store(lake: str, subset_name: str, cfg: DataConfig, *,
                     decoder: str = "pil") -> store.PixelStore | None:
    """The complete store matching this subset (same checksum), recipe and decoder, if built."""
    check_decoder(decoder)
    root = store.PixelStore(lake, "x").dir.parent
    checksum = store.subset_checksum(lake, subset_name)
    for folder in sorted(root.glob(f"{subset_name}-*")) if root.is_dir() else []:
        candidate = store.PixelStore(lake, folder.name)
        rec = candidate.recipe() or {}
        expected = recipe(subset=subset_name, checksum=checksum, n=rec.get("n", -1), cfg=cfg,
                          shard_size=rec.get("shard_size", -1), decoder=decoder)
        if rec == expected and candidate.is_complete():
            return candidate
    return None


def _decode_resize(args: tuple[str, DataConfig]) -> int:
    path, cfg = args
    return Resizer(cfg)(decode_image(path).image).size


def decode_capacity(paths: list[str], cfg: DataConfig, *, workers: int, decoder: str = "pil",
                    device: str | torch.device | None = None, batch_size: int = 256) -> float:
    """img/s of reading + decoding + resizing `paths`, nothing written: the node's ceiling for
    building a pixel store with `decoder` (what `make bench` holds the build to). "pil": on
    `workers` processes; "torchvision": on `device`, with `workers` reading threads, in batches
    of `batch_size`, through the very code the build uses."""
    check_decoder(decoder)
    if decoder == "torchvision":
        tv = TorchvisionDecoder(cfg, device=device, batch_size=batch_size)
        for _ in _stream([paths[:32]], tv, threads=workers):  # CUDA context, nvjpeg, kernels
            pass
        chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
        start = time.perf_counter()
        for _ in _stream(chunks, tv, threads=workers):
            pass
        return len(paths) / (time.perf_counter() - start)
    with cf.ProcessPoolExecutor(workers, mp_context=pool_context()) as pool:
        list(pool.map(_decode_resize, [(paths[0], cfg)] * workers))  # start every worker first
        start = time.perf_counter()
        list(pool.map(_decode_resize, [(p, cfg) for p in paths], chunksize=8))
        return len(paths) / (time.perf_counter() - start)
