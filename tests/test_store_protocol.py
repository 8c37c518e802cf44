"""Shard commit protocol: markers, invisibility of uncommitted work, determinism, validate, locks."""

from __future__ import annotations

import multiprocessing as mp
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from tokenlake.store import (
    ArraySpec,
    LakeError,
    RunConfigMismatch,
    RunExists,
    RunWriter,
    open_lake,
    write_run,
)
from tokenlake.store.testing import tiny_run

SS = 4  # shard_size


def _specs(r) -> dict[str, ArraySpec]:
    return {
        n: ArraySpec(
            shape=a.shape[1:],
            dtype=a.dtype.name,
            kind="token" if n in ("tokens", "pixels") else "image",
        )
        for n, a in r["arrays"].items()
    }


def _writer(lake, r, *, run="w", config=None, n_shards=2) -> RunWriter:
    return RunWriter(
        lake,
        run,
        config=config or r["manifest"],
        shard_size=SS,
        n_shards=n_shards,
        tokens_per_image=21,
        arrays=_specs(r),
    )


def _shard(r, i) -> dict:
    """Arguments of write_shard for shard i of a synthetic run (slots made local)."""
    im = pc.equal(pc.divide(r["images"].column("image_id"), SS), i)
    images = r["images"].filter(im)
    tokens = r["tokens"].filter(pc.equal(pc.divide(r["tokens"].column("image_id"), SS), i))
    slot = tokens.column("slot").to_numpy()
    tokens = tokens.set_column(8, "slot", pa.array(slot - slot.min(), pa.int64()))
    keep = np.asarray(im)
    arrays = {
        n: (a[slot] if n in ("tokens", "pixels") else a[keep]) for n, a in r["arrays"].items()
    }
    errors = r["errors"].filter(pc.equal(pc.divide(r["errors"].column("image_id"), SS), i))
    return {"images": images, "tokens": tokens, "errors": errors, "arrays": arrays}


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def test_rewrite_after_crash_is_byte_identical(tmp_path):
    r = tiny_run(n_images=7, error_ids=(6,))
    w = _writer(tmp_path / "a", r)
    m1 = w.write_shard(1, **_shard(r, 1))
    first = _snapshot(w.dir)
    w.marker_path(1).unlink()  # a crash just before the marker
    assert w.committed() == set()
    assert w.write_shard(1, **_shard(r, 1)) == m1
    assert _snapshot(w.dir) == first
    # An independent lake given the same inputs holds the same bytes too.
    w2 = _writer(tmp_path / "b", r)
    w2.write_shard(1, **_shard(r, 1))
    assert _snapshot(w2.dir) == first
    with pytest.raises(LakeError, match="already committed"):
        w.write_shard(1, **_shard(r, 1))


def test_uncommitted_work_is_invisible(tmp_path):
    r = tiny_run(n_images=8)
    w = _writer(tmp_path, r)
    w.write_shard(0, **_shard(r, 0))
    w.write_shard(1, **_shard(r, 1))
    w.marker_path(1).unlink()  # shard 1: files present, no marker
    lk = open_lake(tmp_path)
    assert lk.runs() == []
    (partial,) = lk.runs(include_incomplete=True)
    assert (partial["status"], partial["shards_committed"], partial["n_images"]) == (
        "partial",
        1,
        4,
    )
    assert lk.sql("SELECT count(*) AS n FROM tokens").column("n")[0].as_py() == 0
    cap = lk.layout("w").slot_capacity
    lk.gather("w", [0])
    with pytest.raises(LakeError, match="uncommitted shard"):
        lk.gather("w", [cap])
    with pytest.raises(LakeError, match=r"1 of 2 shard\(s\) not committed: s00001"):
        w.commit(r["manifest"])
    assert not (w.dir / "manifest.json").exists()

    w.write_shard(1, **_shard(r, 1))
    w.commit(r["manifest"])
    # Orphans of a crashed writer: temp files and a stray parquet file no marker lists.
    for sub in ("tokens", "images"):
        shutil.copy(w.dir / sub / "s00000.parquet", w.dir / sub / "s00000.parquet.tmp-1-dead")
        shutil.copy(w.dir / sub / "s00000.parquet", w.dir / sub / "s00007.parquet")
    lk = open_lake(tmp_path)
    assert lk.sql("SELECT count(*) AS n FROM tokens").column("n")[0].as_py() == 8 * 21
    assert lk.sql("SELECT count(*) AS n FROM images").column("n")[0].as_py() == 8
    assert lk.validate() == []


def test_validate_detects_corruption(tmp_path):
    r = tiny_run(n_images=8)
    write_run(tmp_path, "v", shard_size=SS, **r)
    lk = open_lake(tmp_path)
    assert lk.validate() == []
    f = tmp_path / "runs" / "v" / "tokens" / "s00001.parquet"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    chunk = tmp_path / "runs" / "v" / "arrays.zarr" / "tokens" / "c" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[10] ^= 0x01
    chunk.write_bytes(bytes(raw))
    problems = lk.validate("v")
    assert any("tokens/s00001.parquet does not match its checksum" in p for p in problems)
    assert any("array 'tokens' chunks do not match" in p and "v/s00000" in p for p in problems)
    assert len(problems) == 2


def test_config_mismatch_and_run_exists(tmp_path):
    r = tiny_run(n_images=8)
    _writer(tmp_path, r, config={"model": "a", "img_size": 224, "seed": 1})
    with pytest.raises(
        RunConfigMismatch, match=r"\['img_size', 'seed'\].*--run NEW_NAME or delete runs/w"
    ):
        _writer(tmp_path, r, config={"model": "a", "img_size": 518, "seed": 2})
    with pytest.raises(RunConfigMismatch, match="layout.n_shards"):
        _writer(tmp_path, r, config={"model": "a", "img_size": 224, "seed": 1}, n_shards=3)
    write_run(tmp_path, "done", **r)
    with pytest.raises(RunExists, match="already complete"):
        write_run(tmp_path, "done", **{**r, "manifest": {**r["manifest"], "model": "other"}})


def _contend(lake, r, barrier, out):
    w = _writer(lake, r)
    barrier.wait()
    with w.claim(0) as todo:
        if todo:
            w.write_shard(0, **_shard(r, 0))
        out.put(todo)


def test_two_processes_same_shard(tmp_path):
    r = tiny_run(n_images=8)
    _writer(tmp_path, r)
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(tmp_path, r, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(out.get(timeout=5) for _ in procs) == [False, True]
    w = _writer(tmp_path, r)
    assert w.committed() == {0}
    assert open_lake(tmp_path).validate() == []
    assert not list((w.dir / "tokens").glob("*.tmp-*"))
