"""Base views (runs, images, tokens, errors, blocks) and sql/views/*.sql on a tiny known lake."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from tokenlake import sql as tsql
from tokenlake.store import open_lake, write_run
from tokenlake.store.testing import tiny_run


def _blocks(r) -> pa.Table:
    t = r["tokens"]
    n = len(t)
    return pa.table(
        {
            "image_id": pa.concat_arrays([t.column("image_id").combine_chunks()] * 2),
            "token": pa.concat_arrays([t.column("token").combine_chunks()] * 2),
            "block": pa.array([0] * n + [1] * n, pa.int16()),
            "norm": pa.array(np.arange(2 * n, dtype=np.float32)),
            "q_norm": pa.array([None] * n + [1.0] * n, pa.float32()),
            "k_norm": pa.array([None] * n + [2.0] * n, pa.float32()),
            "v_norm": pa.array([None] * n + [3.0] * n, pa.float32()),
        }
    )


@pytest.fixture(scope="module")
def known(
    tmp_path_factory,
):
    root = tmp_path_factory.mktemp("lake")
    ref = tiny_run(n_images=5, error_ids=(4,), seed=1, model="ref")
    b = tiny_run(n_images=5, seed=2, model="b")
    b["manifest"]["outlier_ref"] = "ref"
    write_run(root, "ref", shard_size=2, **ref)
    write_run(root, "b", blocks=_blocks(b), **b)
    return open_lake(root), {"ref": ref, "b": b}


def _patch_norms(r) -> np.ndarray:
    t = r["tokens"].to_pandas()
    return t.loc[t.kind == "patch", "norm"].to_numpy(np.float64)


EXPECTED_TYPES = {
    "images": [
        "VARCHAR",
        "BIGINT",
        "BIGINT",
        "VARCHAR",
        "BIGINT",
        "INTEGER",
        "INTEGER",
        "INTEGER",
        "FLOAT",
        "FLOAT",
    ],
    "tokens": [
        "VARCHAR",
        "BIGINT",
        "INTEGER",
        "VARCHAR",
        "SMALLINT",
        "SMALLINT",
        "FLOAT",
        "FLOAT",
        "FLOAT",
        "BIGINT",
    ],
    "errors": ["VARCHAR", "BIGINT", "BIGINT", "VARCHAR", "VARCHAR"],
    "blocks": ["VARCHAR", "BIGINT", "INTEGER", "SMALLINT", "FLOAT", "FLOAT", "FLOAT", "FLOAT"],
    "runs": [
        "VARCHAR",
        "VARCHAR",
        "VARCHAR",
        "INTEGER",
        "VARCHAR",
        "VARCHAR",
        "VARCHAR",
        "BOOLEAN",
        "BIGINT",
        "BIGINT",
        "BIGINT",
        "VARCHAR",
    ],
}


@pytest.mark.parametrize("view", sorted(EXPECTED_TYPES))
def test_base_views_typed_on_empty_and_full_lake(tmp_path, known, view):
    empty = open_lake(tmp_path)
    for lk, n in ((empty, 0), (known[0], None)):
        d = lk.sql(f"DESCRIBE {view}").to_pydict()
        assert d["column_type"] == EXPECTED_TYPES[view]
        assert d["column_name"][0] == "run"
        if n == 0:
            assert lk.sql(f"SELECT count(*) AS n FROM {view}").column("n")[0].as_py() == 0
    assert tsql.view_names() == ["thresholds", "thresholds_at", "outliers", "emergence", "cards"]
    assert empty.sql("SELECT * FROM thresholds").num_rows == 0
    assert empty.sql("SELECT * FROM outliers").num_rows == 0


def test_base_views_union_runs(known):
    lk, _data = known
    got = lk.sql("SELECT run, count(*) AS n FROM tokens GROUP BY run ORDER BY run").to_pydict()
    assert got == {"run": ["b", "ref"], "n": [5 * 21, 5 * 21]}
    assert lk.sql("SELECT run, image_id FROM errors").to_pylist() == [{"run": "ref", "image_id": 4}]
    blocks = lk.sql(
        "SELECT run, block, count(*) AS n, count(q_norm) AS q FROM blocks GROUP BY ALL ORDER BY block"
    )
    assert blocks.to_pylist() == [
        {"run": "b", "block": 0, "n": 105, "q": 0},
        {"run": "b", "block": 1, "n": 105, "q": 105},
    ]
    runs = {r["run"]: r for r in lk.sql("SELECT * FROM runs").to_pylist()}
    assert runs["b"]["threshold_run"] == "ref" and runs["ref"]["threshold_run"] == "ref"
    assert (
        runs["ref"]["n_images"] == 5 and runs["ref"]["n_errors"] == 1 and runs["b"]["model"] == "b"
    )


def test_thresholds(known):
    lk, data = known
    got = {r["run"]: r for r in lk.sql("SELECT * FROM thresholds").to_pylist()}
    for run, r in data.items():
        p = _patch_norms(r)
        assert got[run]["threshold"] == pytest.approx(
            np.percentile(p, 98, method="linear"), rel=1e-12
        )
        assert got[run]["n_patch_tokens"] == p.size


@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_thresholds_at(known, q):
    lk, data = known
    got = lk.sql(
        "SELECT run, q, threshold FROM thresholds_at($q) ORDER BY run", params={"q": q}
    ).to_pylist()
    assert [g["run"] for g in got] == ["b", "ref"]
    for g in got:
        assert g["q"] == q
        assert g["threshold"] == pytest.approx(
            np.percentile(_patch_norms(data[g["run"]]), 100 * q), rel=1e-12
        )


def test_outliers_use_threshold_run(known):
    lk, data = known
    thr = np.percentile(_patch_norms(data["ref"]), 98)
    for run in ("ref", "b"):
        t = data[run]["tokens"].to_pandas()
        want = t[(t.kind == "patch") & (t.norm.astype(np.float64) > thr)]
        got = lk.sql(
            "SELECT image_id, token, threshold, threshold_run FROM outliers WHERE run = ? "
            "ORDER BY image_id, token",
            params=[run],
        ).to_pandas()
        assert list(zip(got.image_id, got.token)) == list(zip(want.image_id, want.token))
        assert (got.threshold_run == "ref").all() and np.allclose(got.threshold, thr)
    assert len(want) > 0  # run b really is compared against ref's threshold
