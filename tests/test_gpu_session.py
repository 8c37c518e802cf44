"""bench/gpu_first_session.py, known to run before the GPU session it is for: every step's logic
on the CPU (--cpu-smoke), and the judgements it makes from what a GPU would report."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_first_session.py"


@pytest.fixture(scope="module")
def session():
    spec = importlib.util.spec_from_file_location("gpu_first_session", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_first_session"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(session, tmp_path_factory):
    """One --cpu-smoke run of every step (~25 s: two child processes, two extraction workers)."""
    out = tmp_path_factory.mktemp("session")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(session.SAMPLE_ENV, raising=False)  # generated photos: small and quick
        code = session.main(["--cpu-smoke", "--out", str(out)])
    return code, out, json.loads((out / "session.json").read_text())


@pytest.mark.slow  # the smoke run: ~25 s
def test_every_step_runs_on_the_cpu(session, smoke):
    code, out, summary = smoke
    assert code == 0 and summary["ok"] and summary["smoke"] and summary["device"] == "cpu"
    steps = summary["steps"]
    assert list(steps) == list(session.STEPS)
    assert all(r["ok"] is not False and r["seconds"] >= 0 for r in steps.values()), steps
    child = steps["sanitizer"]["child"]  # the child really extracted, both ways
    assert child == {"store_fed_images": 16, "decoded_images": 16, "sanitizer": None}
    assert steps["sync_debug"]["synchronisations"] == 0  # the mode is off on the CPU
    assert steps["workers_gpu0"]["workers_in_manifest"] == 2
    assert steps["workers_gpu0"]["ok"] is None and "nvidia-smi" in steps["workers_gpu0"]["note"]
    assert not (out / "lakes").exists()  # each step's lakes are removed after it


@pytest.mark.slow  # the smoke run: ~25 s
def test_the_cpu_against_itself_is_exact_and_bf16_within_tolerance(smoke):
    """The same seeded random weights on both sides: fp32 equal to the bit, bf16 close."""
    compared = smoke[2]["steps"]["cpu_vs_gpu"]
    fp32, bf16 = compared["fp32"], compared["bf16"]
    assert fp32["tokens"] == bf16["tokens"] > 0
    assert fp32["norm_rel_max"] == 0.0 and fp32["attn_abs_max"] == 0.0
    assert 0.0 < bf16["norm_rel_median"] <= bf16["tolerance"]["norm_rel_median"]
    assert math.isfinite(bf16["attn_abs_p99"])


@pytest.mark.slow  # the smoke run: ~25 s
def test_the_bench_results_are_copied(smoke):
    _code, out, summary = smoke
    bench = summary["steps"]["bench"]
    assert bench["ok"] and bench["returncode"] == 0 and bench["failed"] == []
    results = json.loads((out / "bench-results-gpu.json").read_text())
    assert bench["rows"] == len(results["rows"]) > 0
    assert {r["bench"] for r in results["rows"]} == {"bench_gpu"}
    assert results["device"]["usable_cpus"] >= 1


def test_without_cuda_it_says_so(session, tmp_path, capsys):
    assert session.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "session.json").exists()


def test_a_failing_step_does_not_stop_the_next(session, tmp_path, monkeypatch):
    def broken(s):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setitem(vars(session), "sync_debug", broken)
    monkeypatch.setitem(vars(session), "cpu_vs_gpu", lambda s: {"ok": True, "ran": True})
    s = session.Session(out=tmp_path, device="cpu", smoke=True, quick=False, photos=tmp_path,
                        model="m", px=56, n=1, deadline=0.0, results=tmp_path / "r.json")
    summary = session.run_steps(s, ("sync_debug", "cpu_vs_gpu"))
    assert summary["ok"] is False
    assert "device-side assert" in summary["steps"]["sync_debug"]["error"]
    assert summary["steps"]["cpu_vs_gpu"]["ran"]


def test_stray_contexts_are_found(session):
    one_each = {101: {0: 500}, 102: {1: 480}}
    assert session.judge_contexts(one_each, workers=2, n_gpus=2)["ok"]
    both_on_one = {101: {0: 500}, 102: {0: 480}}
    assert session.judge_contexts(both_on_one, workers=2, n_gpus=1)["ok"]  # one GPU: its share
    stray = {101: {0: 500}, 102: {0: 300, 1: 480}}  # worker 1 also made a context on GPU 0
    verdict = session.judge_contexts(stray, workers=2, n_gpus=2)
    assert not verdict["ok"] and verdict["on_several_gpus"] == [102]
    assert verdict["gpu0_contexts"] == 2 and verdict["gpu0_mib_by_pid"] == {"101": 500, "102": 300}
    loader = {101: {0: 500}, 102: {1: 480}, 103: {0: 300}}  # a decoding process touched CUDA
    assert not session.judge_contexts(loader, workers=2, n_gpus=2)["ok"]


def test_contexts_are_read_from_nvidia_smi(session, monkeypatch):
    answers = {"--query-gpu=index,uuid": [["0", "GPU-a"], ["1", "GPU-b"]],
               "--query-compute-apps=pid,gpu_uuid,used_memory": [["7", "GPU-b", "512"],
                                                                 ["8", "GPU-a", "300"]]}
    monkeypatch.setattr(session, "_nvidia_smi", lambda query: answers[query])
    assert session.gpu_contexts() == [(7, 1, 512), (8, 0, 300)]
    monkeypatch.setattr(session, "_nvidia_smi", lambda query: None)
    assert session.gpu_contexts() is None


def test_tolerances_are_enforced(session):
    norm = np.array([10.0, 20.0, 40.0])
    attn = np.array([0.2, np.nan, 0.5])
    off = session.compare((norm, attn), (norm * 1.05, attn + 0.03), session.TOLERANCES["bf16"])
    assert not off["ok"] and set(off["over"]) == {"norm_rel_median", "attn_abs_p99"}
    assert session.compare((norm, attn), (norm * 1.0001, attn), session.TOLERANCES["fp32"])["ok"]
    assert not session.compare((norm, attn), (norm[:2], attn[:2]), {})["ok"]


def test_descendants_include_grandchildren(session):
    grandchild = "import time; time.sleep(5)"
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"
    child = subprocess.Popen([sys.executable, "-c", code])
    mine: set[int] = set()  # the grandchild: only what this test started may be killed (this
    # process has other descendants, such as multiprocessing's resource tracker)
    try:
        for _ in range(100):
            mine = session.descendants(child.pid)
            if mine:
                break
            time.sleep(0.05)
        found = session.descendants(os.getpid())
        assert mine and child.pid in found and mine <= found
    finally:
        for pid in mine:
            os.kill(pid, signal.SIGKILL)
        child.kill()
        child.wait()


def _fake_session(session, tmp_path, *, run_s: float):
    class Fake(session.Session):  # no lake, no model: an extraction that takes run_s
        def lake(self, name, n=None):
            return tmp_path

        def extract(self, lake, **options):
            time.sleep(run_s)
            return {"n_images": 4, "workers": options["workers"]}

    return Fake(out=tmp_path, device="cpu", smoke=False, quick=False, photos=tmp_path,
                model="m", px=56, n=1, deadline=0.0, results=tmp_path / "r.json")


def test_workers_are_judged_from_the_contexts_that_appear(session, tmp_path):
    """Inside a container nvidia-smi gives the host's PIDs: the contexts that appear during the
    run are judged instead; none seen at all is a failure, not a pass."""
    calls = []

    def poll():  # before the run: this process on GPU 0; then two workers, one stray
        calls.append(1)
        mine = [(99, 0, 600)]
        return mine if len(calls) == 1 else mine + [(501, 0, 500), (502, 1, 480), (502, 0, 300)]

    verdict = session.workers_gpu0(_fake_session(session, tmp_path, run_s=0.5), poll=poll)
    assert verdict["ok"] is False and verdict["on_several_gpus"] == [502]
    assert "namespace" in verdict["note"] and verdict["workers_in_manifest"] == 2
    quiet = session.workers_gpu0(_fake_session(session, tmp_path, run_s=0.3),
                                 poll=lambda: [(99, 0, 600)])
    assert quiet["ok"] is False and "no context" in quiet["note"]


def test_device_wrapper_brings_back_the_summary_results_and_versions(tmp_path):
    """bench/gpu_session.sh, the device command, with this interpreter and no wheels to install
    (the venv has them): what lands in $OUT is what the device tool brings back."""
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no-wheels"),
           "OUT": str(out), "WORK": str(work)}
    env.pop("TOKENLAKE_IMAGENET_SAMPLE", None)
    done = subprocess.run(["bash", str(SCRIPT.parent / "gpu_session.sh"), "--cpu-smoke",
                           "--steps", "cpu_vs_gpu"], check=False, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["session-log.txt", "session.json",
                                                     "versions.txt"]
    assert json.loads((out / "session.json").read_text())["steps"]["cpu_vs_gpu"]["ok"]
    versions = (out / "versions.txt").read_text()
    assert "MISSING" not in versions and "torch " in versions
