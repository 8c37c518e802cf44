"""Analysis jobs on a lake with planted structure: numbers match the planted truth."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from tokenlake import analyze
from tokenlake.store import open_lake, write_run
from tokenlake.store.testing import OUTLIER_CELLS, synthetic_run


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("lake")
    runs = {
        "same": synthetic_run(blocks=3),
        "elsewhere": synthetic_run(attention="elsewhere", model="dinov2_g", params=1_100_000_000,
                                 random_weights=True, seed=1),
        "nopix": synthetic_run(store="prefix", model="clip_b", params=86_000_000, seed=2),
    }
    for name, r in runs.items():
        write_run(root, name, shard_size=4, **r)
    return open_lake(root), runs


def _patches(r):
    t = r["tokens"].to_pandas()
    return t[t.kind == "patch"]


def test_norms_table_matches_numpy(planted, tmp_path):
    lk, runs = planted
    res = analyze.norms(lk, out=tmp_path)
    assert (tmp_path / "norms.png").stat().st_size > 10_000
    assert (tmp_path / "norms.csv").exists() and (tmp_path / "norms_histogram.parquet").exists()
    from scipy import stats

    for name, r in runs.items():
        p = _patches(r)
        x = p.norm.to_numpy(np.float64)
        thr = np.percentile(x, 98)
        got = res["runs"][name]
        assert got["threshold"] == pytest.approx(thr, rel=1e-9)
        assert got["n_outliers"] == 3 and got["outlier_share"] == pytest.approx(3 / 150)
        assert got["image_share"] == pytest.approx(1 / 6)
        assert got["outliers_per_image"] == pytest.approx(0.5)
        assert got["max_median_ratio"] == pytest.approx(1000 / np.median(x), rel=1e-6)
        lx, n = np.log(x), x.size
        g, k = stats.skew(lx, bias=False), stats.kurtosis(lx, bias=False)
        bc = (g**2 + 1) / (k + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))
        assert got["bc_log"] == pytest.approx(bc, rel=1e-6) and got["bc_log"] > 5 / 9
        assert got["gmm_ashman_d"] > 2 and got["gmm_high_weight"] == pytest.approx(0.02, abs=0.01)
    hist = pq.read_table(tmp_path / "norms_histogram.parquet").to_pandas()
    h = hist[hist.run == "same"].groupby("kind").n.sum().to_dict()
    assert h == {"cls": 6, "reg": 6, "patch": 150}
    assert b"tokenlake.analysis" in pq.read_schema(tmp_path / "norms.parquet").metadata


def test_neighbours_ratio_matches_hand_computation(planted, tmp_path):
    lk, runs = planted
    res = analyze.neighbours(lk, out=tmp_path, low_info=0.9)
    for name, r in runs.items():
        p = _patches(r)
        x, c = p.norm.to_numpy(np.float64), p.nbr_cos.to_numpy(np.float64)
        out = x > np.percentile(x, 98)
        low = c > np.percentile(c, 90)
        want = low[out].mean() / low[~out].mean()
        got = res["runs"][name]
        assert got["ratio"] == pytest.approx(want, rel=1e-9)
        assert got["ratio"] > 2.5 and got["median_cos_outlier"] == pytest.approx(0.95)
        assert (got["n_outlier"], got["n_normal"]) == (3, 147)
    assert (tmp_path / "neighbours.png").exists() and (tmp_path / "neighbours_histogram.csv").exists()


def test_artifacts_jaccard_is_one_when_planted_together_and_zero_elsewhere(planted, tmp_path):
    lk, _ = planted
    res = analyze.artifacts(lk, out=tmp_path)
    same, other = res["runs"]["same"], res["runs"]["elsewhere"]
    assert (same["jaccard"], same["precision"], same["recall"]) == (1.0, 1.0, 1.0)
    assert (other["jaccard"], other["n_both"], other["n_either"]) == (0.0, 0, 6)
    worst = pq.read_table(tmp_path / "artifacts_disagree.parquet").to_pandas()
    w = worst[worst.run == "elsewhere"]
    assert w.image_id.tolist() == [0] and w.jaccard.tolist() == [0.0]
    per = pq.read_table(tmp_path / "artifacts_per_image.parquet").to_pandas()
    img1 = per[(per.run == "elsewhere") & (per.image_id == 1)].iloc[0]
    assert (img1.n_attn, img1.n_norm) == (3, 0) and np.isnan(img1.recall)  # NULL: no outlier
    assert (tmp_path / "artifacts_disagree.png").exists()


def test_maps_table_equals_planted_grid_and_input_image(planted, tmp_path):
    lk, runs = planted
    res = analyze.maps(lk, out=tmp_path, images="img0.jpg,img2.jpg")
    assert res["images"] == ["img0.jpg", "img2.jpg"]
    t = pq.read_table(tmp_path / "maps.parquet").to_pandas()
    for name, r in runs.items():
        p = _patches(r)
        for iid in (0, 2):
            want = np.zeros((5, 5))
            q = p[p.image_id == iid]
            want[q.row.astype(int).to_numpy(), q.col.astype(int).to_numpy()] = q.norm.to_numpy()
            got = t[(t.run == name) & (t.image_id == iid)]
            grid = np.zeros((5, 5))
            grid[got.row.astype(int).to_numpy(), got.col.astype(int).to_numpy()] = got.norm.to_numpy()
            np.testing.assert_allclose(grid, want, rtol=1e-6)
            marked = sorted(zip(got.row[got.is_outlier].astype(int), got.col[got.is_outlier].astype(int)))
            assert marked == (sorted(OUTLIER_CELLS) if iid == 0 else [])
    # default choice: the image with outliers in every run comes first
    assert analyze.maps(lk, out=tmp_path / "d", n_images=1)["images"] == ["img0.jpg"]


def test_input_image_reassembled_from_pixels(planted):
    lk, _ = planted
    from tokenlake.analyze import _common, _grids

    for run, expect_image in (("same", True), ("nopix", False)):
        info = _common.run_info(lk, run)
        t = _common.query(lk, "patch_grid", [run, [2], 1e9])
        img, why = _grids.input_image(lk, info, t)
        if not expect_image:
            assert img is None and "not stored" in why
            continue
        assert img.shape == (20, 20, 3)
        for r in range(5):
            for c in range(5):
                assert tuple(img[4 * r + 1, 4 * c + 2]) == (40 * r, 40 * c, 60)


def test_pvt_offset_crops_half_a_cell(planted):
    lk, _ = planted
    from tokenlake.analyze import _common, _grids

    info = _common.run_info(lk, "same")
    info.layout["pixel_offset"] = -2
    t = _common.query(lk, "patch_grid", ["same", [0], 1e9])
    img, _ = _grids.input_image(lk, info, t)
    assert img.shape == (18, 18, 3) and tuple(img[0, 0]) == (0, 0, 0)
    assert tuple(img[2, 2]) == (40, 40, 0)  # cell (1, 1) starts 2 px earlier


def test_size_families_and_params(planted, tmp_path):
    lk, _ = planted
    res = analyze.size(lk, out=tmp_path)
    rows = {r["run"]: r for r in res["rows"]}
    assert rows["same"]["family"] == "dinov2" and rows["nopix"]["family"] == "clip"
    assert rows["elsewhere"]["params"] == 1_100_000_000
    assert (tmp_path / "size.png").exists() and (tmp_path / "size.csv").exists()
    from tokenlake.analyze._common import family_of

    assert [family_of(m) for m in ("dinov2_g_reg4", "dino_s16", "deit3_h", "pvt_b2", "swinv2_t")] \
        == ["dinov2_reg4", "dino", "deit3", "pvt", "swinv2"]


def test_blocks_tables_and_missing_message(planted, tmp_path):
    lk, runs = planted
    res = analyze.blocks(lk, out=tmp_path, n_images=2)
    assert set(res["figures"]) == {"same"}
    assert set(res["missing"]) == {"elsewhere", "nopix"}
    assert "--blocks all" in res["missing"]["nopix"]
    t = pq.read_table(tmp_path / "blocks.parquet").to_pandas()
    p = _patches(runs["same"])
    p0 = p[p.image_id == 0].set_index("token")
    b2 = t[(t.image_id == 0) & (t.block == 2)].set_index("token")
    np.testing.assert_allclose(b2.norm, 3 * p0.norm.loc[b2.index], rtol=1e-6)
    np.testing.assert_allclose(b2.k_norm, 2 * p0.norm.loc[b2.index], rtol=1e-6)
    assert t[t.block < 2].q_norm.isna().all()
    assert sorted(t.image_id.unique()) == [0, 1]


def test_random_weights_named_in_red_on_every_figure(planted, tmp_path, monkeypatch):
    lk, _ = planted
    from tokenlake.analyze import _plot

    texts = []
    real = _plot.save

    def spy(fig, path, **kw):
        texts.append((str(path), [(t.get_text(), t.get_color()) for t in fig.texts]))
        return real(fig, path, **kw)

    monkeypatch.setattr(_plot, "save", spy)
    for job in ("maps", "norms", "size", "neighbours", "artifacts"):
        analyze.JOBS[job](lk, out=tmp_path)
    assert len(texts) >= 6
    for path, tx in texts:
        red = [t for t, c in tx if "RANDOM WEIGHTS" in t and "elsewhere" in t]
        assert red, f"{path}: no RANDOM WEIGHTS banner"
        assert all(c == _plot.RANDOM for t, c in tx if "RANDOM WEIGHTS" in t)


def test_runs_and_percentile_parameters(planted, tmp_path):
    lk, runs = planted
    res = analyze.norms(lk, runs="same", out=tmp_path, percentile=0.9)
    assert list(res["runs"]) == ["same"]
    x = _patches(runs["same"]).norm.to_numpy(np.float64)
    assert res["runs"]["same"]["threshold"] == pytest.approx(np.percentile(x, 90))
    assert res["runs"]["same"]["n_outliers"] == int((x > np.percentile(x, 90)).sum())
    from tokenlake.store import UnknownRun

    with pytest.raises(UnknownRun):
        analyze.norms(lk, runs="nope", out=tmp_path)


def test_size_survives_two_runs_with_equal_params_and_values(tmp_path):
    """Two runs of one model on the same data tie on (params, value): the plot must not crash."""
    for name in ("twin_a", "twin_b"):
        write_run(tmp_path / "lake", name, shard_size=4, **synthetic_run())
    res = analyze.size(open_lake(tmp_path / "lake"), out=tmp_path / "out")
    assert len(res["rows"]) == 2 and (tmp_path / "out" / "size.png").exists()
