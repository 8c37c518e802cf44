"""write_run end to end: what goes in comes out through SQL and straight from the Parquet files."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokenlake.store import (
    SCHEMA_VERSION,
    TABLE_SCHEMAS,
    ContractError,
    UnknownRun,
    open_lake,
    write_run,
)
from tokenlake.store.testing import tiny_run


@pytest.fixture
def lake(tmp_path):
    r = tiny_run(n_images=3, error_ids=(2,))
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


def test_write_run_accepts_polars_and_is_idempotent(tmp_path):
    r = tiny_run(n_images=5)
    args = {**r, "images": pl.from_arrow(r["images"]), "tokens": pl.from_arrow(r["tokens"])}
    p1 = write_run(tmp_path, "pl-run", shard_size=2, **args)
    before = p1.read_bytes()
    assert write_run(tmp_path, "pl-run", shard_size=2, **args) == p1
    assert p1.read_bytes() == before
    assert open_lake(tmp_path).sql("SELECT count(*) AS n FROM images").column("n")[0].as_py() == 5


def test_write_run_derives_the_image_summaries(tmp_path):
    """A user bringing tokens from elsewhere leaves n_tokens, max_patch_norm and mean_patch_norm
    out: write_run derives them from the tokens table, equal to what extraction computes."""
    r = tiny_run(n_images=5, error_ids=(1,), seed=2)
    full = r["images"]
    bare = full.drop_columns(["n_tokens", "max_patch_norm", "mean_patch_norm"])
    write_run(tmp_path, "bare", **{**r, "images": pl.from_arrow(bare)}, shard_size=2)
    got = open_lake(tmp_path).sql("SELECT * EXCLUDE (run) FROM images ORDER BY image_id")
    assert got.column_names == full.column_names
    tok = r["tokens"].to_pandas()
    p = tok[tok.kind == "patch"].groupby("image_id").norm
    assert got.column("n_tokens").to_pylist() == tok.groupby("image_id").size().tolist() == [21] * 5
    np.testing.assert_array_equal(got.column("max_patch_norm").to_numpy(), p.max().to_numpy())
    np.testing.assert_allclose(got.column("mean_patch_norm").to_numpy(),
                               p.apply(lambda x: x.to_numpy(np.float64).mean()), rtol=1e-6)
    # the generator's own (given) columns agree, so writing them is accepted as well
    write_run(tmp_path, "given", **r)


@pytest.mark.parametrize("column, value, why", [
    ("n_tokens", 20, "image_id 3: n_tokens 20, but it has 21 token rows"),
    ("max_patch_norm", 1e4, "image_id 3: max_patch_norm 10000, but the max of its patch tokens"),
    ("mean_patch_norm", None, "image_id 3: mean_patch_norm NULL, but the mean of its patch"),
])
def test_write_run_refuses_summaries_that_disagree_with_the_tokens(tmp_path, column, value, why):
    r = tiny_run(n_images=4)
    images = r["images"]
    col = images.column(column).to_pylist()
    col[3] = value
    images = images.set_column(images.schema.get_field_index(column), column,
                               pa.array(col, images.schema.field(column).type))
    with pytest.raises(ContractError, match=rf"images\.{column} disagrees with the tokens table "
                                            rf"for 1 image\(s\) \(e\.g\. {why}.*leave the column out"):
        write_run(tmp_path, "x", **{**r, "images": images})
    assert not (tmp_path / "runs" / "x").exists()  # refused before anything is written
