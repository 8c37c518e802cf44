"""Named queries in sql/queries/, each checked against numpy on a tiny known lake."""

from __future__ import annotations

import numpy as np
import pytest

from tokenlake import sql as tsql
from tokenlake.store import open_lake, write_run
from tokenlake.store.testing import tiny_run


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    root = tmp_path_factory.mktemp("lake")
    runs = {
        "a": tiny_run(n_images=6, error_ids=(2,), seed=4),
        "c": tiny_run(n_images=4, seed=5, n_reg=0),
    }
    for name, r in runs.items():
        write_run(root, name, shard_size=3, **r)
    return open_lake(root), {k: r["tokens"].to_pandas() for k, r in runs.items()}


def test_query_files_have_headers():
    assert set(tsql.query_names()) >= {"norm_percentiles", "outlier_counts"}
    for name in tsql.query_names():
        assert tsql.query_text(name).startswith(f"-- {name}:")
    for name in tsql.view_names():
        assert tsql.view_text(name).startswith(f"-- {name}")
    with pytest.raises(ValueError, match="did you mean 'outlier_counts'"):
        tsql.query_text("outlier_count")


def test_norm_percentiles(known):
    lk, toks = known
    got = lk.sql(tsql.query_text("norm_percentiles")).to_pylist()
    want = []
    for run in sorted(toks):
        t = toks[run]
        for kind in sorted(t.kind.unique()):
            x = t.loc[t.kind == kind, "norm"].to_numpy(np.float64)
            want.append((run, kind, x.size, *np.percentile(x, [50, 90, 98, 99]), x.max()))
    assert [(g["run"], g["kind"], g["n"]) for g in got] == [w[:3] for w in want]
    for g, w in zip(got, want):
        assert [g["p50"], g["p90"], g["p98"], g["p99"], g["max"]] == pytest.approx(
            list(w[3:]), rel=1e-6
        )
    assert [g["kind"] for g in got if g["run"] == "c"] == ["cls", "patch"]  # no registers in run c


def test_outlier_counts(known):
    lk, toks = known
    got = {g["run"]: g for g in lk.sql(tsql.query_text("outlier_counts")).to_pylist()}
    assert sorted(got) == ["a", "c"]
    for run, t in toks.items():
        p = t[t.kind == "patch"]
        thr = np.percentile(p.norm.to_numpy(np.float64), 98)
        out = p[p.norm.astype(np.float64) > thr]
        g = got[run]
        n_images = t.image_id.nunique()
        assert g["threshold"] == pytest.approx(thr, rel=1e-12)
        assert (g["n_outliers"], g["n_patch_tokens"]) == (len(out), len(p))
        assert g["n_images_with_outliers"] == out.image_id.nunique() and g["n_images"] == n_images
        assert g["token_share"] == pytest.approx(len(out) / len(p))
        assert g["image_share"] == pytest.approx(out.image_id.nunique() / n_images)
