"""`tokenlake run --executor slurm`: an experiment file as submitit jobs.

submitit's local executor (every task a process of this machine, no scheduler) runs a small file
to the same lake as the serial runner, byte for byte, with one task preempted midway (the
scheduler's signal: it requeues itself and resumes from its markers) and one killed (the runner
resubmits it). Without a cluster, a fake `sbatch`/`sacct` pair shows what would be queued: the
sbatch scripts with every [slurm] option and the afterok dependencies, and status from sacct.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from tokenlake.cli import _experiments
from tokenlake.cli._status import status
from tokenlake.cli.main import main
from tokenlake.extract._slurmopts import (
    executor_parameters,
    memory,
    minutes,
    sbatch_line,
    slurm_options,
)
from tokenlake.store import open_lake

RUNS = ("ref", "sampled", "kept")
RUN = '''
[[runs]]
model = "dinov2_s_reg4"
subset = "s"
img_size = 56
weights = "random"
batch_size = 1
'''
EXPERIMENT = '''
[subsets.s]
data = "{images}"

[slurm]
cpus = 2                  # the pixel store's decoding processes, as the serial run's (2 cores)
array_parallelism = 2     # each extraction: two tasks, shards dealt round-robin
time = 30
max_retries = 2
''' + RUN + '''run = "ref"                # every other run's threshold
shard_size = 1
''' + RUN + '''run = "sampled"
policy = "sample"
outlier_ref = "ref"
shard_size = 1
''' + RUN + '''run = "kept"               # walks the subset in order: one task
policy = "sample"
outlier_ref = "ref"
keep_if_outlier = true
n = 4
shard_size = 2

[[analyses]]
name = "norms"

[[probes]]
name = "position"
run = "ref"
max_epochs = 2
'''
LOCAL = ["--executor", "slurm", "--slurm-cluster", "local", "--device", "cpu", "--quiet"]
# manifest fields that differ between invocations: times, and how the shards were computed
VOLATILE = {"wall_time_s", "loop_images", "loop_time_s", "executor", "workers"}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, image_helpers) -> Path:
    root = tmp_path_factory.mktemp("exp")
    image_helpers.write_imagefolder(root / "imgs", per_class=4)
    path = root / "e.toml"
    path.write_text(EXPERIMENT.format(images=root / "imgs"))
    return path


@pytest.fixture(scope="module")
def serial(experiment, tmp_path_factory) -> Path:
    lake = tmp_path_factory.mktemp("serial") / "lake"
    assert main(["run", str(experiment), "--lake", str(lake), "--device", "cpu", "--quiet"]) == 0
    return lake


def _committed(lake: Path) -> dict[str, str]:
    """sha256 of every file of the runs and pixel stores but manifests (compared apart), locks
    and temporary files a killed writer left (never committed)."""
    out = {}
    for top in ("runs", "pixels"):
        for f in sorted((lake / top).rglob("*")):
            if f.is_file() and f.suffix != ".lock" and ".tmp-" not in f.name \
                    and f.name != "manifest.json":
                out[str(f.relative_to(lake))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _manifest(lake: Path, run: str) -> dict:
    m = json.loads((lake / "runs" / run / "manifest.json").read_text())
    return {k: v for k, v in m.items() if k not in VOLATILE}


def _probe(lake: Path) -> dict:
    (folder,) = (lake / "probes" / "ref").iterdir()
    result = json.loads((folder / "result.json").read_text())
    return {"dir": folder.name, "weights": (folder / "weights.pt").read_bytes(),
            **{k: result[k] for k in ("config_hash", "metrics", "history")}}


def _same_lake(lake: Path, serial: Path) -> None:
    ours, theirs = _committed(lake), _committed(serial)
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if ours[k] != theirs[k]] == []
    assert len([k for k in ours if "/shards/" in k]) > 30  # markers of every run were compared
    for run in RUNS:
        assert _manifest(lake, run) == _manifest(serial, run), run
    assert _probe(lake) == _probe(serial)
    assert (lake / "analysis").is_dir()
    assert open_lake(lake).validate() == []


def _wait_for(what, predicate, deadline: float):
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


def _task_pid(lake: Path, task: str) -> int:
    found = list((lake / ".tokenlake" / "jobs").glob(f"*/tasks/{task}/a01.*.started.json"))
    return json.loads(found[0].read_text())["pid"] if found else 0


def _committed_shards(lake: Path, run: str, parity: int) -> int:
    return sum(int(p.stem[1:]) % 2 == parity for p in (lake / "runs" / run / "shards").glob(
        "s*.json"))


def _inject(lake: Path, exp, seen: dict, stop: threading.Event) -> None:
    """Preempt task 0 of `ref` after its first shard (SIGUSR2, as SLURM signals preemption or
    the time limit), then kill task 1 of `sampled` after its first shard (SIGKILL, as the
    OOM-killer or a lost node). Each is stopped first, to check it had shards left."""
    try:
        deadline = time.time() + 300
        for task, run, parity, sig in (("extract.ref.0", "ref", 0, signal.SIGUSR2),
                                       ("extract.sampled.1", "sampled", 1, signal.SIGKILL)):
            pid = _wait_for(f"{task} to start", lambda t=task: _task_pid(lake, t), deadline)
            _wait_for(f"{run}'s first shard", lambda r=run, k=parity:
                      _committed_shards(lake, r, k) >= 1 or stop.is_set(), deadline)
            os.kill(pid, signal.SIGSTOP)
            seen[task] = {"done_when_stopped": _committed_shards(lake, run, parity)}
            if task == "extract.ref.0":  # the status of a step with a task at work
                seen["status"] = {r.step: r for r in status(lake, exp)}
            os.kill(pid, sig)
            if sig != signal.SIGKILL:  # a stopped process dies of SIGKILL all the same
                os.kill(pid, signal.SIGCONT)
    except BaseException as err:  # noqa: BLE001 - reported by the test
        seen["error"] = err


def test_a_cluster_run_writes_the_serial_runs_lake_despite_a_preemption_and_a_kill(
        experiment, serial, tmp_path):
    lake, exp = tmp_path / "lake", _experiments.load(experiment)
    seen: dict = {}
    stop = threading.Event()
    injector = threading.Thread(target=_inject, args=(lake, exp, seen, stop), daemon=True)
    injector.start()
    try:
        code = main(["run", str(experiment), "--lake", str(lake), *LOCAL])
    finally:
        stop.set()
        injector.join(timeout=30)
    assert "error" not in seen, seen.get("error")
    # each task had shards left when it was stopped: 8 even shards for ref's task 0, 7 odd ones
    assert seen["extract.ref.0"]["done_when_stopped"] < 8
    assert seen["extract.sampled.1"]["done_when_stopped"] < 7
    midway = seen["status"]["extract.ref"]
    assert midway.state == "running" and "/15 shards committed" in midway.detail, midway
    assert code == 0
    _same_lake(lake, serial)
    assert open_lake(lake).manifest("ref")["executor"] == "slurm"

    rows = {r.step: r for r in status(lake, exp)}
    assert {r.state for r in rows.values()} == {"done"}
    assert rows["extract.ref"].retries == 1 and rows["extract.sampled"].retries == 1
    assert sum(r.retries for r in rows.values()) == 2
    (sub,) = (lake / ".tokenlake" / "jobs").iterdir()
    preempted = [json.loads(p.read_text()) for p in sorted((sub / "tasks/extract.ref.0").iterdir())]
    assert [e["event"] for e in preempted] == ["started", "requeued", "started", "done"]
    assert preempted[1]["retry"] == 1 and preempted[1]["max_retries"] == 2
    killed = [json.loads(p.read_text()) for p in sorted((sub / "tasks/extract.sampled.1").iterdir())]
    assert [(e["attempt"], e["event"]) for e in killed] == [
        (1, "started"), (2, "resubmitted"), (2, "started"), (2, "done")]
    assert "without a result" in killed[1]["why"]

    steps = json.loads((sub / "submission.json").read_text())["steps"]
    assert [(j["task"], j["attempt"]) for j in steps["extract.sampled"]["jobs"]] == [
        ("0", 1), ("1", 1), ("1", 2), ("finish", 1)]
    assert [j["task"] for j in steps["extract.kept"]["jobs"]] == ["0"]  # one task, no finish
    assert steps["extract.sampled"]["needs"] == ["pixels.s-56-bicubic-center1000",
                                                 "extract.ref"]
    assert steps["analyze.0.norms"]["needs"] == [f"extract.{r}" for r in RUNS]
    assert "tokenlake probe position --lake" in steps["probe.0.position.ref"]["command"]
    # rerun: every run is in the lake, only the analysis and the probe (reused) run again
    assert main(["run", str(experiment), "--lake", str(lake), *LOCAL]) == 0
    latest = max((lake / ".tokenlake" / "jobs").iterdir())
    again = json.loads((latest / "submission.json").read_text())["steps"]
    assert {k for k, v in again.items() if v["skip"]} == {
        "pixels.s-56-bicubic-center1000", *(f"extract.{r}" for r in RUNS)}
    _same_lake(lake, serial)


def test_a_spent_retry_budget_fails_the_task(experiment, tmp_path):
    """max_retries 0: the scheduler's signal ends the task as failed, recorded with its log."""
    lake = tmp_path / "lake"
    file = tmp_path / "once.toml"
    file.write_text(experiment.read_text().replace("max_retries = 2", "max_retries = 0"))
    seen: dict = {}

    def preempt() -> None:
        try:
            deadline = time.time() + 300
            pid = _wait_for("ref's task 0", lambda: _task_pid(lake, "extract.ref.0"), deadline)
            _wait_for("its first shard", lambda: _committed_shards(lake, "ref", 0), deadline)
            os.kill(pid, signal.SIGSTOP)
            seen["done_when_stopped"] = _committed_shards(lake, "ref", 0)
            os.kill(pid, signal.SIGUSR2)
            os.kill(pid, signal.SIGCONT)
        except BaseException as err:  # noqa: BLE001
            seen["error"] = err

    injector = threading.Thread(target=preempt, daemon=True)
    injector.start()
    code = main(["run", str(file), "--lake", str(lake), *LOCAL])
    injector.join(timeout=30)
    assert "error" not in seen, seen["error"]
    assert seen["done_when_stopped"] < 8  # it had shards left
    assert code == 1
    rows = {r.step: r for r in status(lake, _experiments.load(file))}
    ref = rows["extract.ref"]
    assert ref.state == "failed" and "max_retries 0" in ref.detail
    (log,) = ref.logs
    assert Path(log).is_file() and log.endswith("_log.err")
    assert rows["extract.sampled"].state == "waiting"
    assert "needs extract.ref, which failed" in rows["extract.sampled"].detail


# -- options ---------------------------------------------------------------------------------


def test_slurm_options_are_checked(tmp_path):
    opts = slurm_options({"partition": "gpu", "time": "1-02:00:00", "memory": "64GB",
                          "sbatch": ["#SBATCH --mail-type=END", "--exclusive"],
                          "setup": ["module load cuda"]}, where="t",
                         flags={"time": "90", "gpus": 2, "setup": ["source venv/bin/activate"],
                                "partition": None})
    assert (opts.partition, opts.time, opts.memory, opts.gpus) == ("gpu", 90, "64G", 2)
    assert opts.setup == ("module load cuda", "source venv/bin/activate")
    assert minutes("1-02:00:00") == 26 * 60 and minutes("0:30:01") == 31 and minutes(15) == 15
    assert memory(32) == "32G" and memory("500m") == "500M"
    assert sbatch_line("--gres gpu:a100:1") == ("gres", "gpu:a100:1")
    params = executor_parameters(opts, gpu=True, name="tl-x", after=("11", "12"))
    assert params["dependency"] == "afterok:11:12" and params["gpus_per_node"] == 2
    assert params["additional_parameters"] == {"mail-type": "END", "exclusive": True,
                                               "kill-on-invalid-dep": "yes"}
    assert "gpus_per_node" not in executor_parameters(opts, gpu=False, name="tl-x")
    for table, message in (
            ({"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
            ({"time": "4:00"}, "H:MM:SS"), ({"time": 0}, "positive"),
            ({"memory": "lots"}, "memory 'lots'"), ({"gpus": -1}, "gpus must be an integer"),
            ({"cpus": True}, "cpus must be an integer"), ({"partition": ""}, "non-empty"),
            ({"setup": "module load cuda"}, "list of non-empty strings"),
            ({"sbatch": ["-p gpu"]}, "long option"),
            ({"sbatch": ["--partition=gpu"]}, "use the \\[slurm\\] key 'partition'"),
            ({"sbatch": ["--dependency=afterok:1"]}, "tokenlake sets --dependency itself")):
        with pytest.raises(ValueError, match=message):
            slurm_options(table, where="t")
    bad = tmp_path / "bad.toml"
    bad.write_text('[subsets.a]\ndata = "x"\n[slurm]\npartition = "gpu"\ngpu = 1\n')
    with pytest.raises(ValueError, match=r"\[slurm\] has unknown key\(s\) \['gpu'\]"):
        _experiments.load(bad)


def test_cluster_flags_go_with_the_slurm_executor(experiment, tmp_path, capsys):
    lake = str(tmp_path / "lake")
    assert main(["run", str(experiment), "--lake", lake, "--slurm-partition", "gpu"]) == 2
    assert "--slurm-partition go(es) with --executor slurm" in capsys.readouterr().err
    assert main(["run", str(experiment), "--lake", lake, "--no-wait", *LOCAL]) == 2
    assert "--no-wait needs a scheduler" in capsys.readouterr().err
    assert main(["run", str(experiment), "--lake", lake, *LOCAL, "--slurm-time", "4:00"]) == 2
    assert "H:MM:SS" in capsys.readouterr().err
    assert not (tmp_path / "lake" / "runs").exists()


# -- a fake SLURM: what would be queued ----------------------------------------------------------

SBATCH = '''#!{python}
import pathlib, shutil, sys
root = pathlib.Path({root!r})
count = root / "count"
n = int(count.read_text()) + 1 if count.exists() else 101
count.write_text(str(n))
shutil.copy(sys.argv[-1], root / f"job-{{n}}.sh")
print(f"Submitted batch job {{n}}")
'''
SACCT = '''#!{python}
import pathlib, sys
asked = {{sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "-j"}}
print("JobID|State|NodeList")
table = pathlib.Path({root!r}) / "sacct.txt"
for line in (table.read_text().splitlines() if table.exists() else []):
    if line.split("_")[0].split("|")[0] in asked:  # sacct answers for the jobs asked only
        print(line)
'''


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    root, bin_ = tmp_path / "slurm", tmp_path / "bin"
    root.mkdir()
    bin_.mkdir()
    for name, text in (("sbatch", SBATCH), ("sacct", SACCT), ("srun", "#!/bin/sh\nexit 0\n")):
        (bin_ / name).write_text(text.format(python=sys.executable, root=str(root)))
        (bin_ / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    import submitit

    submitit.SlurmJob.watcher.clear()  # a process-wide cache of sacct answers
    return root


def _script(root: Path, job: int) -> dict[str, str]:
    lines = (root / f"job-{job}.sh").read_text().splitlines()
    flags = dict(line[len("#SBATCH --"):].partition("=")[::2] for line in lines
                 if line.startswith("#SBATCH --"))
    return {**flags, "_text": "\n".join(lines)}


def test_no_wait_queues_every_step_with_its_dependencies(experiment, tmp_path, fake_slurm,
                                                         capsys):
    lake = tmp_path / "lake"
    file = tmp_path / "cluster.toml"
    file.write_text(experiment.read_text().replace("time = 30", '''time = "2:00:00"
partition = "gpu"
account = "lab"
qos = "high"
memory = "48G"
constraint = "h100"
sbatch = ["--mail-type=END"]
setup = ["module load cuda/12.4"]'''))
    assert main(["run", str(file), "--lake", str(lake), "--executor", "slurm", "--no-wait",
                 "--slurm-gpus", "2", "--slurm-setup", "source /opt/venv/bin/activate"]) == 0
    out = capsys.readouterr().out
    assert "follow with `tokenlake status --lake" in out and "squeue" in out
    # job ids in submission order: pixels 101, ref 102 (array) + 103 (manifest), sampled 104 +
    # 105, kept 106 (one task), analysis 107, probe 108
    assert "extract.ref: job 102 (array of 2) then 103" in out
    assert "extract.kept: job 106" in out
    jobs = {n: _script(fake_slurm, n) for n in range(101, 109)}
    assert "dependency" not in jobs[101]
    assert jobs[102]["dependency"] == "afterok:101" and jobs[102]["array"] == "0-1%2"
    assert jobs[103]["dependency"] == "afterok:102"
    assert jobs[104]["dependency"] == "afterok:101:103"
    assert jobs[106]["dependency"] == "afterok:103" and "array" not in jobs[106]
    assert jobs[107]["dependency"] == "afterok:103:105:106"
    assert jobs[108]["dependency"] == "afterok:103"
    for n in range(102, 109):
        assert jobs[n]["kill-on-invalid-dep"] == "yes"
    for job in jobs.values():
        assert (job["partition"], job["account"], job["qos"], job["time"], job["mem"],
                job["constraint"], job["cpus-per-task"], job["mail-type"]) == (
            "gpu", "lab", "high", "120", "48G", "h100", "2", "END")
        setup = job["_text"].index("module load cuda/12.4")
        assert setup < job["_text"].index("source /opt/venv/bin/activate") < \
            job["_text"].index("srun")
    assert jobs[102]["gpus-per-node"] == "2" and jobs[108]["gpus-per-node"] == "2"
    for cpu_only in (101, 103, 107):  # PIL pixels, a manifest, an analysis
        assert "gpus-per-node" not in jobs[cpu_only]

    # status asks sacct: the pixels job runs, the rest waits, the probe was cancelled
    (fake_slurm / "sacct.txt").write_text("101|RUNNING|n1\n102_[0-1]|PENDING|\n103|PENDING|\n"
                                          "104_[0-1]|PENDING|\n105|PENDING|\n106|PENDING|\n"
                                          "107|PENDING|\n108|CANCELLED by 0|\n")
    rows = {r.step: r for r in status(lake, _experiments.load(file))}
    assert rows["pixels.s-56-bicubic-center1000"].state == "running"
    assert rows["extract.ref"].state == "waiting"
    assert "queued (SLURM PENDING)" in rows["extract.ref"].detail
    probe = rows["probe.0.position.ref"]
    assert probe.state == "failed" and "a job it waits for failed" in probe.detail
    assert probe.logs[0].endswith("108_0_log.err")
    assert main(["status", "--lake", str(lake), str(file)]) == 0
    printed = capsys.readouterr().out
    assert "log: " in printed and "1 running, 4 waiting, 1 failed" in printed

    # while jobs of the file are queued, a second submission is refused
    assert main(["run", str(file), "--lake", str(lake), "--executor", "slurm", "--no-wait"]) == 2
    assert "still queued or running" in capsys.readouterr().err
    assert not (fake_slurm / "job-109.sh").exists()


def test_no_srun_is_a_clear_error(experiment, tmp_path, monkeypatch, capsys):
    if shutil.which("srun"):
        pytest.skip("this machine has srun")
    assert main(["run", str(experiment), "--lake", str(tmp_path / "lake"), "--executor",
                 "slurm", "--no-wait"]) == 2
    assert "on this machine's PATH" in capsys.readouterr().err
    assert not (tmp_path / "lake").exists()  # refused before anything was written
