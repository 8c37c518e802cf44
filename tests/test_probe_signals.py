"""Probes recover what was planted in synthetic lakes, and nothing else (tokenlake.probes)."""

from __future__ import annotations

import numpy as np
import pytest

from tokenlake import probes
from tokenlake.store import open_lake
from tokenlake.store.testing import probe_run


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe_lake")
    probe_run(n_images=300, grid=8, patch=2, n_reg=2, seed=0).write(path, "planted")
    return path


def test_centre_baseline_matches_paper():
    assert round(probes.centre_baseline(37, 37), 2) == 14.15
    assert round(probes.centre_baseline(14, 14), 2) == 5.35
    assert round(probes.centre_baseline(8, 8), 2) == 3.04
    assert round(probes.centre_baseline(7, 7), 2) == 2.65


def test_position_normal_encoded_outlier_scrambled(lake):
    r = probes.position(lake, "planted", quiet=True)
    m = r["metrics"]
    assert m["normal"]["top1"] > 95.0
    assert m["normal"]["dist"] < 0.2
    assert m["outlier"]["top1"] < 10.0  # chance is 1/64 = 1.6 %
    assert m["outlier"]["dist"] > 2.0
    assert m["outlier"]["n"] >= 30
    assert m["grid"]["baseline_dist"] == pytest.approx(probes.centre_baseline(8, 8))
    c = r["choices"]
    assert c["chosen_lr"] in c["train"]["lrs"] and 1 <= c["epochs_run"] <= 30
    assert set(c["images"]) == {"train", "val", "test"}


def test_reconstruct_normal_near_zero_outlier_large(lake):
    m = probes.reconstruct(lake, "planted", quiet=True)["metrics"]
    base = m["normal"]["mean_patch_l2"]  # ~ P*P*3 = 12 normalised values of variance ~1.6
    assert base > 10
    assert m["normal"]["l2"] < 0.05 * base
    assert m["outlier"]["l2"] > 0.5 * base


def test_classify_signal_only_in_outliers(lake):
    m = probes.classify(lake, "planted", quiet=True)["metrics"]
    chance = m["baseline"]["chance_top1"]
    assert chance == 25.0
    assert m["outlier"]["top1"] > 85.0
    assert m["normal"]["top1"] < 50.0
    assert m["cls"]["top1"] < 50.0


def test_registers_signal_only_in_registers(lake):
    m = probes.registers(lake, "planted", quiet=True)["metrics"]
    assert m["cls_pm"]["top1"] < 50.0
    assert m["cls_pm_reg"]["top1"] > 85.0
    assert m["pm_reg"]["top1"] > 85.0


def test_sweep_higher_norm_more_position(tmp_path):
    probe_run(n_images=200, grid=8, p_outlier=0.05, norms="uniform", graded_noise=5.0,
              random_weights=True, seed=3).write(tmp_path, "graded")
    r = probes.sweep(tmp_path, "graded", quiet=True)
    rows = {t["top_pct"]: t for t in r["table"]}
    assert list(rows) == [50.0, 40.0, 30.0, 20.0, 10.0, 5.0, 2.0]
    assert rows[2.0]["top1"] > rows[50.0]["top1"] + 15
    assert rows[10.0]["top1"] > rows[50.0]["top1"] + 15 > r["metrics"]["all"]["top1"] + 15
    assert rows[50.0]["n"] > rows[2.0]["n"] > 0
    png = open_lake(tmp_path).path / "probes" / "graded"
    figs = list(png.glob("sweep-*/sweep.png"))
    assert len(figs) == 1 and figs[0].read_bytes()[:4] == b"\x89PNG"
    assert r["choices"]["random_weights"] is True


def test_results_in_sql_view(lake):
    probes.position(lake, "planted", quiet=True)
    t = open_lake(lake).sql(
        "SELECT token_group, value FROM probe_results WHERE run = 'planted' "
        "AND probe = 'position' AND metric = 'top1' ORDER BY token_group"
    ).to_pydict()
    vals = dict(zip(t["token_group"], t["value"]))
    assert vals["normal"] > 95 and vals["outlier"] < 10
    cols = open_lake(lake).sql("SELECT * FROM probe_results LIMIT 0").column_names
    assert cols == ["run", "probe", "token_group", "metric", "value", "config_hash", "created"]


def test_empty_probe_results_view(tmp_path):
    probe_run(n_images=10, seed=1).write(tmp_path, "x")
    assert open_lake(tmp_path).sql("SELECT count(*) AS n FROM probe_results").column(0)[0].as_py() == 0


def test_probes_read_the_output_tokens(tmp_path):
    """Stored tokens scaled by a random factor each (in [1/8, 8]), output tokens (a LayerNorm with
    a non-trivial affine) free of it: the pixels are linear in the output tokens only."""
    probe_run(n_images=200, grid=8, seed=0, final_norm="layer_norm",
              token_scale=8.0).write(tmp_path, "scaled")
    post = probes.reconstruct(tmp_path, "scaled", quiet=True)  # default: output tokens
    pre = probes.reconstruct(tmp_path, "scaled", tokens="pre", quiet=True)
    base = post["metrics"]["normal"]["mean_patch_l2"]
    assert post["metrics"]["normal"]["l2"] < 0.05 * base  # measured 0.15 of 19.8
    assert pre["metrics"]["normal"]["l2"] > 0.3 * base  # measured 10.6
    assert post["config"]["tokens"] == "post" and pre["config"]["tokens"] == "pre"


def test_output_tokens_lose_what_the_final_norm_erases(tmp_path):
    """A final norm whose weight is 0 on the position/class dimensions: the output tokens carry
    neither, the stored ones both. Outliers still come from the (pre-norm) norm column."""
    dim = 20 + 2 * 2 * 3  # probe_run: pos_dim + patch * patch * 3
    w = np.ones(dim, np.float32)
    w[:20] = 0.0
    probe_run(n_images=200, grid=8, seed=0,
              final_norm={"type": "layer_norm", "dim": dim, "eps": 1e-6, "weight": w,
                            "bias": np.zeros(dim, np.float32)}).write(tmp_path, "erase")
    pos = {t: probes.position(tmp_path, "erase", tokens=t, quiet=True, max_epochs=10)
           for t in ("post", "pre")}
    assert pos["post"]["metrics"]["normal"]["top1"] < 10.0  # chance 1.6 %; measured 2.7
    assert pos["pre"]["metrics"]["normal"]["top1"] > 95.0
    cls = {t: probes.classify(tmp_path, "erase", tokens=t, quiet=True)["metrics"]
           for t in ("post", "pre")}
    assert cls["post"]["outlier"]["top1"] < 50.0  # chance 25 %
    assert cls["pre"]["outlier"]["top1"] > 85.0
    assert cls["post"]["outlier"]["n"] == cls["pre"]["outlier"]["n"]  # the same outliers
