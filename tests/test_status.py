"""`tokenlake status`: runs from their markers, steps from the runner's records and the state of
the process or job that runs them, and the log of a failed task."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tokenlake.cli import _experiments
from tokenlake.cli._runner import run_serial
from tokenlake.cli._status import status
from tokenlake.cli.main import main
from tokenlake.extract._records import Submission, record

RUN = '''
[subsets.s]
data = "{images}"

[[runs]]
model = "pvt_b0"
subset = "s"
img_size = 64
weights = "random"
run = "ref"
shard_size = 2
'''
FAILING = '''
[[probes]]               # no such head file: fails, and is not retried (it would fail again)
name = "heads"
run = "ref"
head = "{head}"

[report]
subset = "s"
'''


@pytest.fixture(scope="module")
def lake(tmp_path_factory, image_helpers) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("status")
    image_helpers.write_imagefolder(root / "imgs", per_class=2)
    file = root / "one.toml"
    file.write_text(RUN.format(images=root / "imgs"))
    assert main(["run", str(file), "--lake", str(root / "lake"), "--device", "cpu",
                 "--quiet"]) == 0
    return root / "lake", file


def test_runs_are_read_from_their_markers(lake, tmp_path, capsys):
    src, _ = lake
    copy = tmp_path / "lake"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns(".tokenlake"))
    shutil.copytree(copy / "runs" / "ref", copy / "runs" / "partial")
    (copy / "runs" / "partial" / "manifest.json").unlink()
    for marker in sorted((copy / "runs" / "partial" / "shards").glob("s*.json"))[2:]:
        marker.unlink()
    rows = {r.step: r for r in status(copy)}
    assert rows["extract.ref"].state == "done" and "images in 5 shards" in rows["extract.ref"].detail
    partial = rows["extract.partial"]
    assert partial.state == "waiting" and partial.detail == "2/5 shards committed"
    assert main(["status", "--lake", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "extract.partial  waiting  2/5 shards committed" in out
    assert "1 done, 0 running, 1 waiting, 0 failed (2 steps)" in out


def test_a_serial_runner_is_running_while_its_process_lives(lake, tmp_path):
    src, file = lake
    copy = tmp_path / "lake"
    shutil.copytree(src, copy)
    exp = _experiments.load(file)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    for pid, state in ((gone.pid, "failed"), (None, "running")):
        sub = Submission.create(copy, steps=[_Step("analyze.0.norms")], executor="local",
                                cluster=None, wait=True, options={"max_retries": 0})
        if pid is not None:
            sub.data["pid"] = pid
            sub.save()
        record(sub.ref("analyze.0.norms", "0"), "started", host=sub.data["host"], pid=pid)
        exp.analyses = [{"name": "norms"}]
        (row,) = [r for r in status(copy, exp) if r.step == "analyze.0.norms"]
        assert row.state == state, row
        if state == "failed":
            assert "stopped without an error" in row.detail and f"process {pid} gone" in row.detail
        else:
            assert row.detail.startswith("on ")
            # while a runner follows the file, another is refused, with what to do
            exp.path = file
            with pytest.raises(ValueError, match=f"held by the runner of submission {sub.id}"):
                run_serial(exp, lake=copy, device="cpu", quiet=True, log=lambda _t: None)
            sub.end()
            assert run_serial(exp, lake=copy, device="cpu", quiet=True, log=lambda _t: None) == 0


class _Step:
    def __init__(self, id_: str) -> None:
        self.id, self.command, self.needs, self.gpu = id_, "tokenlake analyze norms", (), False


def test_a_failed_task_shows_its_log_and_holds_back_what_needs_it(lake, tmp_path, capsys):
    src, file = lake
    copy = tmp_path / "lake"
    shutil.copytree(src, copy)
    failing = tmp_path / "failing.toml"
    failing.write_text(file.read_text() + FAILING.format(head=tmp_path / "missing.pth"))
    code = main(["run", str(failing), "--lake", str(copy), "--executor", "slurm",
                 "--slurm-cluster", "local", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    assert "failed probe.0.heads.ref task 0: FileNotFoundError: no head file" in err
    assert "blocked report: needs probe.0.heads.ref" in err
    rows = {r.step: r for r in status(copy, _experiments.load(failing))}
    assert rows["extract.ref"].state == "done"
    probe = rows["probe.0.heads.ref"]
    assert probe.state == "failed" and "no head file" in probe.detail and probe.retries == 0
    (log,) = probe.logs
    assert "FileNotFoundError: no head file" in Path(log).read_text()
    report = rows["report"]
    assert report.state == "waiting" and "needs probe.0.heads.ref, which failed" in report.detail
    sub = max((copy / ".tokenlake" / "jobs").iterdir())
    jobs = json.loads((sub / "submission.json").read_text())["steps"]["probe.0.heads.ref"]["jobs"]
    assert len(jobs) == 1  # an error of the request itself is not resubmitted
    assert main(["status", "--lake", str(copy), str(failing)]) == 0
    out = capsys.readouterr().out
    assert f"log: {log}" in out and "1 done, 0 running, 1 waiting, 1 failed" in out

    # the same failure in the serial runner: recorded, without a log file (its output is the
    # terminal's)
    assert main(["run", str(failing), "--lake", str(copy), "--device", "cpu", "--quiet"]) == 2
    probe = {r.step: r for r in status(copy, _experiments.load(failing))}["probe.0.heads.ref"]
    assert probe.state == "failed" and "no head file" in probe.detail and probe.logs == []
