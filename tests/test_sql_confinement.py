"""Lake.sql is read-only and cannot reach files outside the lake."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokenlake.store import ReadOnlyQuery, open_lake, write_run
from tokenlake.store.testing import tiny_run


@pytest.fixture
def lake(tmp_path):
    root = tmp_path / "lake"
    write_run(root, "r", **tiny_run())
    outside = tmp_path / "outside.parquet"
    pq.write_table(pa.table({"secret": [42]}), outside)
    return open_lake(root), outside


def test_select_and_explain_work(lake):
    lk, _ = lake
    assert (
        lk.sql("SELECT count(*) AS n FROM tokens WHERE norm > $x", params={"x": -1.0})
        .column("n")[0]
        .as_py()
        == 63
    )
    assert lk.sql("EXPLAIN SELECT * FROM outliers").num_rows >= 1
    assert lk.sql("WITH t AS (SELECT 1 AS a) SELECT * FROM t").num_rows == 1


def test_reading_outside_the_lake_fails(lake):
    lk, outside = lake
    with pytest.raises(duckdb.Error, match="[Pp]ermission"):
        lk.sql(f"SELECT * FROM read_parquet('{outside}')")
    with pytest.raises(duckdb.Error, match="[Pp]ermission"):
        lk.connect().execute(f"SELECT * FROM '{outside}'").fetchall()
    with pytest.raises(duckdb.Error):
        lk.sql("SELECT * FROM read_csv('/etc/passwd')")
    with pytest.raises(duckdb.Error):
        lk.connect().execute("SET enable_external_access = true")


@pytest.mark.parametrize(
    "stmt",
    [
        "COPY (SELECT 1) TO '{lake}/x.parquet'",
        "CREATE TABLE t AS SELECT 1",
        "CREATE VIEW v AS SELECT 1",
        "INSERT INTO runs SELECT * FROM runs",
        "DROP VIEW tokens",
        "ATTACH '{lake}/x.db'",
        "PRAGMA version",
        "SET threads = 1",
        "INSTALL httpfs",
        "EXPLAIN ANALYZE COPY (SELECT 1) TO '{lake}/x.parquet'",
        "/* hi */ explain analyze CREATE TABLE t AS SELECT 1",
        "SELECT 1; SELECT 2",
    ],
)
def test_non_select_statements_are_refused(lake, stmt):
    lk, _ = lake
    with pytest.raises(ReadOnlyQuery, match="tokenlake sql"):
        lk.sql(stmt.format(lake=lk.path))
    assert not (lk.path / "x.parquet").exists() and not (lk.path / "x.db").exists()
    assert lk.sql("SELECT count(*) AS n FROM tokens").column("n")[0].as_py() == 63


def test_copy_out_of_the_lake_fails_even_on_the_raw_connection(lake, tmp_path):
    lk, _ = lake
    with pytest.raises(duckdb.Error):
        lk.connect().execute(f"COPY (SELECT 1) TO '{tmp_path}/leak.csv'")
    assert not (tmp_path / "leak.csv").exists()


def test_a_lake_path_with_glob_characters_confines_to_itself(tmp_path):
    """The lake's path is allowed literally and escaped (the views hand DuckDB escaped paths):
    neither lets a read reach a sibling folder the path matches as a pattern."""
    root = tmp_path / "lake[1]"
    write_run(root, "r", **tiny_run())
    (tmp_path / "lake1").mkdir()
    pq.write_table(pa.table({"secret": [42]}), tmp_path / "lake1" / "secret.parquet")
    lk = open_lake(root)
    assert lk.sql("SELECT count(*) AS n FROM tokens").column("n")[0].as_py() == 63
    for path in (f"{root}/secret.parquet", f"{tmp_path}/lake[[]1]/../lake1/secret.parquet",
                 f"{root}/../lake1/secret.parquet", f"{tmp_path}/lake?/secret.parquet"):
        with pytest.raises(duckdb.Error, match="[Pp]ermission"):
            lk.sql(f"SELECT * FROM read_parquet('{path}')")
