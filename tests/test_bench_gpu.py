"""The GPU bench's code path, run on the CPU with a tiny model: rows, fields and finite ratios.

The GPU session runs `python bench/run.py --only gpu` once; this keeps that one run from failing
on something a CPU could have caught.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH.parent))  # as under bench/run.py: bench/_disk.py imports
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # as bench/run.py loads it: dataclasses and pools need it
    spec.loader.exec_module(module)
    return module


MODEL = ("pvt_b0", 64, 4)


def _tiny(bench):
    return bench.Sizes(loop_s=0.1, min_batches=1, bare_s=0.05, warmup_steps=1,
                       disk_bytes=8 << 20, disk_max_s=1.0, all_disk_s=1.0, capacity_images=16,
                       max_images=24, budget_s=1e9)


def _measure(bench, tmp_path, strict=True, **kw):
    return list(bench.measure(tmp_path / "out", device="cpu", models=(MODEL,),
                              jpeg_models=(MODEL[0],), sizes=_tiny(bench),
                              rates={MODEL[0]: 100.0}, n_images=24, strict=strict,
                              log=lambda _t: None, **kw))


@pytest.fixture(autouse=True)
def _one_decode_worker(bench, monkeypatch):
    """One DataLoader worker: the JPEG-fed run of 24 images then decodes 4 past the 16 it may
    prefetch during its warm-up batch (with every core of a big node it would be undersized)."""
    monkeypatch.setattr(bench, "usable_cpus", lambda: 1)


def _check(bench, rows):
    expected = [name for name, _u, _t in bench.GLOBAL_ROWS]
    expected += [name for name, _u, _t in bench.row_specs(*MODEL[:2], jpeg=True)]
    assert [r["name"] for r in rows] == expected
    for row in rows:
        assert {"name", "value", "unit", "target", "ok", "note"} <= set(row), row
        assert math.isfinite(row["value"]) and row["value"] > 0, row
        assert row["note"] and "NOT RUN" not in row["note"]
    by = {r["name"]: r for r in rows}
    assert 60_000 < by[expected[0]]["mean_bytes"] < 200_000  # ImageNet-like JPEG sizes
    for row in rows[2:]:
        assert (row["model"], row["img_size"], row["batch"]) == MODEL
        if row["name"].startswith(("bare", "extraction")):
            assert row["bare_img_s"] > 0
    policies = {r.get("policy"): r for r in rows if "extract_img_s" in r}
    assert set(policies) == {"all", "sample", "summary"}
    for row in (r for r in rows if "extract_img_s" in r):
        assert row["ok"] in (True, False) and row["extract_img_s"] > 0
        assert row["source"] in ("pixel store", "jpeg")
    assert [r["source"] for r in rows if r.get("source") == "jpeg"] == ["jpeg"]
    build = rows[3]
    assert build["build_img_s"] > 0 and build["capacity_img_s"] >= build["cpu_decode_img_s"]
    return by


def test_gpu_bench_core_runs_on_the_cpu(bench, tmp_path, monkeypatch):
    """The whole measurement. The disk is made slow, so the `all` run is held to it and runs on
    a smaller subset with its own store (one batch: its output is capped at 1 s of this disk)."""
    monkeypatch.setattr(bench, "disk_bandwidth", lambda folder, sizes: (5e4, 1 << 20))
    rows = _measure(bench, tmp_path)
    by = _check(bench, rows)
    all_row = next(r for r in rows if r.get("policy") == "all")
    assert all_row["disk_bound"] and all_row["target"] == ">= 0.9 x disk"
    assert "DISK-BOUND" in all_row["note"]
    assert all_row["value"] == pytest.approx(all_row["write_bytes_s"] / 5e4)
    timed_bytes = all_row["run_bytes"] / all_row["run_images"] * all_row["images"]
    assert all_row["write_bytes_s"] == pytest.approx(timed_bytes / all_row["loop_time_s"])
    jpeg_row = rows[-1]  # decoding measured: images beyond what was prefetched in the warm-up
    assert jpeg_row["prefetched_max"] == 16 and jpeg_row["images"] - 16 >= MODEL[2]
    assert "UNDERSIZED" not in jpeg_row["note"]
    assert all_row["images"] == MODEL[2]
    assert by["disk sequential write bandwidth (fsync'd)"]["disk_bytes_s"] == 5e4
    assert not (tmp_path / "out" / "lakes").exists()  # lakes are deleted as it goes


def test_disk_bandwidth_writes_and_removes(bench, tmp_path):
    sizes = bench.Sizes(disk_bytes=4 << 20)
    rate, written = bench.disk_bandwidth(tmp_path, sizes)
    assert rate > 0 and written == 4 << 20 and not list(tmp_path.iterdir())


def test_counts_cap_the_all_run_by_the_disk(bench):
    sizes = bench.Sizes(loop_s=2.0, min_batches=20, all_disk_s=5.0)
    c = bench.counts(13_000, 256, 360e3, 0.5e9, 2000, sizes, 50_000)
    assert c.n == 26_112 and c.n_all == 7_168 and c.n_jpeg == 5_120 + 256  # 20 batches at least
    assert bench.counts(13_000, 256, 360e3, float("inf"), 2000, sizes, 10_000).n == 10_000


def test_the_jpeg_run_decodes_past_what_the_workers_prefetch(bench):
    """16 workers decode up to 16 x 4 batches of 256 while the warm-up batch runs: without
    those on top, 20 batches would all be decoded before the timed loop starts."""
    sizes = bench.Sizes(loop_s=2.0, min_batches=20)
    c = bench.counts(13_000, 256, 360e3, 0.5e9, 2000, sizes, 50_000, decode_workers=16)
    assert c.prefetched == 16 * bench.PREFETCH_FACTOR * 256
    assert c.n_jpeg == 5_120 + c.prefetched + 256


def test_the_bare_forward_enters_autocast_per_batch(bench, monkeypatch):
    entered, real = [], bench.torch.autocast

    def autocast(*args, **kw):
        entered.append(kw.get("enabled"))
        return real(*args, **kw)

    monkeypatch.setattr(bench.torch, "autocast", autocast)
    sizes = _tiny(bench)
    _rate, timed = bench.bare_forward(*MODEL, bench.torch.device("cpu"), sizes)
    assert len(entered) == sizes.warmup_steps + 1 + timed // MODEL[2]
    assert set(entered) == {False}  # float32 on the CPU, as the extraction computes there


def test_a_failing_row_does_not_end_the_bench(bench, tmp_path, monkeypatch):
    """A CUDA error (a RuntimeError) in one row: that row says FAILED, the next are measured."""
    real = bench._extract

    def sample_breaks(*args, **kw):
        if args[6] == "sample":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(*args, **kw)

    monkeypatch.setattr(bench, "_extract", sample_breaks)
    rows = _measure(bench, tmp_path, strict=False)
    failed = [r for r in rows if "error" in r]
    assert [r["name"] for r in failed] == [bench.row_specs(*MODEL[:2], jpeg=True)[3][0]]
    assert failed[0]["ok"] is False and math.isnan(failed[0]["value"])
    assert "illegal memory access" in failed[0]["note"] and failed[0]["model"] == MODEL[0]
    after = rows[rows.index(failed[0]) + 1:]
    assert [r["policy"] for r in after] == ["summary", "summary"]  # store-fed, then JPEG-fed
    assert all(math.isfinite(r["value"]) for r in after)

    def bare_breaks(*args, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bench, "bare_forward", bare_breaks)
    rows = _measure(bench, tmp_path, strict=False)
    model_rows = rows[len(bench.GLOBAL_ROWS):]
    assert len(model_rows) == 6 and all(r["ok"] is False for r in model_rows)
    assert "out of memory" in model_rows[0]["note"]
    assert all("needs the bare rate" in r["note"] for r in model_rows[1:])
    with pytest.raises(torch.OutOfMemoryError):
        _measure(bench, tmp_path)  # strict: raised


def test_without_cuda_every_row_says_not_run(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    rows = list(bench.run(out=tmp_path, quick=False))
    assert len(rows) == 2 + 5 * 6 + 2
    assert all(math.isnan(r["value"]) and r["ok"] is None and r["note"] == bench.NOT_RUN
               for r in rows)
    assert {r["model"] for r in rows if "model" in r} == {a for a, _p, _b in bench.MODELS}


def test_gpu_decoder_branch_runs_on_the_cpu(bench, tmp_path, monkeypatch):
    """The branch a GPU takes when torchvision decoding beats the CPU pool: the store is built
    with decoder="torchvision" and extraction asks for it. Needs the decoder API of
    `decode_capacity` / `build_pixel_store` (decoder=, device=) and `ExtractRequest(decoder=)`."""
    from tokenlake.extract import _pixelstore

    real, calls = _pixelstore.decode_capacity, []

    def gpu_wins(paths, cfg, *, workers, **kw):
        calls.append(kw)
        rate = real(paths, cfg, workers=workers, **kw)
        return rate * 1000 if kw.get("decoder") == "torchvision" else rate

    monkeypatch.setattr(_pixelstore, "decode_capacity", gpu_wins)
    rows = _measure(bench, tmp_path, gpu_decode=True)
    _check(bench, rows)
    assert {"decoder": "torchvision", "device": "cpu"} in calls
    build = rows[3]
    assert build["decoder"] == "torchvision" and build["gpu_decode_img_s"] > build["cpu_decode_img_s"]
    assert "torchvision on cpu" in build["note"]
    assert "PIL" in rows[-1]["note"]  # JPEG-fed runs decode with PIL (torchvision only builds stores)


@pytest.mark.slow  # a forkserver and two workers importing torch: ~6 s
def test_images_are_written_by_a_pool_that_does_not_fork_after_cuda(bench, tmp_path, monkeypatch):
    """On a GPU the bench names the device (CUDA starts) before it writes its JPEGs: the pool's
    workers then start from a forkserver, and must still find this module's writer."""
    monkeypatch.setattr(bench.torch.cuda, "is_initialized", lambda: True)
    assert bench.pool_context().get_start_method() in ("forkserver", "spawn")
    paths = bench.make_images(tmp_path, 2, workers=2, chunk=1)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["img000000.jpg", "img000001.jpg"]
    assert all(60_000 < Path(p).stat().st_size < 200_000 for p in paths)
