"""The static report: figures, verdicts from the data, paper tables, provenance, missing pieces."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenlake import analyze
from tokenlake.analyze import _probes
from tokenlake.analyze.testing import planted_run
from tokenlake.store import write_run


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("lake")
    write_run(root, "g", **planted_run(model="dinov2_g", params=1_100_000_000, blocks=2))
    write_run(root, "s", **planted_run(model="dinov2_s", params=22_000_000, outlier_norm=60.0, seed=1))
    write_run(root, "rnd", **planted_run(attention="elsewhere", model="clip_b", params=86_000_000,
                                          random_weights=True, seed=2))
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
    c1 = "Claim 1 — artifacts are high-norm outlier tokens"
    # g and s planted attention on the outliers, rnd elsewhere
    assert c[c1] == "mixed: holds for 2 of 3"
    assert c["Claim 3 — high-norm tokens sit in redundant areas"] == "holds"
    # dinov2 family: g (1.1B, norm 1000) is far more extreme than s (22M, norm 60): holds
    assert c["Claim 2 — large models (>300M) grow high-norm tokens"] == "holds"
    assert c["Claim 4 — high-norm tokens lose local, hold global information"] == "not enough data"
    html = (out / "report.html").read_text()
    assert "Jaccard 1, precision 1" in html and "Rule: holds for a run if the overall Jaccard" in html


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


def test_paper_tables_beside_reference(monkeypatch, built):
    root, _, _ = built
    from tokenlake.store import open_lake

    rows = [
        # the names and units tokenlake.probes writes: accuracies in percent
        {"run": "s", "probe": "position", "token_group": "normal", "metric": "top1", "value": 30.0},
        {"run": "s", "probe": "position", "token_group": "outlier", "metric": "top1", "value": 20.0},
        {"run": "s", "probe": "reconstruct", "token_group": "normal", "metric": "l2", "value": 400.0},
        {"run": "g", "probe": "heads", "token_group": "image", "metric": "top1", "value": 86.0},
    ]
    monkeypatch.setattr(_probes, "probe_rows", lambda lk: (rows, ""))
    t = {x["key"]: x for x in _probes.paper_tables(open_lake(root), {"s": "dinov2_s", "g": "dinov2_g"})}
    t1 = t["table1_position"]["rows"][0]
    assert t1["paper_row"] == "DINOv2-S" and t1["ours"][:2] == [pytest.approx(30.0), pytest.approx(20.0)]
    assert t1["diff"][0] == pytest.approx(30.0 - 28.05)
    assert t["table2_reconstruction"]["rows"][0]["diff"][0] == pytest.approx(400 - 383.13)
    assert t["table3_classification"]["missing"].startswith("missing")
    t4 = t["table4_dinov2_linear_heads"]["rows"][0]
    assert t4["paper_row"] == "Giant" and t4["ours"] == [86.0, None]
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
