"""Reading the lake at the paper's scale: SQL thresholds/outliers and random embedding gathers.

Targets (issue 5): thresholds and outliers over one 200k-image run of 261 tokens per image (52M
rows) in <= 10 s on 2 cores, over a 5,000-image run of the same model (1.3M rows) in <= 0.5 s;
10,000 random token embeddings from a 5,000-image ViT-G run (257 tokens x 1536 dims, fp16, 4 GB)
in <= 0.2 s with a warm page cache, side by side with zarr-python reading the same rows.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import zarr

from tokenlake import store


def _tables(ids: np.ndarray, *, n_reg: int, grid: int, stored: bool, rng) -> tuple:
    n_tok = 1 + n_reg + grid * grid
    n = ids.size
    kinds = np.array(["cls"] + ["reg"] * n_reg + ["patch"] * grid * grid)
    is_patch = np.tile(kinds == "patch", n)
    rc = np.full((n_tok, 2), -1, np.int16)
    rc[1 + n_reg:] = np.stack(np.divmod(np.arange(grid * grid), grid), 1)
    rc = np.tile(rc, (n, 1))
    norm = rng.gamma(4.0, 10.0, n * n_tok).astype(np.float32)
    tokens = pa.table({
        "image_id": np.repeat(ids, n_tok), "token": np.tile(np.arange(n_tok, dtype=np.int32), n),
        "kind": pa.DictionaryArray.from_arrays(np.tile(np.arange(n_tok) > 0, n).astype(np.int8)
                                               + is_patch, ["cls", "reg", "patch"]).cast(pa.string()),
        "row": pa.array(rc[:, 0], mask=~is_patch), "col": pa.array(rc[:, 1], mask=~is_patch),
        "norm": norm, "attn": rng.random(n * n_tok, dtype=np.float32),
        "nbr_cos": pa.array(rng.random(n * n_tok, dtype=np.float32), mask=~is_patch),
        "slot": pa.array(np.arange(n * n_tok, dtype=np.int64), mask=np.full(n * n_tok, not stored)),
    })
    patch = norm.reshape(n, n_tok)[:, 1 + n_reg:]
    images = pa.table({
        "image_id": ids, "source_index": ids, "source_id": pa.array(ids.astype(str)),
        "label": pa.array(ids % 1000), "width": np.full(n, 500, np.int32),
        "height": np.full(n, 375, np.int32), "n_tokens": np.full(n, n_tok, np.int32),
        "max_patch_norm": patch.max(1), "mean_patch_norm": patch.mean(1),
    })
    errors = pa.table({"image_id": pa.array([], pa.int64()), "source_index": pa.array([], pa.int64()),
                       "source_id": pa.array([], pa.string()), "reason": pa.array([], pa.string())})
    return images, tokens, errors


def _write(lake: Path, run: str, *, n: int, shard: int, n_reg: int, grid: int, dim: int,
           stored: bool) -> float:
    started = time.perf_counter()
    n_tok = 1 + n_reg + grid * grid
    specs = {"cls_post": store.ArraySpec(shape=(dim,), dtype="float32", kind="image")}
    if stored:
        specs["tokens"] = store.ArraySpec(shape=(dim,), dtype="float16", kind="token")
    n_shards = -(-n // shard)
    writer = store.RunWriter(lake, run, config={"bench": run}, shard_size=shard,
                             n_shards=n_shards, tokens_per_image=n_tok, arrays=specs)
    rng = np.random.default_rng(0)
    for s in range(n_shards):
        if writer.shard_done(s):
            continue
        ids = np.arange(s * shard, min(n, (s + 1) * shard), dtype=np.int64)
        images, tokens, errors = _tables(ids, n_reg=n_reg, grid=grid, stored=stored, rng=rng)
        arrays = {"cls_post": np.zeros((ids.size, dim), np.float32)}
        if stored:  # cheap, distinct values: row r holds r modulo 2048 in every column
            rows = (np.arange(ids.size * n_tok) % 2048).astype(np.float16)
            arrays["tokens"] = np.repeat(rows[:, None], dim, 1)
        writer.write_shard(s, images=images, tokens=tokens, errors=errors, arrays=arrays)
    writer.commit({"model": run, "random_weights": True, "note": "synthetic bench run"})
    return time.perf_counter() - started


def _time(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run(*, out: Path, quick: bool) -> list[dict]:
    lake = out / "lake"
    big_n, gather_n = (20_000, 500) if quick else (200_000, 5_000)
    rows = []
    for run_name, n, shard, n_reg, grid, dim, stored in (
        ("tokens200k", big_n, 5_000, 4, 16, 8, False),
        ("run5k", 5_000, 500, 4, 16, 8, False),
        ("vitg224", gather_n, 250, 0, 16, 1536, True),
    ):
        took = _write(lake, run_name, n=n, shard=shard, n_reg=n_reg, grid=grid, dim=dim,
                      stored=stored)
        rows.append({"name": f"write synthetic run {run_name} ({n:,} images)", "value": took,
                     "unit": "s", "target": "-", "ok": None, "note": "setup, not a goal"})
    db = store.open_lake(lake)
    for run_name, target in (("tokens200k", 10.0), ("run5k", 0.5)):
        n_rows = db.sql(f"SELECT count(*) FROM tokens WHERE run = '{run_name}'").column(0)[0].as_py()
        for view in ("thresholds", "outliers"):
            query = (f"SELECT * FROM thresholds WHERE run = '{run_name}'" if view == "thresholds"
                     else f"SELECT count(*) FROM outliers WHERE run = '{run_name}'")
            took = _time(lambda q=query: db.sql(q))
            goal = target if not quick or run_name == "run5k" else None
            rows.append({"name": f"sql {view}, {run_name} ({n_rows / 1e6:.1f}M rows)",
                         "value": took, "unit": "s", "target": f"<= {target}",
                         "ok": None if goal is None else took <= target,
                         "note": "quick mode: smaller run" if goal is None else ""})
    slots = db.sql("SELECT slot FROM tokens WHERE run = 'vitg224'").column(0).to_numpy()
    pick = np.sort(np.random.default_rng(1).choice(slots, 10_000, replace=False))
    db.gather("vitg224", pick)  # warm the page cache and the memmaps
    took = _time(lambda: db.gather("vitg224", pick))
    got = db.gather("vitg224", pick)
    size_gb = slots.size * 1536 * 2 / 1e9
    rows.append({"name": f"gather 10k random embeddings, {size_gb:.1f} GB run (warm)",
                 "value": took, "unit": "s", "target": "<= 0.2",
                 "ok": took <= 0.2 if not quick else None, "note": ""})
    array = zarr.open_array(lake / "runs" / "vitg224" / "arrays.zarr" / "tokens", mode="r")
    global_slots = pick  # the tokens view already holds global slots
    zarr_took = _time(lambda: array.get_orthogonal_selection((global_slots, slice(None))), 1)
    same = np.array_equal(array.get_orthogonal_selection((global_slots, slice(None))), got)
    rows.append({"name": "zarr-python reading the same 10k rows / tokenlake gather",
                 "value": zarr_took / took, "unit": "x", "target": "-", "ok": None,
                 "note": f"zarr {zarr_took:.2f} s; identical values: {same}"})
    return rows
