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


def test_every_probe_reads_a_run_of_the_file():
    exp = _experiments.load(PAPER)
    names = {r.name() for r in exp.runs}
    for p in exp.probes:
        for key in ("run", "train_run", "test_run"):
            if key in p:
                assert p[key] in names, (p["name"], key, p[key])


def test_table4_and_5_runs_use_dinov2s_evaluation_recipe_in_fp32():
    """The paper compares heads 0.4-0.7 points apart: the official input and full precision."""
    exp = _experiments.load(PAPER)
    heads = [r for r in exp.runs if r.model.startswith("dinov2") and r.img_size == 224]
    assert len(heads) == 11  # 8 val50k (4 sizes x +-registers) and 3 train200k (Table 5)
    for r in heads:
        assert (r.preprocess, r.precision) == ("dinov2-eval", "fp32"), r.name()
        assert r.name().endswith("-dinov2eval")


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


def test_run_executes_a_file_and_resumes(tmp_path, image_helpers, capsys):
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
    db = open_lake(lake)
    assert {r["run"] for r in db.runs()} == {"sampled", "pvt_b0-64-s-random-ref"}
    for run in ("sampled", "pvt_b0-64-s-random-ref"):  # both read the one store decoded first
        assert db.manifest(run)["pixel_source"].startswith("pixel store s-64-")
    assert main(["run", str(toml), "--lake", str(lake), "--quiet"]) == 0
    assert main(["plan", str(toml), "--lake", str(lake)]) == 0
    assert "2 runs  (in the lake)" in capsys.readouterr().out


def test_stores_are_shared_by_runs_with_one_recipe_and_skip_keep_if_outlier(tmp_path):
    toml = tmp_path / "e.toml"
    toml.write_text('''
[subsets.s]
data = "nowhere"
[subsets.t]
data = "nowhere"
[pixels]
decoder = "torchvision"
[[runs]]
model = "deit3_m"
subset = "s"
[[runs]]
model = "deit3_s"
subset = "s"
policy = "summary"
[[runs]]
model = "deit3_s"
subset = "s"
img_size = 160
[[runs]]
model = "deit3_m"
subset = "t"
[[runs]]
model = "deit3_s"
subset = "t"
policy = "sample"
outlier_ref = "deit3_s-224-s"
keep_if_outlier = true
n = 10
''')
    exp = _experiments.load(toml)
    assert exp.pixels == {"decoder": "torchvision", "min_runs": 2}
    (shared,) = exp.stores()  # deit3_m and deit3_s share 224 px, bicubic, crop 1.0 on s
    assert (shared.subset, shared.cfg.img_size) == ("s", 224)
    assert shared.runs == ("deit3_m-224-s", "deit3_s-224-s")
    toml.write_text(toml.read_text().replace('decoder = "torchvision"', "min_runs = 1"))
    assert len(_experiments.load(toml).stores()) == 3  # the 160 px run and subset t's plain run
    toml.write_text(toml.read_text().replace("min_runs = 1", 'decoder = "nvjpeg"'))
    with pytest.raises(ValueError, match="decoder must be one of pil, torchvision"):
        _experiments.load(toml)


def _results(path: Path, rows: list[dict], gpu: str | None = "NVIDIA H200") -> Path:
    import json

    device = {"cuda": gpu is not None, **({"gpu": gpu} if gpu else {})}
    path.write_text(json.dumps({"device": device, "when": "2026-12-01 10:00:00", "rows": rows}))
    return path


def _small(tmp_path: Path) -> _experiments.Experiment:
    toml = tmp_path / "e.toml"
    toml.write_text('''
[subsets.s]
data = "nowhere"
n = 6000
[[runs]]
model = "deit3_m"
subset = "s"
run = "m-all"
[[runs]]
model = "deit3_m"
subset = "s"
policy = "summary"
run = "m-summary"
[[runs]]
model = "deit3_m"
subset = "s"
policy = "sample"
outlier_ref = "m-all"
run = "m-sample"
[[runs]]
model = "deit3_s"
subset = "s"
policy = "summary"
run = "s-summary"
''')
    return _experiments.load(toml)


def test_measured_rates_change_the_estimate_exactly(tmp_path, capsys):
    gpu = "NVIDIA H100 80GB HBM3"
    common = {"model": "deit3_m", "img_size": 224, "bare_img_s": 12_000.0, "device": gpu}
    path = _results(tmp_path / "results.json", [
        {"name": "bare", **common},
        {"name": "all", "policy": "all", "source": "pixel store", "extract_img_s": 4_000.0, **common},
        {"name": "summary", "policy": "summary", "source": "pixel store",
         "extract_img_s": 11_500.0, **common},
        {"name": "jpeg", "policy": "summary", "source": "jpeg", "extract_img_s": 900.0, **common},
        {"name": "not run", "model": "clip_b", "img_size": 224, "value": float("nan")},
    ], gpu=gpu)
    rates = _experiments.load_rates(path)
    exp = _small(tmp_path)
    est = {r.run: _experiments.estimate(exp, r, None, rates) for r in exp.runs}
    assert est["m-all"]["gpu_s"] == pytest.approx(6000 / 4_000)  # planted, policy all
    assert est["m-summary"]["gpu_s"] == pytest.approx(6000 / 11_500)  # its own policy's rate
    assert est["m-sample"]["gpu_s"] == pytest.approx(6000 / 4_000)  # unmeasured policy: `all`'s
    # deit3_s is scaled by parameters x tokens from the ViT anchors, deit3_m's now measured
    cost = _experiments._cost
    anchors = {**_experiments.ANCHORS, ("deit3_m", 224): 11_500.0}  # summary rate, measured
    work = sorted(r * cost(a, p)[0] for (a, p), r in anchors.items()
                  if _experiments._family(a) == "vit")
    expected = work[len(work) // 2] / cost("deit3_s", 224)[0]
    assert est["s-summary"]["gpu_s"] == pytest.approx(6000 / expected)
    design = _experiments.design_rates()
    assert _experiments.estimate(exp, exp.runs[0], None, design)["gpu_s"] == pytest.approx(
        6000 / _experiments.ANCHORS["deit3_m", 224])

    hours = _experiments.print_plan(exp, None, rates)
    out = capsys.readouterr().out
    assert hours == pytest.approx(sum(e["gpu_s"] for e in est.values()) / 3600)
    line = next(t for t in out.splitlines() if t.startswith("GPU rates:"))
    assert str(path) in line and gpu in line and "measured" in line
    assert f"GPU-hours on {gpu}" in out


def test_a_rates_file_without_gpu_rows_is_an_error(tmp_path, capsys):
    not_run = [{"name": f"x {a}", "model": a, "img_size": 224, "value": float("nan"), "ok": None,
                "note": "NOT RUN: no CUDA device on this machine"} for a in ("deit3_m", "clip_b")]
    path = _results(tmp_path / "results.json", not_run, gpu=None)
    with pytest.raises(ValueError, match="no GPU rates"):
        _experiments.load_rates(path)
    cpu = _results(tmp_path / "cpu.json", [{"name": "cpu", "model": "pvt_b2", "img_size": 224,
                                           "bare_img_s": 10.0, "device": "cpu"}], gpu=None)
    with pytest.raises(ValueError, match="no GPU rates"):
        _experiments.load_rates(cpu)
    assert main(["plan", str(PAPER), "--rates", str(path)]) == 2
    err = capsys.readouterr().err
    assert "no GPU rates" in err and str(path) in err


def test_plan_uses_the_committed_gpu_results_else_design(tmp_path, monkeypatch, capsys):
    exp = _small(tmp_path)
    monkeypatch.setattr(_experiments, "GPU_RESULTS", tmp_path / "bench-results-gpu.json")
    _experiments.print_plan(exp, None)
    assert "from docs/MODELS.md" in capsys.readouterr().out
    _results(_experiments.GPU_RESULTS, [{"name": "b", "model": "deit3_m", "img_size": 224,
                                         "bare_img_s": 6_000.0}])
    _experiments.print_plan(exp, None)
    out = capsys.readouterr().out
    assert str(_experiments.GPU_RESULTS) in out and "measured on NVIDIA H200" in out


def test_entries_are_checked_when_the_file_is_loaded(tmp_path):
    head = '[subsets.a]\ndata = "x"\n[[runs]]\nmodel = "pvt_b0"\nsubset = "a"\nrun = "r"\n'
    for text, message in (
            ('[[analyses]]\nname = "colours"\n', "name must be one of maps"),
            ('[[analyses]]\nname = "norms"\nrun = "r"\n', r"unknown key\(s\) \['run'\]"),
            ('[[analyses]]\nname = "norms"\npercentile = 98\n', r"percentile must be in \(0, 1\)"),
            ('[[probes]]\nname = "position"\nrun = "r"\ntarget = "centred"\n',
             "target does not apply to probe position"),
            ('[[probes]]\nname = "position"\nrun = "r"\nmomentum = 0.9\n',
             "unknown key 'momentum' for probe position"),
            ('[[probes]]\nname = "classify"\nrun = "r"\ndevice = "cuda"\n', "--device"),
            ('[[probes]]\nname = "heads"\nrun = "r"\n', "heads needs run with head"),
            ('[[probes]]\nname = "sweep"\nrun = "r"\ntops = "ten"\n', "tops must be numbers"),
            ('[[probes]]\nname = "reconstruct"\n', "probe reconstruct needs run"),
            ("[report]\nformat = 'pdf'\n", r"\[report\] has unknown key\(s\) \['format'\]"),
            ('[colours]\n', r"unknown section\(s\) \['colours'\]")):
        bad = tmp_path / "bad.toml"
        bad.write_text(head + text)
        with pytest.raises((ValueError, TypeError), match=message):
            _experiments.load(bad)
    bad.write_text(head.replace('run = "r"', 'run = "r"\nrecord_mlp = true\n'
                                '[runs.neurons]\nmethod = "jiang"\nlimit = 3'))
    with pytest.raises(ValueError, match=r"neurons has unknown key\(s\) \['limit'\]"):
        _experiments.load(bad)
    good = tmp_path / "good.toml"
    good.write_text(head + '[[probes]]\nname = "sweep"\nrun = "r"\ntops = [10, 5]\nlrs = "1e-3,1e-2"'
                    '\n[[probes]]\nname = "heads"\nrun_without = "r"\nhead_without = "h.pth"\n'
                    '[report]\nsubset = "a"\n')
    exp = _experiments.load(good)
    assert exp.report == {"subset": "a"}
    from tokenlake.cli._entries import probe_calls

    (call,) = probe_calls(exp.probes[0], device="cpu", quiet=True)
    assert call == ("sweep", ("r",), {"device": "cpu", "quiet": True, "force": False,
                                      "tops": (10.0, 5.0), "lrs": (1e-3, 1e-2)})
    assert probe_calls(exp.probes[1], device=None, quiet=False) == [
        ("heads", ("r", "h.pth"), {"device": None, "quiet": False, "force": False})]


def test_the_papers_steps_wait_for_what_they_read(tmp_path):
    from tokenlake.cli._steps import build

    exp = _experiments.load(PAPER)
    steps = build(exp, lake=tmp_path, device=None, quiet=True)
    order = {s.id: i for i, s in enumerate(steps)}
    by_id = {s.id: s for s in steps}
    for s in steps:
        assert all(order[n] < order[s.id] for n in s.needs), s.id
    for run in exp.runs:
        needs = by_id[f"extract.{run.name()}"].needs
        if run.outlier_ref:
            assert f"extract.{run.outlier_ref}" in needs
        if run.test_time_registers:
            assert f"neurons.{run.test_time_registers.rpartition(':')[0]}" in needs
        if run.record_mlp:
            assert by_id[f"neurons.{run.name()}"].needs == (f"extract.{run.name()}",)
    stores = [s for s in steps if s.kind == "pixels"]
    assert len(stores) == len(exp.stores())
    for store_step, spec in zip(stores, exp.stores()):
        for run in spec.runs:
            assert store_step.id in by_id[f"extract.{run}"].needs
    table3 = by_id["probe.2.classify.dinov2_s-518-train200k"]
    assert set(table3.needs) == {"extract.dinov2_s-518-train200k", "extract.dinov2_s-518-val5k"}
    assert table3.command.startswith("tokenlake probe classify --lake")
    assert "--test-run dinov2_s-518-val5k" in table3.command
    (analysis,) = [s for s in steps if s.kind == "analyze"]
    assert len(analysis.needs) == len(exp.runs)
    # a reference neither made by the file nor in the lake is refused before anything runs
    exp.runs = [r for r in exp.runs if r.name() != "dinov2_s-518-val5k"]
    with pytest.raises(ValueError, match="outlier_ref 'dinov2_s-518-val5k', which is neither"):
        build(exp, lake=tmp_path, device=None, quiet=True)
