"""GPU extraction against the bare bf16 `forward_features` of the same model and batch (>= 0.95x).

Issue-5 models at their paper resolution, random weights (same arithmetic as pretrained). The
extraction is fed from the pixel store, keeps everything (`--policy all`) and writes the lake.
On a machine without CUDA every row says it did not run.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

MODELS = (("dinov2_s", 518, 64), ("dinov2_g_reg4", 518, 16), ("deit3_m", 224, 256),
          ("clip_b", 224, 256), ("swinv2_s", 256, 128), ("pvt_b2", 224, 256))


def _bare(alias: str, px: int, batch: int, steps: int) -> float:
    from tokenlake.extract import create_backbone, resolve_model, resolve_weights

    model = create_backbone(resolve_model(alias), weights=resolve_weights("random"),
                            img_size=px).cuda()
    x = torch.randn(batch, 3, px, px, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            model.forward_features(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            model.forward_features(x)
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def _images(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        path = folder / f"img{i:05d}.jpg"
        if not path.exists():
            Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(path)
    return folder


def _extraction(alias: str, px: int, batch: int, n: int, out: Path) -> float:
    from tokenlake.extract import ExtractRequest, draw_subset, extract, open_source
    from tokenlake.extract._models import meta_backbone, resolve_model
    from tokenlake.extract._pixelstore import build_pixel_store
    from tokenlake.extract._preprocess import data_config
    from tokenlake.store import write_subset

    lake = out / "lake"
    write_subset(lake, "gpu", draw_subset(open_source(str(_images(out / "images", n))), n=None))
    spec = resolve_model(alias)
    build_pixel_store(str(lake), "gpu", data_config(meta_backbone(spec, px), img_size=px),
                      quiet=True)
    start = time.perf_counter()
    extract(ExtractRequest(lake=str(lake), model=alias, subset="gpu", weights="random",
                           img_size=px, batch_size=batch, shard_size=batch * 8, quiet=True,
                           device="cuda", run=f"{alias}-{time.time_ns()}"), log=lambda _t: None)
    return n / (time.perf_counter() - start)


def run(*, out: Path, quick: bool) -> list[dict]:
    if not torch.cuda.is_available():
        return [{"name": f"gpu extraction / bare bf16 forward, {a}@{px}", "value": float("nan"),
                 "unit": "x", "target": ">= 0.95", "ok": None,
                 "note": "NOT RUN: no CUDA device on this machine"} for a, px, _ in MODELS]
    rows = []
    for alias, px, batch in MODELS:
        n = batch * (8 if quick else 40)
        bare = _bare(alias, px, batch, steps=5 if quick else 20)
        full = _extraction(alias, px, batch, n, out / alias)
        rows.append({"name": f"gpu extraction / bare bf16 forward, {alias}@{px}, batch {batch}",
                     "value": full / bare, "unit": "x", "target": ">= 0.95",
                     "ok": full / bare >= 0.95,
                     "note": f"bare {bare:.0f} img/s, extraction {full:.0f} img/s ({n} images), "
                             f"{torch.cuda.get_device_name(0)}, random weights"})
    return rows
