"""The host side of extraction, without the backbone: can it keep up with a GPU, and with the disk?

A GPU extraction is as fast as the slowest of: the forward pass, the host work per batch (policy,
pixel cells, copies into the shard buffers: `_Extractor.finish`), the writer (tables, Parquet,
chunk files) and the disk. This bench times the last three on this machine, with a stand-in
backbone that returns DeiT3-M-shaped outputs instantly, so it runs (and means something) with or
without a GPU:

- host work per batch, in img/s, beside the H200 bare-forward rate issue 5 quotes for the model
  (a reference number, not measured here; whether this machine's cores keep up with that GPU);
- the writer's bytes/s beside the disk's sequential write bandwidth measured in the same run: the
  storage goal of issue 5 (>= 0.9x of the disk where the disk is the limit).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch
from _disk import disk_bandwidth  # bench/ is on sys.path under bench/run.py

H200_BARE = {"deit3_m": 13_143, "dinov2_s": 2_347}  # img/s, issue 5 (random weights, bf16)
CASES = (("deit3_m", 224, "all"), ("deit3_m", 224, "sample"), ("dinov2_s", 518, "all"))


class _InstantBackbone:
    """Stands in for an adapter: the outputs' shapes and dtypes, no arithmetic."""

    def __init__(self, layout, batch: int) -> None:
        g = torch.Generator().manual_seed(0)
        t, d = layout.n_tokens, layout.embed_dim
        self.layout = layout
        norm = torch.rand(batch, t, generator=g) * 40  # [B, T], 2% of patches above 39.2
        self.out = {"tokens": torch.randn(batch, t, d, generator=g).half(), "norm": norm,
                    "attn": torch.rand(batch, t, generator=g),
                    "nbr_cos": torch.rand(batch, layout.n_patches, generator=g),
                    "cls_post": torch.randn(batch, d, generator=g),
                    "patch_mean_post": torch.randn(batch, d, generator=g)}

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[: x.shape[0]] for k, v in self.out.items()}

    def close(self) -> None:
        pass


def _lake(out: Path, n: int, px: int, alias: str) -> Path:
    from PIL import Image

    from tokenlake.extract import draw_subset, open_source
    from tokenlake.extract._models import meta_backbone, resolve_model
    from tokenlake.extract._pixelstore import build_pixel_store
    from tokenlake.extract._preprocess import data_config
    from tokenlake.store import write_subset

    lake = out / f"lake-{alias}-{px}-{n}"
    if not (lake / "subsets").exists():
        folder = out / "images"
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(n):
            if not (folder / f"i{i:05d}.jpg").exists():
                Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(
                    folder / f"i{i:05d}.jpg")
        write_subset(lake, "host", draw_subset(open_source(str(folder)), n=n))
    cfg = data_config(meta_backbone(resolve_model(alias), px), img_size=px)
    build_pixel_store(str(lake), "host", cfg, quiet=True)
    return lake


def _case(out: Path, alias: str, px: int, policy: str, n: int, batch: int,
          disk: float) -> list[dict]:
    from tokenlake import store
    from tokenlake.extract import ExtractRequest
    from tokenlake.extract._loader import batches
    from tokenlake.extract._loop import _Extractor, _ShardWriterThread, open_writer, pixel_source
    from tokenlake.extract._models import meta_backbone
    from tokenlake.extract._plan import meta_layout, plan
    from tokenlake.extract._policy import TokenPolicy
    from tokenlake.extract._preprocess import data_config
    from tokenlake.extract._shardbuf import RowPool, ShardBuffer

    lake = _lake(out, n, px, alias)
    p = plan(ExtractRequest(lake=str(lake), model=alias, subset="host", weights="random",
                            img_size=px, batch_size=batch, shard_size=batch, device="cpu",
                            quiet=True, run=f"host-{alias}-{policy}-{time.time_ns()}"))
    layout = meta_layout(p)
    cfg = data_config(meta_backbone(p.spec, px), img_size=px)
    policy_ = TokenPolicy(policy, threshold=39.2, normals_per_image=4, seed=0)
    extractor = _Extractor(p, _InstantBackbone(layout, batch), policy_, cfg)
    loaded = list(batches(data="", split=None, rows=p.rows, cfg=cfg, shard_size=batch,
                          batch_size=batch, workers=1, pin=False, pixel_store=pixel_source(p)))
    flights = [extractor.launch(b) for b in loaded]  # the stand-in's outputs, not timed
    pool, per_image = RowPool(), {"all": layout.n_tokens, "sample": layout.n_prefix + 8}[policy]

    def fill(flight) -> ShardBuffer:
        buffer = ShardBuffer(shard=flight.batch.shard, shard_size=batch, layout=layout, pool=pool,
                             tokens_per_image=per_image)
        extractor.finish(flight, buffer)
        return buffer

    fill(flights[0]).release()  # warms the pool: in a long run, written shards' buffers come back
    start = time.perf_counter()
    for flight in flights:  # steady state: each buffer is given back as the writer would
        fill(flight).release()
    n = len(p.rows)
    host = n / (time.perf_counter() - start)
    buffers = [fill(flight) for flight in flights]

    writer = open_writer(p)
    image_arrays = {k: s.shape for k, s in writer.specs.items() if s.kind == "image"}
    start = time.perf_counter()
    out_ = _ShardWriterThread(writer, image_arrays)  # the extraction's own writer threads
    for buffer in buffers:
        out_.put(buffer)
    out_.close()
    seconds = time.perf_counter() - start
    written = sum(f.stat().st_size for f in (Path(lake) / "runs" / p.run).rglob("*") if f.is_file())
    shutil.rmtree(Path(lake) / "runs" / p.run)
    store.open_lake(lake)  # the lake stays readable without the deleted run
    rate = written / seconds
    label = f"{alias}@{px} policy {policy}, batch {batch}, {n} images"
    rows = [{"name": f"host work per batch / H200 bare forward, {label}",
             "value": host / H200_BARE[alias], "unit": "x", "target": "-", "ok": None,
             "note": f"finish() {host:,.0f} img/s on this machine's main thread; the H200 bare "
                     f"forward rate {H200_BARE[alias]:,} img/s is issue 5's number, not measured "
                     "here"}]
    if policy == "all":  # the run that can be storage-bound
        rows.append({"name": f"writer / disk sequential write, {label}", "value": rate / disk,
                     "unit": "x", "target": ">= 0.9", "ok": rate / disk >= 0.9,
                     "note": f"writer {rate / 1e6:,.0f} MB/s ({n / seconds:,.0f} img/s, "
                             f"{written / n / 1e3:,.0f} kB/img), disk {disk / 1e6:,.0f} MB/s "
                             "measured in this run"})
    return rows


def run(*, out: Path, quick: bool) -> list[dict]:
    disk, _ = disk_bandwidth(out, total=(256 if quick else 1536) << 20)
    rows = [{"name": "disk sequential write bandwidth (64 MiB blocks, fsync'd)", "value": disk / 1e6,
             "unit": "MB/s", "target": "-", "ok": None, "note": f"in {out}"}]
    for alias, px, policy in CASES:
        n, batch = (64, 32) if quick else ((1024, 256) if px < 300 else (256, 64))
        rows += _case(out, alias, px, policy, n, batch, disk)
    return rows
