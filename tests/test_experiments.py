"""Experiment files: dependency order, the paper's GPU budget, and a small file executed twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenlake.cli import _experiments
from tokenlake.cli.main import main
from tokenlake.store import open_lake

PAPER = Path(__file__).resolve().parents[1] / "experiments" / "paper.toml"


def test_reference_runs_come_before_the_runs_that_need_them():
    exp = _experiments.load(PAPER)
    names = [r.name() for r in exp.runs]
    for i, run in enumerate(exp.runs):
        if run.outlier_ref:
            assert run.outlier_ref in names[:i], run.name()
        if run.test_time_registers:  # the run whose neurons it moves comes first
            assert run.test_time_registers.rpartition(":")[0] in names[:i], run.name()


def test_the_whole_paper_fits_three_gpu_hours(capsys):
    exp = _experiments.load(PAPER)
    hours = _experiments.print_plan(exp, None)
    assert 0.5 < hours <= 3.0
    out = capsys.readouterr().out
    assert "dinov2_g-518-train200k" in out and "GPU-hours" in out


def test_unknown_keys_and_subsets_are_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[subsets.a]\ndata = "x"\n[[runs]]\nmodel = "pvt_b0"\nsubset = "b"\n')
    with pytest.raises(ValueError, match="subset 'b'"):
        _experiments.load(bad)
    bad.write_text('[[runs]]\nmodel = "pvt_b0"\nsubset = "a"\ncolour = 1\n[subsets.a]\ndata="x"\n')
    with pytest.raises(ValueError, match="colour"):
        _experiments.load(bad)


def test_run_executes_a_file_and_resumes(tmp_path, image_helpers):
    image_helpers.write_imagefolder(tmp_path / "imgs", per_class=2)
    toml = tmp_path / "e.toml"
    toml.write_text(f'''
[subsets.s]
data = "{tmp_path / 'imgs'}"
[[runs]]
model = "pvt_b0"
subset = "s"
img_size = 64
weights = "random"
policy = "sample"
outlier_ref = "pvt_b0-64-s-random-ref"
run = "sampled"
[[runs]]
model = "pvt_b0"
subset = "s"
img_size = 64
weights = "random"
run = "pvt_b0-64-s-random-ref"
''')
    lake = tmp_path / "lake"
    assert main(["run", str(toml), "--lake", str(lake), "--device", "cpu", "--quiet"]) == 0
    assert {r["run"] for r in open_lake(lake).runs()} == {"sampled", "pvt_b0-64-s-random-ref"}
    assert main(["run", str(toml), "--lake", str(lake), "--quiet"]) == 0
    assert main(["plan", str(toml), "--lake", str(lake)]) == 0
