"""Time the probe suite (tokenlake.probes) on a demo-sized planted lake, on CPU.

The lake is synthetic (written through tokenlake.store.write_run, see tokenlake.store.testing.probe_run) and has
the shape of a small ViT run: 14 x 14 patches of 16 px, 1 cls + 4 registers, D = 64 + 768.
Each probe is timed on its first run (training) and on a rerun (reuse of the committed result).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from tokenlake import probes
from tokenlake.store.testing import probe_run


def run(*, out: Path, quick: bool) -> list[dict]:
    out = Path(out)
    lake = out / "lake"
    shutil.rmtree(lake, ignore_errors=True)
    lake.mkdir(parents=True)
    n_images = 32 if quick else 64  # `tokenlake demo` uses 64 images
    t0 = time.time()
    probe_run(n_images=n_images, grid=14, patch=16, pos_dim=64, n_reg=4, n_classes=10,
              seed=0).write(lake, "demo")
    rows = [{"name": f"write planted lake ({n_images} images, 14x14, D=832)",
             "value": time.time() - t0, "unit": "s", "target": "-", "ok": None}]
    target = 90.0 if quick else 180.0
    head = out / "head.pth"
    torch.save(torch.nn.Linear(32, 10).state_dict(), head)
    suite = [
        ("position", lambda f: probes.position(lake, "demo", quiet=True, force=f)),
        ("reconstruct", lambda f: probes.reconstruct(lake, "demo", quiet=True, force=f)),
        ("classify", lambda f: probes.classify(lake, "demo", quiet=True, force=f)),
        ("heads", lambda f: probes.heads(lake, "demo", head, quiet=True, force=f)),
        ("registers", lambda f: probes.registers(lake, "demo", head=head, quiet=True, force=f)),
        ("sweep", lambda f: probes.sweep(lake, "demo", quiet=True, force=False)),
    ]
    total = 0.0
    for name, fn in suite:
        t = time.time()
        res = fn(True)
        dt = time.time() - t
        total += dt
        epochs = res.get("choices", {}).get("epochs_run")
        rows.append({"name": f"probe {name} (train{'' if epochs is None else f', {epochs} ep'})",
                     "value": dt, "unit": "s", "target": "-", "ok": None,
                     "note": f"{res.get('choices', {}).get('device', '')}"})
        t = time.time()
        again = fn(False)
        rows.append({"name": f"probe {name} (reuse)", "value": time.time() - t, "unit": "s",
                     "target": "<= 2 s", "ok": (time.time() - t) <= 2.0 and again["reused"]})
    rows.append({"name": "probe suite total (train)", "value": total, "unit": "s",
                 "target": f"<= {target:.0f} s", "ok": total <= target,
                 "note": f"cpu threads {torch.get_num_threads()}"})
    return rows
