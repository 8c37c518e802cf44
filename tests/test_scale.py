"""Shards as the unit of work: 1 worker, 2 workers and a submitit job array give the same lake;
a cluster task resumes from the markers."""

from __future__ import annotations

import numpy as np
import pytest

from tokenlake.extract import ExtractRequest, draw_subset, extract, open_source
from tokenlake.extract._job import commit_run
from tokenlake.extract._scale import ShardWork, shard_groups
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
