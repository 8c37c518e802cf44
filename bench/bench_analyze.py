"""Analysis jobs on the 5,000-image scale: one synthetic run of 5,000 x 1,374 tokens (1 cls, 4 reg,
37x37 patches, as DINOv2 at 518 px), written once with write_run; embeddings and pixels are stored
for the first 8 images only (small D), so writing stays fast. A row per job, target <= 10 s.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa

N_IMAGES, GRID, N_REG, STORED_IMAGES = 5000, 37, 4, 8


def _lake(root: Path, n_images: int) -> Path:
    from tokenlake.store import open_lake, write_run
    from tokenlake.store.testing import synthetic_run

    if (root / "runs" / "big" / "manifest.json").exists():
        return root
    r = synthetic_run(n_images=n_images, grid=GRID, n_reg=N_REG, patch=14, dim=16, store="none",
                      model="dinov2_g", params=1_100_000_000, blocks=0)
    t = r["tokens"]
    n_tok = 1 + N_REG + GRID * GRID
    k = STORED_IMAGES * n_tok
    slot = np.full(len(t), -1, np.int64)
    slot[:k] = np.arange(k)
    t = t.set_column(t.schema.get_field_index("slot"), "slot",
                     pa.array(slot, mask=slot < 0))
    rng = np.random.default_rng(0)
    r["tokens"] = t
    r["arrays"]["tokens"] = rng.standard_normal((k, 16)).astype(np.float16)
    r["arrays"]["pixels"] = rng.integers(0, 255, (k, 14, 14, 3), dtype=np.uint8)
    write_run(root, "big", shard_size=1000, **r)
    open_lake(root)
    return root


def run(*, out: Path, quick: bool) -> list[dict]:
    from tokenlake import analyze

    n = 500 if quick else N_IMAGES
    out.mkdir(parents=True, exist_ok=True)
    lake = out / f"lake-{n}"
    t0 = time.perf_counter()
    _lake(lake, n)
    rows = [{"name": f"write synthetic run ({n} x {1 + N_REG + GRID * GRID} tokens)",
             "value": time.perf_counter() - t0, "unit": "s", "target": "-", "ok": None,
             "note": "set-up, once"}]
    for name, fn in analyze.JOBS.items():
        t0 = time.perf_counter()
        fn(lake, out=out / "analysis")
        dt = time.perf_counter() - t0
        rows.append({"name": f"analyze {name} ({n} images)", "value": dt, "unit": "s",
                     "target": "<= 10 s", "ok": dt <= 10, "note": "2-core target"})
    t0 = time.perf_counter()
    analyze.report(lake, out=out / "report")
    dt = time.perf_counter() - t0
    rows.append({"name": f"report, all jobs ({n} images)", "value": dt, "unit": "s",
                 "target": "<= 60 s", "ok": dt <= 60, "note": ""})
    return rows
