"""A whole `tokenlake extract` process against a bare script doing the model's own work.

Both are timed as whole processes, interpreter start and imports included, on the same photos:

* bare: a script that imports torch and timm, builds the model (random weights), decodes every
  image with PIL, resizes and crops it with timm's eval transform and runs `forward_features`
  in batches: the least any extraction must do;
* tokenlake: `tokenlake extract --data FOLDER --limit N --weights random`, which also plans the
  run, records norms, attention, neighbour cosines and pixels, and writes and hashes the shards.

Rounds are interleaved and the best of each is kept (one timing on 2 shared cores moves by up to
25 %). Target: tokenlake <= 1.10x the bare script.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
from bench_extract import _images  # the same photos as the loop benchmark; bench/ is on sys.path

MODEL, PX, BATCH = "deit3_s", 224, 32

BARE = textwrap.dedent('''
    import sys
    from pathlib import Path

    import numpy as np
    import timm
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    folder, name, px, batch = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    n = int(sys.argv[5])
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=px).eval()
    cfg = resolve_model_data_config(model)
    transform = create_transform(**cfg, is_training=False)
    # the first n in name order: the images `tokenlake extract --limit n` takes
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    paths = paths[:n]
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[i:i + batch]])
            model.forward_features(x)
''')


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def run(*, out: Path, quick: bool) -> list[dict]:
    n = 24 if quick else 96
    shutil.rmtree(out / "process", ignore_errors=True)  # exactly these n images, nothing older
    folder = _images(out / "process", n)
    script = out / "bare_forward.py"
    script.write_text(BARE)
    timm_name = "deit3_small_patch16_224"
    exe = Path(sys.executable).with_name("tokenlake")
    times: dict[str, list[float]] = {"bare": [], "tokenlake": []}
    for k in range(2 if quick else 5):
        times["bare"].append(_timed([sys.executable, str(script), str(folder), timm_name,
                                     str(PX), str(BATCH), str(n)]))
        lake = out / f"process-lake-{k}"
        shutil.rmtree(lake, ignore_errors=True)
        times["tokenlake"].append(_timed([str(exe), "extract", "--lake", str(lake), "--data",
                                          str(folder), "--limit", str(n), "--model", MODEL,
                                          "--img-size", str(PX), "--weights", "random",
                                          "--batch-size", str(BATCH), "--quiet"]))
    bare, full = min(times["bare"]), min(times["tokenlake"])
    spread = "; ".join(f"{k} " + "/".join(f"{t:.1f}" for t in v) for k, v in times.items())
    return [{"name": f"whole `tokenlake extract` process / bare script, {MODEL}@{PX}, {n} photos",
             "value": full / bare, "unit": "x", "target": "<= 1.10", "ok": full / bare <= 1.10,
             "note": f"best of {len(times['bare'])}: bare {bare:.1f} s, tokenlake {full:.1f} s "
                     f"(median {np.median(times['tokenlake']):.1f} s); all rounds (s): {spread}; "
                     "random weights, interpreter start and imports included"}]
