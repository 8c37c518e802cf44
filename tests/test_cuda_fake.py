"""The extraction loop's GPU branch, run on the CPU through `FakeStreams`: it writes the very bytes
the CPU branch writes for every policy, keep-if-outlier and test-time registers, while the fake
holds every non-blocking copy back and poisons what it has not written yet; and the fake does
catch a loop that reads before it waits."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from tokenlake import store
from tokenlake.cli.main import main
from tokenlake.extract import ExtractRequest, _cuda, _loop, extract
from tokenlake.extract._cuda import BatchTooLarge, FakeStreams

# a batch of 2 and shards of 4: several batches in flight per shard, and a shard boundary inside
COMMON = ["--model", "dinov2_s_reg4", "--subset", "tiny", "--weights", "random", "--img-size", "56",
          "--batch-size", "2", "--shard-size", "4", "--decode-workers", "0", "--device", "cpu",
          "--quiet"]
VOLATILE = {"wall_time_s", "loop_images", "loop_time_s"}
CONFIGS = {
    "all": [],
    "sample": ["--policy", "sample", "--outlier-ref", "ref", "--normals-per-image", "3"],
    "summary": ["--policy", "summary"],
    # image 7 is the subset's one image with an outlier: the run stops with batch [8, 9] launched
    "keep-if-outlier": ["--keep-if-outlier", "--n", "1", "--outlier-ref", "ref", "--policy",
                        "sample"],
    "test-time-registers": ["--test-time-registers", "ref:2"],
}


def _extract(lake: Path, run: str, *extra: str) -> int:
    return main(["extract", "--lake", str(lake), "--run", run, *COMMON, *extra])


def _ranking(run: str) -> pa.Table:
    """A made-up neuron ranking of `run`: what --test-time-registers reads, without the analysis."""
    n = 4
    cols = {"run": [run] * n, "method": ["jiang"] * n, "detect_block": [5] * n,
            "highest_block": [5] * n, "sparsity_filter": [True] * n, "rank": [1, 2, 3, 4],
            "block": [5, 5, 3, 4], "neuron": [101, 7, 900, 33], "score": [4.0, 3.0, 2.0, 1.0]}
    cols |= {k: [0.5] * n for k in ("mean_abs_outlier", "mean_abs_normal", "outlier_share",
                                    "sparse_share")}
    cols |= {k: [10] * n for k in ("n_images", "n_outlier", "n_normal")}
    return pa.table(cols)


@pytest.fixture(scope="module")
def base(tmp_path_factory, image_helpers) -> Path:
    """A lake with the subset, a reference run `ref` (CPU branch) and a ranking of its neurons."""
    root = tmp_path_factory.mktemp("imgs")
    image_helpers.write_imagefolder(root, per_class=3)
    lake = tmp_path_factory.mktemp("base") / "lake"
    assert main(["subset", "--lake", str(lake), "--name", "tiny", "--data", str(root)]) == 0
    assert _extract(lake, "ref") == 0
    store.write_neurons(lake, "ref", _ranking("ref"))
    return lake


@pytest.fixture
def fakes(monkeypatch) -> list[FakeStreams]:
    """Every FakeStreams the loop makes, for the test to inspect: the GPU branch on the CPU."""
    made: list[FakeStreams] = []

    def streams_for(device: torch.device) -> FakeStreams:
        made.append(FakeStreams(device))
        return made[-1]

    monkeypatch.setattr(_cuda, "streams_for", streams_for)
    return made


def _copy(base: Path, dst: Path) -> Path:
    shutil.copytree(base, dst)
    return dst


def _committed(lake: Path, run: str) -> dict[str, str]:
    """sha256 of every committed file of the run (its manifest apart, without timings)."""
    out = {}
    for f in sorted((lake / "runs" / run).rglob("*")):
        if f.is_file() and f.suffix != ".lock" and ".tmp-" not in f.name:
            if f.name == "manifest.json":
                manifest = {k: v for k, v in json.loads(f.read_text()).items()
                            if k not in VOLATILE}
                out[f.name] = json.dumps(manifest, sort_keys=True)
            else:
                out[str(f.relative_to(lake))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _cpu_and_gpu_branch(base: Path, tmp_path: Path, fakes: list[FakeStreams], monkeypatch,
                        *extra: str) -> tuple[Path, Path]:
    """The same run in two copies of `base`: by the CPU branch, then by the fake GPU branch."""
    cpu, gpu = _copy(base, tmp_path / "cpu"), _copy(base, tmp_path / "gpu")
    with monkeypatch.context() as m:
        m.setattr(_cuda, "streams_for", lambda device: None)
        assert _extract(cpu, "x", *extra) == 0
    assert not fakes
    assert _extract(gpu, "x", *extra) == 0
    return cpu, gpu


@pytest.mark.parametrize("config", CONFIGS)
def test_gpu_branch_writes_the_cpu_branchs_bytes(config, base, tmp_path, fakes, monkeypatch):
    cpu, gpu = _cpu_and_gpu_branch(base, tmp_path, fakes, monkeypatch, *CONFIGS[config])
    (fake,) = fakes
    expected, got = _committed(cpu, "x"), _committed(gpu, "x")
    assert len([k for k in got if k.endswith(".json")]) >= 3  # shard markers and the manifest
    assert got == expected
    assert fake.pending() == 0
    # the only pageable copy is the input's: the DataLoader pins it on a GPU (`pin=`), not here
    assert set(fake.pageable) == {"upload"}
    n_batches = sum(1 for s, (what, _) in fake.waits if s == "compute" and what == "uploaded")
    assert n_batches >= 3 and fake.recorded_streams == ["compute"] * n_batches
    if config in ("sample", "keep-if-outlier"):
        assert any(s == "gather" for s, _ in fake.waits)  # not vacuous: the gather ran


def test_a_batchs_gather_waits_only_on_its_own_forward_pass(base, tmp_path, fakes):
    lake = _copy(base, tmp_path / "lake")
    assert _extract(lake, "x", *CONFIGS["sample"]) == 0
    (fake,) = fakes
    gathers = [(i, label) for i, (s, label) in enumerate(fake.waits) if s == "gather"]
    uploaded = [b for _, (what, b) in fake.waits if what == "uploaded"]  # batches with images
    assert len(uploaded) >= 3
    # every batch keeps its prefix tokens, so each gathers once, after its own forward pass
    assert [label for _, label in gathers] == [("computed", b) for b in uploaded]
    for position, (_, batch) in gathers:
        # batch b + 1 was launched before batch b's gather waited: the wait was not for it
        launched = max(b for _, (what, b) in fake.waits[:position] if what == "uploaded")
        assert launched == min(batch + 1, uploaded[-1])


def test_a_run_stopped_early_drains_its_copies(base, tmp_path, fakes, monkeypatch):
    """keep-if-outlier stops at its n-th image with the next batch's copies still queued."""
    lake = _copy(base, tmp_path / "lake")
    assert _extract(lake, "drained", *CONFIGS["keep-if-outlier"]) == 0
    assert fakes[-1].pending() == 0
    monkeypatch.setattr(_loop._Extractor, "drain", lambda self: None)
    assert _extract(lake, "undrained", *CONFIGS["keep-if-outlier"]) == 0
    assert fakes[-1].pending() > 0  # what drain is for: the check above can fail


# -- the fake itself: what it holds back, and that a loop that does not wait reads poison ----------


def test_fake_copies_land_only_when_their_event_is_synchronised():
    s = FakeStreams(torch.device("cpu"))
    src = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    pinned = {"x": s.pinned_empty((2, 3), torch.float32)}
    host = s.to_host(pinned["x"], src, stream=s.stream("copy"))
    done = s.record(s.stream("copy"), label=("copied", 0))
    assert torch.isnan(host).all() and s.pending() == 1
    with pytest.raises(RuntimeError, match="released while a copy into it is still queued"):
        s.release(pinned)
    done.synchronize()
    assert torch.equal(host, src) and s.pending() == 0 and s.pageable == []
    s.release(pinned)
    assert torch.isnan(pinned["x"]).all()  # a result still pointing into the set reads poison
    assert s.take_pinned() is pinned

    pixels = torch.full((2, 4), 7, dtype=torch.uint8)  # pageable: logged, as it blocks on a GPU
    dev = s.upload(pixels, label=("uploaded", 0))  # the compute stream waits: copied by then
    assert torch.equal(dev, pixels) and s.waits == [("compute", ("uploaded", 0))]
    assert s.pageable == ["upload"] and s.recorded_streams == ["compute"]
    early = s.to_device(pixels, stream=s.stream("upload"))  # nobody waited on it yet
    assert (early == 0xA5).all()
    with s.use(s.stream("upload")):  # kernels on the copy's own stream are ordered after it
        assert torch.equal(s.to_device(pixels, stream=s.stream("upload")), pixels)


def test_env_var_selects_the_fake_and_refuses_a_real_gpu(monkeypatch):
    monkeypatch.delenv(_cuda.FAKE_ENV, raising=False)
    assert _cuda.streams_for(torch.device("cpu")) is None
    monkeypatch.setenv(_cuda.FAKE_ENV, "1")
    assert isinstance(_cuda.streams_for(torch.device("cpu")), FakeStreams)
    with pytest.raises(ValueError, match="--device cpu"):
        _cuda.streams_for(torch.device("cuda"))


class _Careless(FakeStreams):
    """A loop that forgets one wait: `skip` names the event label it does not wait for."""

    def __init__(self, device, skip: str) -> None:
        super().__init__(device)
        self.skip = skip

    def record(self, stream, *, label):
        event = super().record(stream, label=label)
        if label[0] == self.skip:
            event.raw.synchronize = lambda: None
        return event


@pytest.mark.parametrize(("skip", "config"), [("copied", "all"), ("gathered", "sample")])
def test_a_loop_that_reads_its_copies_before_they_are_done_is_caught(skip, config, base, tmp_path,
                                                                     monkeypatch):
    """The host reads the pinned set (poison) and gives it back with the copy still queued."""
    lake = _copy(base, tmp_path / "lake")
    monkeypatch.setattr(_cuda, "streams_for", lambda device: _Careless(device, skip))
    with pytest.raises(RuntimeError, match="released while a copy into it is still queued"):
        _extract(lake, "x", *CONFIGS[config])


def test_a_forward_pass_that_does_not_wait_for_its_upload_sees_poison(base, tmp_path,
                                                                       monkeypatch):
    cpu = _copy(base, tmp_path / "cpu")
    assert _extract(cpu, "x") == 0
    careless = _copy(base, tmp_path / "careless")
    monkeypatch.setattr(_cuda, "streams_for", lambda device: _Careless(device, "uploaded"))
    assert _extract(careless, "x") == 0
    db = store.open_lake(careless)
    ids = db.sql("SELECT image_id FROM images WHERE run = 'x' ORDER BY 1").column(0).to_numpy()
    # every image looked like a flat 0xA5 grey to the model: one and the same CLS output
    cls = db.image_array("x", "cls_post", ids)  # [N, D]
    assert len(ids) > 1 and (cls == cls[0]).all()
    assert (store.open_lake(cpu).image_array("x", "cls_post", ids) != cls).any()
    assert _committed(careless, "x") != _committed(cpu, "x")


# -- out of memory on the first batch ---------------------------------------------------------------


class _OutOfMemory:
    """An adapter whose forward pass runs out of memory from call `after` on."""

    def __init__(self, inner, after: int) -> None:
        self.inner, self.after, self.calls = inner, after, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, x):
        self.calls += 1
        if self.calls > self.after:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x)


@pytest.mark.parametrize(("after", "batch_size", "expected"), [
    (0, 4, BatchTooLarge), (0, 1, BatchTooLarge), (3, 2, torch.OutOfMemoryError)])
def test_out_of_memory_on_the_first_batch_names_the_batch_size_to_try(
        after, batch_size, expected, base, tmp_path, fakes, monkeypatch):
    make = _loop.make_adapter
    monkeypatch.setattr(_loop, "make_adapter", lambda *a, **kw: _OutOfMemory(make(*a, **kw), after))
    request = ExtractRequest(lake=str(_copy(base, tmp_path / "lake")), model="dinov2_s_reg4",
                             subset="tiny", weights="random", img_size=56, run="x",
                             batch_size=batch_size, shard_size=4, decode_workers=0, quiet=True,
                             device="cpu")
    with pytest.raises(torch.OutOfMemoryError) as caught:
        extract(request, log=lambda _t: None)
    assert type(caught.value) is expected
    assert fakes[-1].pending() == 0  # drained on the way out: no copy left into a pinned set
    if expected is BatchTooLarge:  # a later batch's error is left as it was
        hint = "--batch-size 2" if batch_size == 4 else "--img-size"
        assert "--batch-size" in str(caught.value) and hint in str(caught.value)
        assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)


def test_the_command_line_prints_the_batch_size_to_try(base, tmp_path, fakes, monkeypatch, capsys):
    make = _loop.make_adapter
    monkeypatch.setattr(_loop, "make_adapter", lambda *a, **kw: _OutOfMemory(make(*a, **kw), 0))
    assert _extract(_copy(base, tmp_path / "lake"), "x") == 2  # a user error: no traceback
    err = capsys.readouterr().err
    assert "rerun with --batch-size 1" in err and "Traceback" not in err
