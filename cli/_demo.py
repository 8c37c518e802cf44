"""The built-in demo: a small labelled image folder, two random-weight backbones on the CPU, SQL answers.

Images come from scikit-image's sample photographs (shipped inside the package, no download) plus
generated scenes with large flat regions (where outlier tokens like to appear), and one truncated
JPEG to show that bad input lands in the ``errors`` table instead of stopping the run.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tokenlake import store
from tokenlake.sql import query_text

_PHOTOS = {
    "photo": ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
              "immunohistochemistry", "retina", "colorwheel", "logo", "cat"],
    "grayscale": ["camera", "coins", "moon", "page", "text"],
    "texture": ["grass", "gravel", "brick"],
}


def _skimage_photo(name: str) -> Image.Image:
    import skimage.data

    array = getattr(skimage.data, name)()
    return Image.fromarray(array)


def _synthetic(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A sky-like gradient, a flat ground and a few soft blobs: big redundant regions."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    image = top + (bottom - top) * (yy / h)[..., None]
    horizon = int(h * rng.uniform(0.5, 0.8))
    image[horizon:] = rng.uniform(0, 255, 3)
    for _ in range(rng.integers(1, 4)):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(10, min(h, w) / 3)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        image = image * (1 - blob) + rng.uniform(0, 255, 3) * blob
    image += rng.normal(0, 3, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def build_demo_images(root: Path, *, n_images: int, seed: int = 0) -> Path:
    """An image folder with class sub-folders; photographs are reused as random crops."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    photos = [(label, name) for label, names in _PHOTOS.items() for name in names]
    for i in range(n_images - 1):
        if i % 3 == 2:
            label, image = "synthetic", _synthetic(rng, (int(rng.integers(200, 480)),
                                                         int(rng.integers(200, 640))))
        else:
            label, name = photos[i % len(photos)]
            image = _skimage_photo(name)
            if i >= len(photos):  # later copies are random crops, so no two inputs are equal
                w, h = image.size
                cw, ch = int(w * rng.uniform(0.5, 0.9)), int(h * rng.uniform(0.5, 0.9))
                x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                image = image.crop((x0, y0, x0 + cw, y0 + ch))
        folder = root / label
        folder.mkdir(exist_ok=True)
        ext = "png" if image.mode in ("RGBA", "1", "I;16") else "jpg"
        image.save(folder / f"{label}_{i:03d}.{ext}")
    buffer = io.BytesIO()
    _synthetic(rng, (256, 256)).save(buffer, format="JPEG")
    (root / "synthetic" / "zz_truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return root


def _banner(text: str) -> None:
    line = "=" * 78
    print(f"\n{line}\n{text}\n{line}")


def run_demo(*, out: Path, n_images: int = 64) -> int:
    from tokenlake.cli import _experiments
    from tokenlake.experiments import experiment_path

    started = time.time()
    out = Path(out)
    lake = out / "lake"
    demo_file = experiment_path("demo")  # shipped with the package (experiments/demo.toml)
    exp = _experiments.load(demo_file)
    images = build_demo_images(out / "images", n_images=n_images)
    for spec in exp.subsets.values():  # every demo subset draws from the folder just built
        spec["data"] = str(images)
    _banner(
        "tokenlake demo - RANDOM WEIGHTS.\n"
        "The backbones here are randomly initialised (no weights can be downloaded on this\n"
        "machine), so the numbers below exercise the pipeline but say nothing about real models."
    )
    print(f"images: {images} ({n_images} files in class folders, one of them truncated on purpose)")
    print(f"plan:   {demo_file}")
    _experiments.execute(exp, lake=lake, device="cpu", quiet=False)
    db = store.open_lake(lake)
    import polars as pl

    with pl.Config(tbl_rows=40, tbl_cols=-1, tbl_width_chars=200, fmt_str_lengths=40,
                   float_precision=4, tbl_hide_column_data_types=True,
                   tbl_hide_dataframe_shape=True):
        _banner("Token norm percentiles per run and token kind (sql: norm_percentiles.sql)")
        print(pl.from_arrow(db.sql(query_text("norm_percentiles"))))
        _banner("Outliers per run: tokens above the 98th-percentile patch norm of the run's "
                "threshold run (sql: outlier_counts.sql)")
        print(pl.from_arrow(db.sql(query_text("outlier_counts"))))
        _banner("Inputs that could not be used (sql: SELECT run, source_id, reason FROM errors)")
        print(pl.from_arrow(db.sql("SELECT run, source_id, reason FROM errors ORDER BY run")))
        _banner("Probes trained on the cached tokens (sql: probe_results)")
        print(pl.from_arrow(db.sql(
            "SELECT run, probe, token_group, metric, round(value, 3) AS value FROM probe_results "
            "WHERE metric IN ('top1', 'dist', 'l2') AND token_group IN ('normal', 'outlier') "
            "ORDER BY run, probe, metric, token_group")))
    from tokenlake.analyze import report

    # the demo's images are its own subset: the verdicts judge the runs on it (and, every run
    # having random weights, say "random weights: not evidence")
    res = report(lake, out=out / "report", subset="demo")
    html = res["html"]
    if res["errors"]:  # a part of the report raised: a bug, not missing data
        raise RuntimeError(f"the demo's report {html} was written, but "
                           f"{len(res['errors'])} of its parts raised (its Errors section)")
    # the command as this shell can run it (`make demo` calls .venv/bin/tokenlake)
    exe = sys.argv[0] if Path(sys.argv[0]).name == "tokenlake" else "tokenlake"
    _banner(
        f"Done in {time.time() - started:.0f} s. Lake: {lake}\n"
        f"Report (figures, tables beside the paper's, verdicts): {html}\n"
        f"Ask it anything:  {exe} sql --lake {lake} \"SELECT run, count(*) FROM outliers GROUP BY run\"\n"
        f"What is in it:    {exe} runs --lake {lake}\n"
        "On a GPU machine with hub access, the real thing is:\n"
        "  tokenlake plan paper                # every run of the paper, GPU time, disk\n"
        "  tokenlake run  paper --lake LAKE    # (experiments/paper.toml in a checkout)"
    )
    return 0
