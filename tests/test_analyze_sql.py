"""The analysis jobs' named queries (sql/queries/*.sql), each against numpy on a tiny known lake."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from tokenlake import sql as tsql
from tokenlake.store import open_lake, write_run
from tokenlake.store.testing import synthetic_run, tiny_run

OURS = ["analysis_thresholds", "attn_norm_overlap", "attn_topk_agreement", "block_grid", "block_images", "common_images",
        "images_by_source", "neighbour_histogram", "neighbour_stats", "norm_histogram",
        "norm_summary", "patch_grid", "patch_norm_sample"]


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    root = tmp_path_factory.mktemp("lake")
    runs = {"a": tiny_run(n_images=6, error_ids=(2,), seed=4),
            "c": tiny_run(n_images=4, seed=5, n_reg=0)}
    runs["c"]["manifest"]["outlier_ref"] = "a"
    for name, r in runs.items():
        write_run(root, name, shard_size=3, **r)
    return open_lake(root), {k: r["tokens"].to_pandas() for k, r in runs.items()}


def q(lk, name, *params):
    return lk.sql(tsql.query_text(name), params=list(params)).to_pylist()


def patches(t):
    return t[t.kind == "patch"]


def test_headers_describe_parameters():
    for name in OURS:
        text = tsql.query_text(name)
        assert text.startswith(f"-- {name}:") and "Parameters:" in text and "Columns:" in text


def test_analysis_thresholds_follow_outlier_ref(known):
    lk, toks = known
    got = {r["run"]: r for r in q(lk, "analysis_thresholds", ["a", "c"], 0.9)}
    want = np.percentile(patches(toks["a"]).norm.astype(float), 90)
    assert got["a"]["threshold"] == pytest.approx(want) and got["c"]["threshold_run"] == "a"
    assert got["c"]["threshold"] == pytest.approx(want)
    assert [r["run"] for r in q(lk, "analysis_thresholds", ["c"], 0.9)] == ["c"]


def test_norm_summary(known):
    lk, toks = known
    from scipy import stats

    got = {r["run"]: r for r in q(lk, "norm_summary", ["a", "c"], 0.95)}
    thr = np.percentile(patches(toks["a"]).norm.astype(float), 95)
    for run, t in toks.items():
        p = patches(t)
        x = p.norm.to_numpy(float)
        o = p[x > thr]
        g = got[run]
        assert g["threshold"] == pytest.approx(thr)
        assert g["n_outliers"] == len(o) and g["n_images_with_outliers"] == o.image_id.nunique()
        assert g["outliers_per_image"] == pytest.approx(len(o) / t.image_id.nunique())
        assert g["median_norm"] == pytest.approx(np.median(x), rel=1e-6)
        assert g["skew"] == pytest.approx(stats.skew(x, bias=False), rel=1e-6)
        assert g["exkurt_log"] == pytest.approx(stats.kurtosis(np.log(x), bias=False), rel=1e-6)
        lx = np.log(x)
        cut = np.median(lx) + 6 * 1.4826 * np.median(np.abs(lx - np.median(lx)))
        assert g["separated_share"] == pytest.approx(np.mean(lx > cut))


def test_separated_share_finds_a_small_far_group_and_not_a_heavy_tail(tmp_path):
    """A 2 % group 7 robust sigma above the bulk keeps BC under 5/9 but is a population apart;
    a heavy unimodal tail (Gumbel) is not."""
    rng = np.random.default_rng(0)
    bulk = rng.normal(3.0, 0.1, 9800)
    cases = {"far": np.concatenate([bulk, rng.normal(3.7, 0.1, 200)]),
             "tail": rng.gumbel(3.0, 0.1, 10000)}
    for name, lx in cases.items():
        r = tiny_run(n_images=1, grid=100, n_reg=0)
        t = r["tokens"]
        norm = t.column("norm").to_numpy().copy()
        patch = (t.column("kind").to_numpy(zero_copy_only=False) == "patch")
        norm[patch] = np.exp(lx)
        r["tokens"] = t.set_column(t.schema.get_field_index("norm"), "norm",
                                   pa.array(norm, pa.float32()))
        # new norms: the per-image summaries are left for write_run to derive
        r["images"] = r["images"].drop_columns(["max_patch_norm", "mean_patch_norm"])
        write_run(tmp_path, name, **r)
    got = {g["run"]: g for g in q(open_lake(tmp_path), "norm_summary", ["far", "tail"], 0.98)}
    assert got["far"]["bc_log"] < 5 / 9 and got["far"]["separated_share"] > 0.015
    assert got["tail"]["separated_share"] < 0.01


def test_norm_histogram_counts_every_token(known):
    lk, toks = known
    rows = q(lk, "norm_histogram", ["a"], 8)
    t = toks["a"]
    for kind in ("cls", "reg", "patch"):
        x = t[t.kind == kind].norm.to_numpy(float)
        assert sum(r["n"] for r in rows if r["kind"] == kind) == len(x)
    assert max(r["bin"] for r in rows) == 7 and min(r["lo"] for r in rows) == pytest.approx(t.norm.min(), rel=1e-5)
    assert max(r["hi"] for r in rows) == pytest.approx(t.norm.max(), rel=1e-5)


def test_patch_norm_sample_is_deterministic_subset(known):
    lk, toks = known
    a = q(lk, "patch_norm_sample", ["a"], 20)
    assert a == q(lk, "patch_norm_sample", ["a"], 20) and 0 < len(a) < len(patches(toks["a"]))
    assert len(q(lk, "patch_norm_sample", ["a"], 10**9)) == len(patches(toks["a"]))


def test_patch_grid_and_images_by_source(known):
    lk, toks = known
    rows = q(lk, "patch_grid", "a", [0, 3], 50.0)
    p = patches(toks["a"])
    p = p[p.image_id.isin([0, 3])]
    assert [(r["image_id"], r["row"], r["col"]) for r in rows] == list(zip(p.image_id, p.row, p.col))
    assert [r["is_outlier"] for r in rows] == list(p.norm > 50.0)
    got = q(lk, "images_by_source", ["a", "c"], ["img3.jpg", "img9.jpg"])
    assert [(r["run"], r["image_id"]) for r in got] == [("a", 3), ("c", 3)]


def test_common_images(known):
    lk, toks = known
    got = q(lk, "common_images", ["a", "c"], [40.0, 45.0])
    assert sorted(r["source_id"] for r in got) == ["img0.jpg", "img1.jpg", "img3.jpg"]  # 2 errored in a
    n_out = [r["n_runs_with_outliers"] for r in got]
    assert n_out == sorted(n_out, reverse=True)
    for r in got:
        i = int(r["source_id"][3])
        want = 0
        for run, th in (("a", 40.0), ("c", 45.0)):
            p = patches(toks[run])
            want += int(p[p.image_id == i].norm.max() > th)
        assert r["n_runs_with_outliers"] == want


def test_neighbour_stats_and_histogram(known):
    lk, toks = known
    thr = np.percentile(patches(toks["a"]).norm.astype(float), 80)
    st = {r["run"]: r for r in q(lk, "neighbour_stats", ["a", "c"], 0.8, 0.7)}
    hist = q(lk, "neighbour_histogram", ["a", "c"], 0.8, 10)
    for run, t in toks.items():
        p = patches(t)
        c = p.nbr_cos.to_numpy(float)
        out = p.norm.to_numpy(float) > thr
        low = c > np.percentile(c, 70)
        g = st[run]
        assert g["low_info_cutoff"] == pytest.approx(np.percentile(c, 70))
        assert (g["n_outlier"], g["n_outlier_low"]) == (out.sum(), (low & out).sum())
        assert g["ratio"] == pytest.approx(low[out].mean() / low[~out].mean())
        assert g["median_cos_normal"] == pytest.approx(np.median(c[~out]))
        h = [r for r in hist if r["run"] == run]
        assert sum(r["n"] for r in h if r["group"] == "outlier") == out.sum()
        for r in h:
            sel = c[out] if r["group"] == "outlier" else c[~out]
            assert r["n"] == ((sel >= r["lo"] - 1e-9) & (sel < r["hi"] - 1e-9)).sum()


def test_attn_norm_overlap(known):
    lk, toks = known
    got = q(lk, "attn_norm_overlap", ["a"], 0.9, 0.8)
    p = patches(toks["a"])
    n_in = p.norm.to_numpy(float) > np.percentile(p.norm.astype(float), 90)
    a_in = p.attn.to_numpy(float) > np.percentile(p.attn.astype(float), 80)
    for r in got:
        m = (p.image_id == r["image_id"]).to_numpy()
        both, either = (n_in & a_in & m).sum(), ((n_in | a_in) & m).sum()
        assert (r["n_norm"], r["n_attn"], r["n_both"]) == ((n_in & m).sum(), (a_in & m).sum(), both)
        assert r["jaccard"] == (both / either if either else None)


def test_blocks_queries_empty_without_blocks_and_exact_with(known, tmp_path):
    lk, _ = known
    assert q(lk, "block_images", ["a", "c"]) == [] and q(lk, "block_grid", "a", [0]) == []
    write_run(tmp_path, "b", **synthetic_run(n_images=2, blocks=2))
    lk2 = open_lake(tmp_path)
    assert q(lk2, "block_images", ["b"]) == [{"run": "b", "image_id": 0, "n_blocks": 2, "has_qkv": True},
                                             {"run": "b", "image_id": 1, "n_blocks": 2, "has_qkv": True}]
    rows = q(lk2, "block_grid", "b", [1])
    assert len(rows) == 2 * 25 and {r["block"] for r in rows} == {0, 1}
