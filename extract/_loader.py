"""Decoding in worker processes, in batches that never straddle a shard.

Each item is decoded on its own, so one bad file becomes one ``errors`` row, never a stopped run.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tokenlake.extract._decode import ImageRejected, decode_image
from tokenlake.extract._preprocess import DataConfig, Resizer
from tokenlake.extract._sources import open_source

# batches each DataLoader worker decodes ahead: enough to ride out a slow file; benchmarks size
# their runs past what the workers decode before the first batch is timed
PREFETCH_FACTOR = 4


@dataclass(frozen=True)
class InputRow:
    image_id: int
    source_index: int
    source_id: str
    label: int | None


class _DecodeDataset(Dataset):
    def __init__(self, *, data: str, split: str | None, rows: list[InputRow], cfg: DataConfig):
        self.data, self.split, self.rows, self.cfg = data, split, rows, cfg
        self._source = None
        self._resizer = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        if self._source is None:  # opened lazily: once per worker process
            self._source = open_source(self.data, split=self.split)
            self._resizer = Resizer(self.cfg)
        row = self.rows[i]
        item = {"row": row, "pixels": None, "reason": None, "width": 0, "height": 0}
        try:
            record = self._source.record(row.source_index)
            decoded = decode_image(record.data)
            item["pixels"] = self._resizer(decoded.image)
            item["width"], item["height"] = decoded.width, decoded.height
        except ImageRejected as err:
            item["reason"] = err.reason
        except Exception as err:  # noqa: BLE001 - a broken record costs one row, not the run
            item["reason"] = f"{type(err).__name__}: {err}"
        return item


@dataclass
class Batch:
    shard: int
    rows: list[InputRow]  # decoded images, in order
    pixels: torch.Tensor  # uint8 [B, H, W, 3] (pinned when feeding a GPU)
    sizes: list[tuple[int, int]]  # original (width, height)
    errors: list[tuple[InputRow, str]]

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True) in the main process
        if self.pixels.numel():
            self.pixels = self.pixels.pin_memory()
        return self


def _collate(items: list[dict], *, shard_of) -> Batch:
    good = [it for it in items if it["pixels"] is not None]
    pixels = torch.from_numpy(np.stack([it["pixels"] for it in good])) if good else torch.empty(0)
    return Batch(
        shard=shard_of(items[0]["row"].image_id),
        rows=[it["row"] for it in good],
        pixels=pixels,
        sizes=[(it["width"], it["height"]) for it in good],
        errors=[(it["row"], it["reason"]) for it in items if it["pixels"] is None],
    )


class _ShardBatches(torch.utils.data.Sampler):
    """Index batches of at most ``batch_size`` that stay inside one shard."""

    def __init__(self, shard_of_row: list[int], batch_size: int):
        self.batches: list[list[int]] = []
        current: list[int] = []
        for i, shard in enumerate(shard_of_row):
            if current and (len(current) == batch_size or shard_of_row[current[0]] != shard):
                self.batches.append(current)
                current = []
            current.append(i)
        if current:
            self.batches.append(current)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Collate:  # a class, not a closure: worker processes pickle it
    def __init__(self, shard_size: int):
        self.shard_size = shard_size

    def __call__(self, items):
        return _collate(items, shard_of=lambda i: i // self.shard_size)


def usable_cpus() -> int:
    """CPUs this process may run on: under SLURM (or taskset, or a container's cpuset) the job's
    allocation, which `os.cpu_count()` ignores (it counts the whole node, and a pool sized from it
    oversubscribes the cores the job was given)."""
    if hasattr(os, "sched_getaffinity"):  # Linux; macOS and Windows have no affinity mask
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    return max(1, min(8, usable_cpus() - 1))


class _StoreBatches:
    """Batches read from the pixel store by two threads: slices of memory-mapped shards copied
    straight into (pinned) batch tensors, a few batches ahead.

    No worker processes: for 224 px batches of 256 a DataLoader moved 2,000-4,000 img/s with 1-2
    workers (per-item calls, collation and the copy through shared memory), the same reads in the
    main process 9,000-13,000 img/s; threads keep that and take it off the main thread (numpy's
    copies release the GIL).
    """

    def __init__(self, *, lake: str, name: str, rows: list[InputRow], shard_size: int,
                 batch_size: int, pin: bool, threads: int = 2, ahead: int = 4) -> None:
        from tokenlake.store import PixelStore

        self.store = PixelStore(lake, name)
        self.rows, self.shard_size, self.pin = rows, shard_size, pin
        self.threads, self.ahead = threads, ahead
        self.index = _ShardBatches([r.image_id // shard_size for r in rows], batch_size).batches

    def __len__(self) -> int:
        return len(self.index)

    def __iter__(self):
        todo = iter(self.index)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="pixel-store") as pool:
            queued = deque(pool.submit(self._read, i) for i in islice(todo, self.ahead))
            while queued:
                batch = queued.popleft().result()
                if (nxt := next(todo, None)) is not None:
                    queued.append(pool.submit(self._read, nxt))
                yield batch

    def _read(self, index: list[int]) -> Batch:
        rows = [self.rows[i] for i in index]
        pos = np.array([r.image_id for r in rows], dtype=np.int64)
        side = self.store.recipe_cached["img_size"]
        out = torch.empty((pos.size, side, side, 3), dtype=torch.uint8, pin_memory=self.pin)
        _, sizes, reasons = self.store.read_many(pos, out=out.numpy())
        good = [k for k, why in enumerate(reasons) if why is None]
        pixels = out
        if len(good) < pos.size:  # failed inputs have no pixels
            pixels = out[torch.tensor(good, dtype=torch.long)]
            pixels = pixels.pin_memory() if self.pin else pixels
        return Batch(shard=int(pos[0]) // self.shard_size, rows=[rows[k] for k in good],
                     pixels=pixels, sizes=[(int(sizes[k, 0]), int(sizes[k, 1])) for k in good],
                     errors=[(rows[k], why) for k, why in enumerate(reasons) if why is not None])


def batches(*, data: str, split: str | None, rows: list[InputRow], cfg: DataConfig,
            shard_size: int, batch_size: int, workers: int, pin: bool,
            pixel_store: tuple[str, str] | None = None):
    """Batches of decoded inputs; read from the pixel store (lake, name) when one is given, else
    decoded by `workers` DataLoader processes."""
    if pixel_store is not None:
        return _StoreBatches(lake=pixel_store[0], name=pixel_store[1], rows=rows,
                             shard_size=shard_size, batch_size=batch_size, pin=pin)
    dataset = _DecodeDataset(data=data, split=split, rows=rows, cfg=cfg)
    sampler = _ShardBatches([r.image_id // shard_size for r in rows], batch_size)
    # The workers fork even when CUDA is up (the model is on the device by now): they never
    # touch CUDA (pinning runs in this process's pin-memory thread), which is what makes fork
    # safe, and a forked worker shares `rows` (millions of inputs) instead of unpickling them
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers,
        collate_fn=_Collate(shard_size), pin_memory=pin,
        prefetch_factor=PREFETCH_FACTOR if workers else None,
    )
