"""GPU extraction against the bare bf16 `forward_features` of the same model and batch (issue 5).

For each issue-5 model at its paper resolution (random weights, the same arithmetic as pretrained),
side by side in one run on one GPU:

- the bare bf16 `forward_features` rate at the extraction's batch size (warmed up), entering
  `inference_mode` and autocast per batch as the extraction does;
- the pixel store build against the node's decode capacity (>= 0.9x), capacity being the faster
  of PIL on every usable CPU core (`decode_capacity(..., workers=usable_cpus())`: the job's
  allocation under SLURM) and torchvision decoding on the GPU (`decode_capacity(...,
  decoder="torchvision", device="cuda")`, with the build's file-reading threads); the build uses
  the faster decoder;
- extraction fed from that store with policy `all`, `sample` (outlier_ref: the `all` run) and
  `summary`, each at its steady-state rate `manifest["loop_images"] / manifest["loop_time_s"]`
  (from the end of the first batch, the warm-up, to the last shard written; model
  construction excluded): >= 0.95x bare. When the bare
  rate times the `all` run's bytes per image exceeds the disk's sequential write bandwidth
  (measured here, fsync'd), the `all` row says so and holds the run to >= 0.9x of the disk,
  counting the bytes of the same timed batches (the warm-up batch's output excluded);
- for deit3_m and pvt_b2, extraction straight from the JPEG files (a lake without a store, policy
  `summary` so the disk is not a third limit): >= 0.9x of min(bare, decode capacity). Per-run
  decoding is PIL in DataLoader workers (torchvision decodes only into a store), so the capacity
  here is the CPU pool's. Those workers decode up to PREFETCH_FACTOR batches each during the
  warm-up batch, which is not timed, so this run has that many more images: the timed loop still
  decodes for ~`loop_s` (the row states the bound and the rate without the prefetched images, and
  says UNDERSIZED with ok None when the generated images are too few for that).

Images are generated JPEGs of ImageNet-like size (smooth scenes with edges, texture and sensor
noise, quality 90, ~110 KB); the mean size is a row. Each extraction loop is sized from the
measured bare rate to run `Sizes.loop_s` seconds (at least `min_batches` batches); the `all` run's
image count is capped so its output takes at most `all_disk_s` seconds of disk writing. A model
whose estimated time would end past `budget_s` is skipped with a NOT RUN note, so the bench ends
inside a short GPU session. Each row is measured on its own: a RuntimeError in one (a CUDA error,
out of device memory) makes that row FAILED with an `error` field, and the next rows still run
(those needing what it measured fail saying so); a model that fails otherwise gets FAILED rows
and the others still run. On a machine without CUDA every row says it did not run;
`measure(..., device="cpu")` runs the same code on the CPU (tests/test_bench_gpu.py).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import io
import math
import os
import shutil
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import _disk  # bench/_disk.py: bench/ is on sys.path under bench/run.py and the tests
import numpy as np
import torch

from tokenlake.extract._loader import PREFETCH_FACTOR, usable_cpus
from tokenlake.extract._pixelstore import pool_context  # fork unless CUDA is up

# (alias, px, batch): the issue-5 models at their paper resolution
MODELS = (("dinov2_s", 518, 64), ("dinov2_g_reg4", 518, 16), ("deit3_m", 224, 256),
          ("clip_b", 224, 256), ("swinv2_s", 256, 128), ("pvt_b2", 224, 256))
JPEG_MODELS = ("deit3_m", "pvt_b2")  # extraction straight from JPEG files: small models only
# bare bf16 forward on one H200 (issue 5): sizes the image set and the time estimate
H200_BARE = {"dinov2_s": 2347, "dinov2_g_reg4": 108, "deit3_m": 13143, "clip_b": 8976,
             "swinv2_s": 2062, "pvt_b2": 5762}
NOT_RUN = "NOT RUN: no CUDA device on this machine"


@dataclass(frozen=True)
class Sizes:
    loop_s: float = 2.5  # each timed extraction loop runs about this long at the bare rate
    min_batches: int = 20  # ... and at least this many batches
    bare_s: float = 1.0  # timed bare forward (after warm-up steps)
    warmup_steps: int = 3
    disk_bytes: int = 1536 << 20  # sequential write test, 64 MiB blocks, fsync after each
    disk_max_s: float = 8.0  # ... stopped early on a slow disk
    all_disk_s: float = 5.0  # the `all` run writes at most this many seconds of disk bandwidth
    capacity_images: int = 3000  # images per decode-capacity measurement
    max_images: int = 40_000  # generated JPEGs at most
    budget_s: float = 400.0  # a model whose estimate would end past this is not run

    def block(self) -> int:
        return min(64 << 20, self.disk_bytes)


FULL = Sizes()
QUICK = Sizes(loop_s=0.3, min_batches=4, bare_s=0.2, warmup_steps=2, disk_bytes=256 << 20,
              disk_max_s=3.0, all_disk_s=0.5, capacity_images=512, max_images=4096,
              budget_s=240.0)

# assumptions of the time estimate printed at the start (replaced by measurements as they come)
ASSUMED = {"disk_bytes_s": 1.0e9, "cpu_decode_per_core": 120.0, "gpu_decode": 10_000.0,
           "construct_s_per_param": 15e-9, "extract_overhead_s": 3.0, "startup_s": 15.0,
           "jpeg_s_per_image_core": 2.5e-3}


# -- images ------------------------------------------------------------------------------------

def _canvas(seed: int, size: int = 1536) -> np.ndarray:
    """A large smooth scene with edges, texture and sensor noise; JPEGs are crops of it."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = np.empty((size, size, 3), np.float32)
    for c in range(3):  # low-frequency illumination / background
        f = rng.uniform(0.001, 0.006, 2) * 2 * np.pi
        base[..., c] = rng.uniform(60, 190) + 50 * np.sin(xx * f[0] + rng.uniform(0, 6.3)) * (
            np.cos(yy * f[1] + rng.uniform(0, 6.3)))
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(250):  # objects: edges at every scale
        x0, y0 = (int(v) for v in rng.integers(-100, size, 2))
        x1, y1 = x0 + int(rng.integers(15, 260)), y0 + int(rng.integers(15, 260))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    px = np.asarray(img.filter(ImageFilter.GaussianBlur(1.2)), np.float32)
    tex = rng.normal(128, 40, (size // 3, size // 3)).clip(0, 255).astype(np.uint8)
    tex = np.asarray(Image.fromarray(tex).resize((size, size), Image.BICUBIC), np.float32) - 128
    px += 1.4 * tex[..., None] + rng.normal(0, 24, px.shape).astype(np.float32)
    return px.clip(0, 255).astype(np.uint8)


def _write_jpegs(args: tuple[str, int, list[int]]) -> int:
    """One worker's chunk: random crops (~465 x 375, flips, channel orders) of one canvas."""
    from PIL import Image

    folder, seed, indices = args
    todo = [i for i in indices if not (Path(folder) / f"img{i:06d}.jpg").exists()]
    if not todo:
        return 0
    canvas = _canvas(seed)
    rng = np.random.default_rng(seed + 1)
    for i in todo:
        w, h = int(rng.integers(400, 531)), int(rng.integers(320, 431))
        x, y = int(rng.integers(0, canvas.shape[1] - w)), int(rng.integers(0, canvas.shape[0] - h))
        crop = canvas[y:y + h, x:x + w][:, ::(1 if rng.random() < 0.5 else -1)]
        crop = np.ascontiguousarray(crop[..., rng.permutation(3)])
        buf = io.BytesIO()
        Image.fromarray(crop).save(buf, format="JPEG", quality=90)
        tmp = Path(folder) / f".img{i:06d}.tmp"
        tmp.write_bytes(buf.getvalue())
        tmp.rename(Path(folder) / f"img{i:06d}.jpg")
    return len(todo)


def make_images(folder: Path, n: int, *, workers: int | None = None, chunk: int = 1024) -> list[str]:
    """n generated JPEGs in `folder` (kept between runs); returns their paths in order."""
    folder.mkdir(parents=True, exist_ok=True)
    workers = workers or usable_cpus()
    chunk = max(1, min(chunk, -(-n // workers)))
    jobs = [(str(folder), 1000 + k, list(range(lo, min(n, lo + chunk))))
            for k, lo in enumerate(range(0, n, chunk))]
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            _write_jpegs(job)
    else:
        with cf.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=pool_context()) as pool:
            list(pool.map(_write_jpegs, jobs))
    return [str(folder / f"img{i:06d}.jpg") for i in range(n)]


# -- disk --------------------------------------------------------------------------------------

def disk_bandwidth(folder: Path, sizes: Sizes) -> tuple[float, int]:
    """Sequential write bandwidth (bytes/s) of folder's filesystem, and the bytes written."""
    return _disk.disk_bandwidth(folder, total=sizes.disk_bytes, block=sizes.block(),
                                max_s=sizes.disk_max_s)


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- measurements ------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bare_forward(alias: str, px: int, batch: int, device: torch.device,
                 sizes: Sizes) -> tuple[float, int]:
    """img/s of `forward_features` at `batch` (bf16 autocast on CUDA, float32 on the CPU, as the
    extraction computes), after warm-up steps; returns (img/s, images timed). Random values other
    than the extraction's (same architecture, same arithmetic)."""
    from tokenlake.extract import create_backbone, resolve_model, resolve_weights

    with device:  # built and initialised on the device: seconds, not a minute, for ViT-g
        model = create_backbone(resolve_model(alias), weights=resolve_weights("random"),
                                img_size=px).to(device)
    x = torch.randn(batch, 3, px, px, device=device)

    def step(net: torch.nn.Module, inputs: torch.Tensor) -> None:
        # entered per batch, as the extraction's `launch` enters them for each batch
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                    enabled=device.type == "cuda"):
            net.forward_features(inputs)

    try:
        for _ in range(sizes.warmup_steps):
            step(model, x)
        _sync(device)
        start = time.perf_counter()
        step(model, x)
        _sync(device)
        steps = max(3, math.ceil(sizes.bare_s / (time.perf_counter() - start)))
        start = time.perf_counter()
        for _ in range(steps):
            step(model, x)
        _sync(device)
        return batch * steps / (time.perf_counter() - start), batch * steps
    finally:
        del model, x
        _free(device)


def _layout(alias: str, px: int):
    from tokenlake.extract import make_adapter, resolve_model
    from tokenlake.extract._models import meta_backbone

    adapter = make_adapter(meta_backbone(resolve_model(alias), px), img_size=px)
    adapter.close()
    return adapter.layout


def bytes_per_image(alias: str, px: int) -> float:
    """Estimated output of policy `all` per image: fp16 embedding + pixel cell + ~24 B of Parquet
    per token (the run's measured size replaces it in the rows)."""
    lay = _layout(alias, px)
    return lay.n_tokens * (2 * lay.embed_dim + 3 * lay.cell * lay.cell + 24)


def _params(alias: str, px: int) -> int:
    from tokenlake.extract import resolve_model
    from tokenlake.extract._models import meta_backbone

    return sum(t.numel() for t in meta_backbone(resolve_model(alias), px).parameters())


def _round_up(n: float, batch: int) -> int:
    return max(batch, math.ceil(n / batch) * batch)


@dataclass(frozen=True)
class Counts:
    n: int  # images of the store-fed sample/summary runs and the store build
    n_all: int  # images of the `all` run (n, or fewer when the disk caps it)
    n_jpeg: int  # images of the JPEG-fed run
    prefetched: int = 0  # of those, at most this many decoded before its first batch is timed


def counts(bare: float, batch: int, bpi: float, disk: float, decode: float, sizes: Sizes,
           available: int, *, decode_workers: int = 0) -> Counts:
    """Image counts: each loop ~loop_s at its limiting rate, >= min_batches batches, the `all`
    run's output <= all_disk_s of disk bandwidth, nothing beyond the generated images.
    `decode`: the CPU pool's img/s, the JPEG-fed run's other limit. Its `decode_workers` decode
    up to PREFETCH_FACTOR batches each while the first batch (the warm-up, not timed) runs; the
    run is that much longer, so the timed loop still decodes for ~loop_s."""
    least = sizes.min_batches * batch
    n = min(available, _round_up(max(least, sizes.loop_s * bare), batch))
    cap = sizes.all_disk_s * disk / bpi
    n_all = min(n, _round_up(max(least, cap), batch)) if math.isfinite(cap) else n
    prefetched = decode_workers * PREFETCH_FACTOR * batch
    n_jpeg = min(available, _round_up(max(least, sizes.loop_s * min(bare, decode)), batch)
                 + prefetched + batch)
    return Counts(n, n_all, n_jpeg, prefetched)


def model_seconds(alias: str, px: int, batch: int, *, bare: float, bpi: float, disk: float,
                  cpu_decode: float, gpu_decode: float, sizes: Sizes, available: int,
                  jpeg: bool) -> float:
    """Estimated wall time of one model's measurements."""
    decode = max(cpu_decode, gpu_decode)
    c = counts(bare, batch, bpi, disk, cpu_decode, sizes, available, decode_workers=usable_cpus())
    construct = 1.0 + _params(alias, px) * ASSUMED["construct_s_per_param"]
    overhead = ASSUMED["extract_overhead_s"] + construct
    s = 2.0 + sizes.warmup_steps * batch / bare + 2 * sizes.bare_s  # bare forward
    s += min(sizes.capacity_images, c.n) / cpu_decode + (0.5 if gpu_decode else 0)  # capacity
    s += (c.n + (c.n_all if c.n_all < c.n else 0)) / decode  # store build(s)
    s += overhead + c.n_all * bpi / min(disk, bare * bpi)  # policy all
    s += 2 * (overhead + c.n / bare)  # sample, summary
    if jpeg:
        s += overhead + c.n_jpeg / min(bare, cpu_decode)
    return s + 1.0  # clean-up


def estimate(models, jpeg_models, sizes: Sizes, *, rates: dict, disk: float, cpu_decode: float,
             gpu_decode: float, available: int) -> dict[str, float]:
    return {alias: model_seconds(alias, px, batch, bare=rates[alias], bpi=bytes_per_image(alias, px),
                                 disk=disk, cpu_decode=cpu_decode, gpu_decode=gpu_decode,
                                 sizes=sizes, available=available, jpeg=alias in jpeg_models)
            for alias, px, batch in models}


def _images_needed(models, jpeg_models, sizes: Sizes, rates: dict, decode: float) -> int:
    need = []
    for alias, _px, batch in models:
        c = counts(rates[alias], batch, 1.0, float("inf"), decode, sizes, sys.maxsize,
                   decode_workers=usable_cpus())
        need += [c.n, c.n_jpeg if alias in jpeg_models else 0, sizes.capacity_images]
    return min(sizes.max_images, max(need))


def _loop_rate(manifest: dict) -> tuple[float, int, float]:
    images, secs = manifest.get("loop_images"), manifest.get("loop_time_s")
    if not images or not secs:
        raise RuntimeError(
            f"run {manifest.get('run')!r}: the manifest has no steady-state timing "
            f"(loop_images={images!r}, loop_time_s={secs!r}); the GPU bench needs both, written by "
            "a single-process extraction (tokenlake.extract._job)")
    return images / secs, int(images), float(secs)


def _extract(lake: Path, alias: str, px: int, subset: str, batch: int, device: torch.device,
             policy: str, run: str, **options) -> tuple[dict, float]:
    from tokenlake.extract import ExtractRequest, extract

    manifest = extract(ExtractRequest(
        lake=str(lake), model=alias, subset=subset, policy=policy, weights="random", img_size=px,
        batch_size=batch, shard_size=batch * 4, device=str(device), run=run, quiet=True,
        **options), log=lambda _t: None)
    return manifest, _loop_rate(manifest)[0]


def _subset(lake: Path, name: str, folder: Path, n: int) -> None:
    from tokenlake.extract import draw_subset, open_source
    from tokenlake.store import write_subset

    write_subset(lake, name, draw_subset(open_source(str(folder)), n=None, limit=n))


def _row(name: str, value: float, unit: str, target: str, ok, note: str, **fields) -> dict:
    return {"name": name, "value": float(value), "unit": unit, "target": target, "ok": ok,
            "note": note, **fields}


def row_specs(alias: str, px: int, jpeg: bool) -> list[tuple[str, str, str]]:
    """(name, unit, target) of one model's rows, in the order they are measured."""
    m = f"{alias}@{px}"
    specs = [(f"bare bf16 forward_features, {m}", "img/s", "-"),
             (f"pixel store build / decode capacity, {m}", "x", ">= 0.9"),
             (f"extraction (store, all) / bare or disk, {m}", "x", ">= 0.95 (0.9 x disk)"),
             (f"extraction (store, sample) / bare, {m}", "x", ">= 0.95"),
             (f"extraction (store, summary) / bare, {m}", "x", ">= 0.95")]
    if jpeg:
        specs.append((f"extraction (JPEGs, summary) / min(bare, decode), {m}", "x", ">= 0.9"))
    return specs


GLOBAL_ROWS = (("bench images: mean JPEG size", "KB", "~110 KB (ImageNet)"),
               ("disk sequential write bandwidth (fsync'd)", "GB/s", "-"))


def not_run_rows(models=MODELS, jpeg_models=JPEG_MODELS, note: str = NOT_RUN, *,
                 globals_too: bool = True, ok=None) -> list[dict]:
    nan = float("nan")
    rows = [_row(name, nan, unit, target, None, note) for name, unit, target in GLOBAL_ROWS
            ] if globals_too else []
    for alias, px, _batch in models:
        for name, unit, target in row_specs(alias, px, alias in jpeg_models):
            rows.append(_row(name, nan, unit, target, ok, note, model=alias, img_size=px))
    return rows


class _Model:
    """One model's measurements; yields its rows in `row_specs` order.

    Each row is measured on its own: a RuntimeError in one (a CUDA error, running out of device
    memory, a failed extraction) becomes that row's FAILED note and `error` field, the device's
    cached memory is released, and the next row is measured; rows that need what the failed one
    measured (the bare rate, the store, the `all` run) fail saying so. `strict` raises instead."""

    def __init__(self, alias: str, px: int, batch: int, *, device: torch.device, out: Path,
                 folder: Path, available: int, disk: float, sizes: Sizes, gpu_decode: bool,
                 jpeg: bool, label: str, strict: bool = False) -> None:
        self.alias, self.px, self.batch, self.device = alias, px, batch, device
        self.out, self.folder, self.available, self.disk = out, folder, available, disk
        self.sizes, self.gpu_decode, self.jpeg, self.label = sizes, gpu_decode, jpeg, label
        self.strict = strict
        self.common = {"model": alias, "img_size": px, "batch": batch, "device": label}
        self.cores = usable_cpus()
        self.lake = self.out / "lakes" / alias
        self.measured: dict = {}  # what later rows need: bare, store, ref

    def rows(self) -> Iterator[dict]:
        specs = row_specs(self.alias, self.px, self.jpeg)
        steps = [self._bare, self._build, self._all, lambda name: self._compute_bound(name, "sample"),
                 lambda name: self._compute_bound(name, "summary")]
        if self.jpeg:
            steps.append(self._jpeg)
        try:
            for k, ((name, unit, target), step) in enumerate(zip(specs, steps)):
                yield self._guarded(name, unit, target, step)
                if k == 4:  # the store-fed runs are done: their lake goes
                    shutil.rmtree(self.lake, ignore_errors=True)
        finally:
            shutil.rmtree(self.lake, ignore_errors=True)

    def _guarded(self, name: str, unit: str, target: str, step) -> dict:
        try:
            return step(name)
        except RuntimeError as err:  # torch.OutOfMemoryError and CUDA errors are RuntimeErrors
            if self.strict:
                raise
            traceback.print_exc()
            _free(self.device)
            error = f"{type(err).__name__}: {err}"
            return _row(name, float("nan"), unit, target, False, f"FAILED: {error}", error=error,
                        **self.common)

    def _needs(self, key: str, what: str):
        if key not in self.measured:
            raise RuntimeError(f"not measured: it needs {what}, which failed above")
        return self.measured[key]

    def _bare(self, name: str) -> dict:
        bare, timed = bare_forward(self.alias, self.px, self.batch, self.device, self.sizes)
        self.measured["bare"] = bare
        expected = H200_BARE.get(self.alias)
        return _row(name, bare, "img/s", "-", None,
                    f"{bare:.0f} img/s, batch {self.batch}, {timed} images timed, {self.label}, "
                    "random weights"
                    + (f"; issue 5 measured {expected} img/s on an H200" if expected else ""),
                    bare_img_s=bare, **self.common)

    def _build(self, name: str) -> dict:
        """Decode capacity and the store build, with the faster decoder."""
        from tokenlake.extract import resolve_model
        from tokenlake.extract._models import meta_backbone
        from tokenlake.extract._pixelstore import build_pixel_store, decode_capacity
        from tokenlake.extract._preprocess import data_config

        alias, px, batch, device, sizes = self.alias, self.px, self.batch, self.device, self.sizes
        bare = self._needs("bare", "the bare rate")
        cfg = data_config(meta_backbone(resolve_model(alias), px), img_size=px)
        cores = self.cores
        paths_all = [str(self.folder / f"img{i:06d}.jpg") for i in range(self.available)]
        probe = paths_all[:min(sizes.capacity_images, self.available)]
        threads = min(16, cores)  # torchvision: file-reading threads beside the device decoder
        cpu_cap = decode_capacity(probe, cfg, workers=cores)
        self.measured["cpu_cap"] = cpu_cap
        gpu_cap, gpu_error = 0.0, ""
        if self.gpu_decode:
            try:
                gpu_cap = decode_capacity(probe, cfg, workers=threads, decoder="torchvision",
                                          device=str(device))
            except Exception as err:  # noqa: BLE001 - the rest is still measured, with PIL
                _free(device)
                gpu_error = f"; GPU decoding FAILED ({type(err).__name__}: {err}), PIL used"
        use_gpu = gpu_cap > cpu_cap
        capacity = max(cpu_cap, gpu_cap)
        # the build uses the faster decoder; extraction then reads that decoder's store
        decoder = {"decoder": "torchvision", "device": str(device)} if use_gpu else {}
        build_workers = threads if use_gpu else cores
        c = counts(bare, batch, bytes_per_image(alias, px), self.disk, cpu_cap, sizes,
                   self.available, decode_workers=cores)
        shutil.rmtree(self.lake, ignore_errors=True)
        _subset(self.lake, "s", self.folder, c.n)
        start = time.perf_counter()
        build_pixel_store(str(self.lake), "s", cfg, workers=build_workers, quiet=True, **decoder)
        built = c.n / (time.perf_counter() - start)
        self.measured["store"] = {"cfg": cfg, "counts": c, "decoder": decoder,
                                  "build_workers": build_workers,
                                  "request": {"decoder": "torchvision"} if use_gpu else {}}
        store_bytes = _tree_bytes(self.lake / "pixels")
        how = (f"torchvision on {device} ({threads} reading threads)" if use_gpu
               else f"PIL in {cores} processes")
        return _row(name, built / capacity, "x", ">= 0.9", built / capacity >= 0.9,
                    f"{c.n} images at {px} px ({store_bytes / 1e9:.2f} GB): build {built:.0f} "
                    f"img/s with {how} (writing and hashing included); capacity: {cores} CPU "
                    f"cores {cpu_cap:.0f} img/s"
                    + (f", GPU decoding {gpu_cap:.0f} img/s" if self.gpu_decode else "")
                    + f" ({len(probe)} images); {self.label}{gpu_error}",
                    build_img_s=built, capacity_img_s=capacity, cpu_decode_img_s=cpu_cap,
                    gpu_decode_img_s=gpu_cap if self.gpu_decode else None,
                    decoder="torchvision" if use_gpu else "cpu pool", images=c.n, **self.common)

    def _all(self, name: str) -> dict:
        """Policy all, on fewer images when the disk caps its output."""
        from tokenlake.extract._pixelstore import build_pixel_store

        alias, px, batch, device = self.alias, self.px, self.batch, self.device
        bare = self._needs("bare", "the bare rate")
        st = self._needs("store", "the pixel store")
        c = st["counts"]
        all_subset = "s"
        if c.n_all < c.n:
            all_subset = "a"
            _subset(self.lake, "a", self.folder, c.n_all)
            build_pixel_store(str(self.lake), "a", st["cfg"], workers=st["build_workers"],
                              quiet=True, **st["decoder"])
        ref = f"{alias}-{px}-all"
        manifest, rate = _extract(self.lake, alias, px, all_subset, batch, device, "all", ref,
                                  **st["request"])
        self.measured["ref"] = ref
        _, images, secs = _loop_rate(manifest)
        run_bytes = _tree_bytes(self.lake / "runs" / ref)
        per_image = run_bytes / manifest["n_images"]
        # the bytes of the timed batches over their time: the first batch (warm-up) is in
        # run_bytes but not in secs
        written = per_image * images / secs
        demand = bare * per_image
        fields = dict(policy="all", source="pixel store", images=images, loop_time_s=secs,
                      bare_img_s=bare, extract_img_s=rate, run_bytes=run_bytes,
                      run_images=manifest["n_images"], write_bytes_s=written, disk_bytes_s=self.disk, **self.common)
        base = (f"extraction {rate:.0f} img/s ({images} images, {secs:.2f} s loop), bare "
                f"{bare:.0f} img/s, batch {batch}, {self.label}; {per_image / 1e6:.2f} MB/image "
                f"-> {written / 1e9:.2f} GB/s written; disk {self.disk / 1e9:.2f} GB/s")
        if demand > self.disk:
            value = written / self.disk
            return _row(name, value, "x", ">= 0.9 x disk", value >= 0.9,
                        f"DISK-BOUND: the bare rate would emit {demand / 1e9:.2f} GB/s, more "
                        f"than the disk takes; held to the disk's bandwidth. {base}; "
                        f"{rate / bare:.3f}x bare", disk_bound=True, **fields)
        return _row(name, rate / bare, "x", ">= 0.95", rate / bare >= 0.95,
                    f"{base} (the disk keeps up)", disk_bound=False, **fields)

    def _compute_bound(self, name: str, policy: str) -> dict:
        """sample and summary: compute-bound, held to the bare forward."""
        bare = self._needs("bare", "the bare rate")
        st = self._needs("store", "the pixel store")
        options = {"outlier_ref": self._needs("ref", "the `all` run")} if policy == "sample" else {}
        manifest, rate = _extract(self.lake, self.alias, self.px, "s", self.batch, self.device,
                                  policy, f"{self.alias}-{self.px}-{policy}", **options,
                                  **st["request"])
        _, images, secs = _loop_rate(manifest)
        return _row(name, rate / bare, "x", ">= 0.95", rate / bare >= 0.95,
                    f"extraction {rate:.0f} img/s ({images} images, {secs:.2f} s loop), bare "
                    f"{bare:.0f} img/s, batch {self.batch}, {self.label}",
                    policy=policy, source="pixel store", images=images, loop_time_s=secs,
                    bare_img_s=bare, extract_img_s=rate, **self.common)

    def _jpeg(self, name: str) -> dict:
        """Straight from the JPEG files: a lake without a store. Per-run decoding is PIL in
        DataLoader workers (torchvision decodes only into a store), so the limit is the CPU
        pool's capacity, on every core."""
        alias, px, batch, cores = self.alias, self.px, self.batch, self.cores
        bare = self._needs("bare", "the bare rate")
        cpu_cap = self._needs("cpu_cap", "the CPU decode capacity")
        c = counts(bare, batch, 1.0, float("inf"), cpu_cap, self.sizes, self.available,
                   decode_workers=cores)
        jlake = self.out / "lakes" / f"{alias}-jpeg"
        shutil.rmtree(jlake, ignore_errors=True)
        try:
            _subset(jlake, "j", self.folder, c.n_jpeg)
            manifest, rate = _extract(jlake, alias, px, "j", batch, self.device, "summary",
                                      f"{alias}-{px}-jpeg", decode_workers=cores)
        finally:
            shutil.rmtree(jlake, ignore_errors=True)
        _, images, secs = _loop_rate(manifest)
        limit = min(bare, cpu_cap)
        # the workers may have decoded `prefetched` images during the warm-up batch; the timed
        # loop must decode well beyond them, or the row measures the GPU alone
        ahead = min(c.prefetched, images)
        floor = (images - ahead) / secs  # as if every prefetched image came free
        sized = images - ahead >= self.sizes.min_batches * batch
        ok = rate / limit >= 0.9 if sized else None
        return _row(name, rate / limit, "x", ">= 0.9", ok,
                    f"extraction {rate:.0f} img/s ({images} images, {secs:.2f} s loop, policy "
                    f"summary, PIL in {cores} decode workers); bare {bare:.0f} img/s, CPU "
                    f"decode capacity {cpu_cap:.0f} img/s; batch {batch}, {self.label}; up to "
                    f"{ahead} images decoded during the warm-up, {floor:.0f} img/s without them"
                    + ("" if sized else "; UNDERSIZED: too few images beyond the prefetched "
                       "ones for decoding to be measured"),
                    policy="summary", source="jpeg", images=images, loop_time_s=secs,
                    bare_img_s=bare, extract_img_s=rate, capacity_img_s=cpu_cap,
                    prefetched_max=ahead, extract_img_s_floor=floor, **self.common)


def measure(out: Path, *, device: str = "cuda", models=MODELS, jpeg_models=JPEG_MODELS,
            sizes: Sizes = FULL, rates: dict | None = None, n_images: int | None = None,
            gpu_decode: bool | None = None, strict: bool = False, log=print) -> Iterator[dict]:
    """Every measurement on `device`; yields rows as they are measured.

    `rates`: expected bare img/s per alias (sizes the image set, the estimate and the budget;
    default the issue's H200 rates). `strict`: raise on a failing model instead of recording it.
    """
    started = time.perf_counter()
    dev = torch.device(device)
    label = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    gpu_decode = dev.type == "cuda" if gpu_decode is None else gpu_decode
    rates = dict(H200_BARE if rates is None else rates)
    cores = usable_cpus()
    cpu_decode = ASSUMED["cpu_decode_per_core"] * cores
    gpu_dec = ASSUMED["gpu_decode"] if gpu_decode else 0.0
    n = n_images or _images_needed(models, jpeg_models, sizes, rates, cpu_decode)
    guess = estimate(models, jpeg_models, sizes, rates=rates, disk=ASSUMED["disk_bytes_s"],
                     cpu_decode=cpu_decode, gpu_decode=gpu_dec, available=n)
    fixed = ASSUMED["startup_s"] + n * ASSUMED["jpeg_s_per_image_core"] / cores + (
        (sizes.disk_bytes + n * 110e3) / ASSUMED["disk_bytes_s"])  # disk test, JPEGs flushed
    log(f"  gpu bench on {label}: estimated {fixed + sum(guess.values()):.0f} s "
        f"(budget {sizes.budget_s:.0f} s) from the expected bare rates {rates}, disk "
        f"{ASSUMED['disk_bytes_s'] / 1e9:.1f} GB/s and decoding {cpu_decode:.0f} img/s (CPU) "
        f"/ {gpu_dec:.0f} img/s (GPU) assumed; per model: "
        + ", ".join(f"{a} {s:.0f} s" for a, s in guess.items()))

    folder = out / "images"
    paths = make_images(folder, n)
    sizes_b = np.array([os.path.getsize(p) for p in paths])
    (name, unit, target), (disk_name, disk_unit, disk_target) = GLOBAL_ROWS
    yield _row(name, sizes_b.mean() / 1e3, unit, target, None,
               f"{n} generated JPEGs, quality 90, ~465 x 375 px crops of smooth scenes with "
               f"edges, texture and noise; {sizes_b.min() / 1e3:.0f}-{sizes_b.max() / 1e3:.0f} KB; "
               f"{time.perf_counter() - started:.0f} s to this point",
               images=n, mean_bytes=float(sizes_b.mean()))
    disk, written = disk_bandwidth(out, sizes)
    yield _row(disk_name, disk / 1e9, disk_unit, disk_target, None,
               f"{written / 1e9:.2f} GB in {sizes.block() >> 20} MiB blocks, fsync after each, "
               f"into {out}", disk_bytes_s=disk)
    guess = estimate(models, jpeg_models, sizes, rates=rates, disk=disk, cpu_decode=cpu_decode,
                     gpu_decode=gpu_dec, available=n)
    log(f"  measured disk {disk / 1e9:.2f} GB/s: models estimated {sum(guess.values()):.0f} s "
        f"after {time.perf_counter() - started:.0f} s of set-up")
    for alias, px, batch in models:
        elapsed = time.perf_counter() - started
        if elapsed + guess[alias] > sizes.budget_s:
            yield from not_run_rows(
                [(alias, px, batch)], jpeg_models, globals_too=False,
                note=f"NOT RUN: the bench's time budget ({sizes.budget_s:.0f} s) would be spent "
                     f"({elapsed:.0f} s elapsed, ~{guess[alias]:.0f} s estimated for this model)")
            continue
        model = _Model(alias, px, batch, device=dev, out=out, folder=folder, available=n,
                       disk=disk, sizes=sizes, gpu_decode=gpu_decode, jpeg=alias in jpeg_models,
                       label=label, strict=strict)
        n_rows = len(row_specs(alias, px, alias in jpeg_models))
        done = 0
        t0 = time.perf_counter()
        try:
            for row in model.rows():
                done += 1
                yield row
        except Exception as err:  # one model's failure must not lose the others' rows
            if strict:
                raise
            traceback.print_exc()
            failed = not_run_rows([(alias, px, batch)], jpeg_models, globals_too=False, ok=False,
                                  note=f"FAILED: {type(err).__name__}: {err}")
            yield from failed[done:n_rows]
        finally:
            shutil.rmtree(out / "lakes", ignore_errors=True)
            _free(dev)
        log(f"  {alias}: {time.perf_counter() - t0:.0f} s (estimated {guess[alias]:.0f} s)")
    log(f"  gpu bench: {time.perf_counter() - started:.0f} s in all")


def run(*, out: Path, quick: bool, budget_s: float | None = None) -> Iterator[dict]:
    """`budget_s`: replaces the sizes' budget (bench/gpu_first_session.py gives what is left)."""
    if not torch.cuda.is_available():
        yield from not_run_rows()
        return
    sizes = QUICK if quick else FULL
    if budget_s is not None:
        sizes = dataclasses.replace(sizes, budget_s=budget_s)
    yield from measure(out, device="cuda", sizes=sizes)


__all__ = ["FULL", "QUICK", "Sizes", "measure", "not_run_rows", "row_specs", "run"]
