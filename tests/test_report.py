"""The static report: figures, verdicts from the data, paper tables, provenance, missing pieces."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenlake import analyze
from tokenlake.analyze import _probes, _verdicts
from tokenlake.analyze._common import run_info
from tokenlake.analyze._roles import select_roles
from tokenlake.analyze.testing import planted_probe_result, planted_run
from tokenlake.store import write_run


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("lake")
    v = {"subset": "val5k"}  # the canonical subset the verdicts read by default
    write_run(root, "g", **planted_run(model="dinov2_g", params=1_100_000_000, blocks=2, **v))
    write_run(root, "s", **planted_run(model="dinov2_s", params=22_000_000, outlier_norm=60.0,
                                        seed=1, **v))
    write_run(root, "rnd", **planted_run(attention="elsewhere", model="clip_b", params=86_000_000,
                                          random_weights=True, seed=2, **v))
    out = tmp_path_factory.mktemp("report")
    return root, out, analyze.report(root, out=out)


def test_files_and_embedded_figures(built):
    _, out, _res = built
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    assert html.count("data:image/png;base64,") >= 7  # maps, norms, size, nbrs, artifacts x2, blocks
    assert "<nav>" in html and "Contents" in html and "<figcaption>" in html
    assert "](analysis/maps.png)" in md and (out / "analysis" / "maps.csv").exists()


def test_random_weights_banner(built):
    _, out, _ = built
    html = (out / "report.html").read_text()
    assert '<div class="banner">RANDOM WEIGHTS: rnd' in html
    assert html.index('class="banner"') < html.index("<h1>")
    assert "**RANDOM WEIGHTS: rnd**" in (out / "report.md").read_text()


def test_verdicts_computed_from_the_data(built):
    _, out, res = built
    c = res["claims"]
    c1 = res["verdicts"]["Claim 1 — artifacts are high-norm outlier tokens"]
    # g: attention on its outliers (holds); s: 3 outliers at norm 60 among norms 10-20 are too few
    # and too close for a second mode (BC(ln norm) <= 5/9): not applicable; rnd: random weights
    assert c1["verdict"] == "holds"
    assert {k: e["verdict"] for k, e in c1["runs"].items()} == {
        "g": "holds", "s": "not applicable", "rnd": "random weights: not evidence"}
    assert c["Claim 3 — high-norm tokens sit in redundant areas"] == "holds"
    # dinov2 family: g (1.1B, norm 1000) is far more extreme than s (22M, norm 60): holds
    assert c["Claim 2 — large models (>300M) grow high-norm tokens"] == "holds"
    assert c["Claim 4 — high-norm tokens lose local, hold global information"] == "not enough data"
    html = (out / "report.html").read_text()
    assert "top-k agreement 1 (3 of 3 outliers over 1 images)" in html
    assert "secondary: Jaccard(top-2 % attention, top-2 % norm) 1" in html
    assert "Rule: per run, N = an image&#x27;s norm outliers" in html


def test_missing_pieces_listed_never_drawn(built):
    _root, out, res = built
    html = (out / "report.html").read_text()
    for n in range(1, 6):
        assert f"Table {n}" in html
    assert html.count("run `tokenlake probe …`") >= 5
    assert any("blocks for run s" in m for m in res["missing"])


def test_provenance_and_commands(built):
    root, out, _ = built
    md = (out / "report.md").read_text()
    assert "dinov2_g" in md and "1,100,000,000" in md and "RANDOM WEIGHTS" in md
    assert f"tokenlake analyze norms --lake {root}" in md
    assert f"tokenlake report --lake {root}" in md


def test_paper_tables_beside_reference(tmp_path):
    from tokenlake.store import open_lake

    for name, model in (("s", "dinov2_s"), ("g", "dinov2_g")):
        write_run(tmp_path, name, **planted_run(model=model, subset="val5k", n_images=2))
    # the names and units tokenlake.probes writes: accuracies in percent
    planted_probe_result(tmp_path, "s", "position",
                         values={("normal", "top1"): 30.0, ("outlier", "top1"): 20.0})
    planted_probe_result(tmp_path, "s", "reconstruct", values={("normal", "l2"): 400.0})
    planted_probe_result(tmp_path, "g", "heads", values={("image", "top1"): 86.0})
    lk = open_lake(tmp_path)
    infos = {r: run_info(lk, r) for r in ("s", "g")}
    use = _verdicts.probe_use(roles=select_roles(list(infos.values()), subset="val5k",
                                                 explicit=False), infos=infos)
    t = {x["key"]: x for x in _probes.paper_tables(lk, infos=infos, use=use)}
    t1 = t["table1_position"]["rows"][0]
    assert t1["paper_row"] == "DINOv2-S" and t1["ours"][:2] == [pytest.approx(30.0), pytest.approx(20.0)]
    assert t1["diff"][0] == pytest.approx(30.0 - 28.05) and t1["use"] == ""
    assert t["table2_reconstruction"]["rows"][0]["diff"][0] == pytest.approx(400 - 383.13)
    assert t["table3_classification"]["missing"].startswith("missing")
    t4 = t["table4_dinov2_linear_heads"]["rows"][0]
    assert t4["paper_row"] == "Giant" and t4["ours"] == [86.0, None]
    assert "not 'dinov2-eval'" in t4["use"]  # g was preprocessed with the model's own recipe
    assert _probes.reference()["table4_dinov2_linear_heads"]["Giant"] == [86.90, 87.29]


def test_report_shows_real_probe_results_beside_the_paper(tmp_path):
    """End to end: a probe writes probe_results, the report reads the very same numbers."""
    from tokenlake.analyze import report
    from tokenlake.probes import position
    from tokenlake.probes._synthetic import planted_run
    from tokenlake.store import open_lake

    planted_run(tmp_path, "planted", n_images=60, grid=8, seed=0)
    result = position(tmp_path, "planted", quiet=True, max_epochs=3, lrs=(0.01,))
    top1 = result["metrics"]["normal"]["top1"]
    stored = open_lake(tmp_path).sql(
        "SELECT value FROM probe_results WHERE probe = 'position' AND token_group = 'normal' "
        "AND metric = 'top1'").column(0)[0].as_py()
    assert stored == pytest.approx(top1)
    md = Path(report(tmp_path, out=tmp_path / "report")["md"]).read_text()
    table1 = md.split("## Table 1")[1].split("## Table 2")[0]
    assert "planted" in table1 and f"{top1:.3g}" in table1
