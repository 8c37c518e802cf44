"""write_run end to end: what goes in comes out through SQL and straight from the Parquet files."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest

from tokenlake.store import SCHEMA_VERSION, TABLE_SCHEMAS, UnknownRun, open_lake, write_run


@pytest.fixture
def lake(tmp_path, synthetic_run):
    r = synthetic_run(n_inputs=4, error_ids=(2,))
    write_run(tmp_path, "toy-224-tiny", **r)
    return open_lake(tmp_path), r


def test_counts_thresholds_outliers(lake):
    lk, r = lake
    got = lk.sql("SELECT kind, count(*) AS n FROM tokens GROUP BY kind ORDER BY kind").to_pydict()
    assert got == {"kind": ["cls", "patch", "reg"], "n": [3, 48, 12]}
    assert lk.sql("SELECT count(*) AS n FROM images").column("n")[0].as_py() == 3
    assert lk.sql("SELECT image_id, reason FROM errors").to_pylist() == [
        {"image_id": 2, "reason": "unreadable"}
    ]

    tok = r["tokens"].to_pandas()
    patch = tok.loc[tok.kind == "patch", "norm"].to_numpy(np.float64)
    want = np.percentile(patch, 98, method="linear")
    thr = lk.sql("SELECT threshold FROM thresholds").column("threshold")[0].as_py()
    assert thr == pytest.approx(want, rel=1e-12)
    n_out = lk.sql("SELECT count(*) AS n FROM outliers").column("n")[0].as_py()
    assert n_out == int((patch > want).sum()) == 1  # 48 patches: 2% leaves one above

    res = lk.sql("SELECT * FROM tokens ORDER BY image_id, token")
    assert pl.from_arrow(res).height == 63
    assert len(res.to_pandas()) == 63
    assert res.column("norm").to_numpy().tolist() == r["tokens"].column("norm").to_numpy().tolist()


def test_files_read_directly_by_duckdb_polars_pandas(lake, tmp_path):
    _lk, _ = lake
    f = tmp_path / "runs" / "toy-224-tiny" / "tokens" / "s00000.parquet"
    assert duckdb.sql(f"SELECT count(*) FROM '{f}'").fetchall() == [(63,)]
    assert pl.read_parquet(f).height == 63
    assert len(pd.read_parquet(f)) == 63
    assert pq.read_schema(f).remove_metadata().equals(TABLE_SCHEMAS["tokens"])
    assert duckdb.sql(
        f"SELECT typeof(kind), typeof(row), typeof(norm) FROM '{f}' LIMIT 1"
    ).fetchall() == [("VARCHAR", "SMALLINT", "FLOAT")]


def test_manifest_and_runs_summary(lake):
    lk, _r = lake
    m = lk.manifest("toy-224-tiny")
    assert m["schema_version"] == SCHEMA_VERSION
    assert (m["n_images"], m["n_errors"], m["n_tokens"], m["model"]) == (3, 1, 63, "toy")
    assert m["layout"]["slot_capacity"] % m["layout"]["slot_chunk_rows"] == 0
    (s,) = lk.runs()
    assert s["status"] == "complete" and s["shards_committed"] == s["shards_total"] == 1
    assert s["bytes"] > 0 and s["random_weights"] is True
    runs_view = lk.sql("SELECT * FROM runs").to_pylist()
    assert runs_view[0]["threshold_run"] == "toy-224-tiny" and runs_view[0]["img_size"] == 8


def test_unknown_run_suggests_names(lake):
    lk, _ = lake
    with pytest.raises(UnknownRun, match="did you mean 'toy-224-tiny'"):
        lk.manifest("toy-224-tiyn")


def test_write_run_accepts_polars_and_is_idempotent(tmp_path, synthetic_run):
    r = synthetic_run(n_inputs=5)
    args = {**r, "images": pl.from_arrow(r["images"]), "tokens": pl.from_arrow(r["tokens"])}
    p1 = write_run(tmp_path, "pl-run", shard_size=2, **args)
    before = p1.read_bytes()
    assert write_run(tmp_path, "pl-run", shard_size=2, **args) == p1
    assert p1.read_bytes() == before
    assert open_lake(tmp_path).sql("SELECT count(*) AS n FROM images").column("n")[0].as_py() == 5
