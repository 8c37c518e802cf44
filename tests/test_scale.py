"""Shards as the unit of work: 1 worker, 2 workers and a submitit job array give the same lake;
a cluster task resumes from the markers."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os

import numpy as np
import pytest
import torch

from tokenlake.extract import ExtractRequest, _pixelstore, _scale, draw_subset, extract, open_source
from tokenlake.extract._job import commit_run
from tokenlake.extract._loader import default_workers, usable_cpus
from tokenlake.extract._pixelstore import default_shard_size
from tokenlake.extract._scale import ShardWork, _local_device, shard_groups
from tokenlake.store import LakeError, open_lake, write_subset

RUN = "pvt_b0-64-tiny-random"


def _lake(root, folder):
    write_subset(root, "tiny", draw_subset(open_source(str(folder)), n=None))
    return root


def _request(lake, **kw) -> ExtractRequest:
    return ExtractRequest(lake=str(lake), model="pvt_b0", subset="tiny", weights="random",
                          img_size=64, batch_size=2, shard_size=2, decode_workers=0, quiet=True,
                          device="cpu", **kw)


def _contents(lake) -> dict:
    db = open_lake(lake)
    out = {t: db.sql(f"SELECT * EXCLUDE (run) FROM {t} ORDER BY ALL") for t in
           ("images", "tokens", "errors")}
    slots = out["tokens"].column("slot").to_numpy()
    out["emb"], out["pix"] = db.gather(RUN, slots, pixels=True)
    out["cls"] = db.image_array(RUN, "cls_post", out["images"].column("image_id").to_numpy())
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory, image_helpers):
    root = tmp_path_factory.mktemp("imgs")
    image_helpers.write_imagefolder(root, per_class=3)
    return root


def test_shard_groups_cover_every_shard_once():
    groups = shard_groups(list(range(7)), 3)
    assert sorted(s for g in groups for s in g) == list(range(7))
    assert shard_groups([4], 3) == [[4]]


def test_one_worker_and_two_workers_write_identical_lakes(tmp_path, folder):
    one, two = _lake(tmp_path / "one", folder), _lake(tmp_path / "two", folder)
    extract(_request(one), log=lambda _t: None)
    manifest = extract(_request(two, workers=2), log=lambda _t: None)
    assert manifest["workers"] == 2 and manifest["n_shards"] == 6
    a, b = _contents(one), _contents(two)
    for name in ("images", "tokens", "errors"):
        assert a[name].equals(b[name]), name
    for name in ("emb", "pix", "cls"):
        np.testing.assert_array_equal(a[name], b[name])
    assert open_lake(two).validate() == []


def test_submitit_job_array_path(tmp_path, folder):
    """The SLURM path through submitit, on its local cluster (the same pickled work items)."""
    lake = _lake(tmp_path / "sub", folder)
    manifest = extract(_request(lake, workers=3, executor="slurm", slurm={"cluster": "local"}),
                       log=lambda _t: None)
    assert manifest["executor"] == "slurm" and manifest["n_images"] == 9
    (sub,) = (lake / ".tokenlake" / "jobs").iterdir()  # the runner's records, as `tokenlake run`
    assert len(list((sub / "logs" / f"extract.{RUN}").glob("*_submitted.pkl"))) == 3
    for task in ("0", "1", "2"):
        events = sorted(p.name for p in (sub / "tasks" / f"extract.{RUN}.{task}").iterdir())
        assert [e.split(".")[2] for e in events] == ["started", "done"]
    assert open_lake(lake).validate() == []


def test_a_shard_task_resumes_from_the_markers(tmp_path, folder):
    """What a requeued task does: the shards already committed are skipped, not rewritten."""
    lake = _lake(tmp_path / "lake", folder)
    request = _request(lake)
    assert ShardWork(request, (0, 2))() == f"run {RUN}: 2 of 2 shards"
    marker = lake / "runs" / RUN / "shards" / "s00000.json"
    written = marker.stat().st_mtime_ns
    assert ShardWork(request, (0, 2, 4))() == f"run {RUN}: 3 of 3 shards"
    assert marker.stat().st_mtime_ns == written
    with pytest.raises(LakeError, match="shards"):  # the manifest waits for every shard
        commit_run(request)
    ShardWork(request, (1, 3, 5))()
    assert commit_run(request)["n_shards"] == 6


# -- devices per worker, CPU counts, process pools after CUDA (CUDA faked on the CPU) -----------

@dataclasses.dataclass(frozen=True)
class _Request:
    quiet: bool = False


@dataclasses.dataclass(frozen=True)
class _Plan:  # the fields of a Plan that `_local_device` and `_worker` touch
    device: torch.device
    request: _Request = _Request()


@pytest.mark.parametrize(("gpus", "expected"), [(3, [0, 1, 2, 0, 1]), (1, [0] * 5)])
def test_workers_map_round_robin_to_the_gpus(monkeypatch, gpus, expected):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    plan = _Plan(torch.device("cuda"))
    assert [_local_device(plan, i).device for i in range(5)] == [
        torch.device("cuda", k) for k in expected]
    named = _Plan(torch.device("cuda", 1))  # the user's choice, for every worker
    assert {_local_device(named, i).device for i in range(3)} == {torch.device("cuda", 1)}
    cpu = _Plan(torch.device("cpu"))
    assert _local_device(cpu, 2) is cpu


def test_a_worker_sets_its_device_before_any_work(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: events.append(("set", index)))
    monkeypatch.setattr(_scale, "work", lambda p, shards, log: events.append(
        ("work", p.request.quiet, shards)) or {})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _scale._worker(_local_device(_Plan(torch.device("cuda")), 3), [1, 3])
    assert events == [("set", 1), ("work", True, [1, 3])]
    events.clear()
    _scale._worker(_Plan(torch.device("cpu")), [0])
    assert events == [("work", True, [0])]  # no CUDA call on the CPU


def test_cpu_counts_follow_the_jobs_allocation(monkeypatch):
    """Under SLURM os.cpu_count() is the node's; the affinity mask is the job's."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6}, raising=False)
    assert usable_cpus() == 3 and default_workers() == 2
    assert _pixelstore._threads() == 3
    assert default_shard_size(1200, workers=usable_cpus(), decoder="pil") == 100
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows
    assert usable_cpus() == 64 and default_workers() == 8
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert usable_cpus() == 1 and default_workers() == 1


def test_pools_started_after_cuda_do_not_fork(monkeypatch):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform: pools spawn anyway")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert _pixelstore.pool_context().get_start_method() == "fork"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert _pixelstore.pool_context().get_start_method() in ("forkserver", "spawn")
