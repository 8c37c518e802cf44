"""Hostile statements against Lake.sql: each is refused, leaves every file of the lake (and the
folders around it) byte-identical, and the connection answers as before afterwards (issue 13)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokenlake.store import ReadOnlyQuery, open_lake, write_neurons, write_run
from tokenlake.store._sqlviews import check_read_only
from tokenlake.store.testing import synthetic_probe_result, tiny_run

RO, DENY, ANY = "read-only", "denied", "any"

# (statement, how it must fail): RO = ReadOnlyQuery from the statement check, DENY = DuckDB
# refuses the file access, ANY = either. {lake}: the lake; {out}: a folder beside it; {cwd}: the
# working directory (whose .tmp/ DuckDB once allowed); {sib}: a folder whose name extends the lake's.
BATTERY = [
    # data-modifying statements inside a query
    ("WITH x AS (DELETE FROM runs RETURNING run) SELECT * FROM x", RO),
    ("WITH x AS (INSERT INTO runs (run) VALUES ('zz') RETURNING run) SELECT * FROM x", RO),
    ("WITH x AS (UPDATE runs SET threshold_run = 'zz' RETURNING run) SELECT * FROM x", RO),
    ("WITH x AS (DELETE FROM tokens RETURNING run) SELECT count(*) FROM x", RO),
    ("WITH x AS (/* quiet */ DELETE FROM runs RETURNING run) SELECT * FROM x", RO),
    ("with X as (delete from RUNS returning RUN) select * from X", RO),
    ("WITH a AS (SELECT 1), x AS (DELETE FROM runs RETURNING run) SELECT * FROM a", RO),
    ("SELECT * FROM (WITH x AS (DELETE FROM runs RETURNING run) SELECT * FROM x)", RO),
    (("SELECT 1 WHERE EXISTS (WITH x AS (INSERT INTO runs (run) VALUES ('zz') RETURNING run) "
      "SELECT * FROM x)"), RO),
    (("SELECT * FROM runs UNION ALL (WITH x AS (DELETE FROM runs RETURNING *) "
      "SELECT * FROM x)"), RO),
    ("FROM (WITH x AS (UPDATE runs SET model = 'm' RETURNING *) FROM x)", RO),
    (("SELECT * FROM (VALUES (1)) t(a), LATERAL (WITH y AS (DELETE FROM runs RETURNING run) "
      "SELECT * FROM y)"), RO),
    ("WITH x AS (COPY (SELECT 42 AS a) TO '{lake}/leak.csv') SELECT * FROM x", RO),
    (("WITH x AS (COPY (SELECT 1 AS a) TO '{lake}/runs/a/tokens/s00000.parquet' "
      "(FORMAT parquet)) SELECT * FROM x"), RO),
    ("WITH x AS (COPY (SELECT 42 AS a) TO '{out}/leak.csv') SELECT * FROM x", RO),
    ("SELECT * FROM query('WITH x AS (DELETE FROM runs RETURNING run) SELECT * FROM x')", ANY),
    ("SELECT * FROM query('DELETE FROM runs RETURNING run')", ANY),
    ("SELECT * FROM query('COPY (SELECT 1) TO ''{lake}/leak.csv''')", ANY),
    ("EXPLAIN WITH x AS (DELETE FROM runs RETURNING run) SELECT * FROM x", RO),
    ("EXPLAIN ANALYZE WITH x AS (DELETE FROM runs RETURNING run) SELECT * FROM x", RO),
    ("EXPLAIN ANALYZE WITH x AS (COPY (SELECT 1) TO '{lake}/leak.csv') SELECT * FROM x", RO),
    # writing statements
    ("DELETE FROM runs", RO),
    ("INSERT INTO runs SELECT * FROM runs", RO),
    ("INSERT INTO runs (run) VALUES ('zz') RETURNING run", RO),
    ("UPDATE runs SET model = 'x'", RO),
    ("COPY (SELECT 1) TO '{lake}/leak.csv'", RO),
    ("COPY tokens TO '{lake}/leak.parquet'", RO),
    ("COPY runs FROM '{lake}/runs/a/manifest.json'", RO),
    ("EXPORT DATABASE '{lake}/export'", RO),
    ("IMPORT DATABASE '{lake}/export'", RO),
    ("EXPLAIN ANALYZE COPY (SELECT 1) TO '{lake}/x.parquet'", RO),
    ("EXPLAIN ANALYZE DELETE FROM runs", RO),
    ("/* hi */ explain analyze CREATE TABLE t AS SELECT 1", RO),
    ("EXPLAIN DROP VIEW tokens", RO),
    # attach, extensions, settings
    ("ATTACH '{lake}/leak.db' AS x", RO),
    ("ATTACH ':memory:' AS x", RO),
    ("DETACH memory", RO),
    ("USE system", RO),
    ("INSTALL httpfs", RO),
    ("LOAD httpfs", RO),
    ("FORCE INSTALL json", RO),
    ("UPDATE EXTENSIONS", RO),
    ("PRAGMA version", RO),
    ("PRAGMA enable_profiling", RO),
    ("PRAGMA memory_limit = '1MB'", RO),
    ("SET threads = 1", RO),
    ("SET enable_external_access = true", RO),
    ("SET allowed_directories = ['/']", RO),
    ("SET temp_directory = '{out}'", RO),
    ("SET profiling_output = '{lake}/profile.json'", RO),
    ("RESET lock_configuration", RO),
    ("SET VARIABLE x = 1", RO),
    ("CALL pragma_version()", RO),
    # catalog changes
    ("CREATE TABLE t AS SELECT 1", RO),
    ("CREATE TEMP TABLE t AS SELECT 1", RO),
    ("CREATE VIEW outliers2 AS SELECT 1", RO),
    ("CREATE OR REPLACE VIEW runs AS SELECT 1 AS run", RO),
    ("CREATE MACRO m(x) AS x + 1", RO),
    ("CREATE OR REPLACE MACRO thresholds_at(q) AS TABLE SELECT 1 AS run", RO),
    ("CREATE SECRET (TYPE s3, KEY_ID 'x', SECRET 'y')", RO),
    ("CREATE SEQUENCE s", RO),
    ("CREATE SCHEMA s", RO),
    ("CREATE TYPE t AS INTEGER", RO),
    ("DROP VIEW tokens", RO),
    ("DROP MACRO thresholds_at", RO),
    ("ALTER VIEW tokens RENAME TO t2", RO),
    ("COMMENT ON VIEW tokens IS 'x'", RO),
    ("PIVOT runs ON model USING count(*)", RO),  # creates enum types first
    ("CHECKPOINT", RO),
    ("VACUUM", RO),
    ("ANALYZE", RO),
    ("BEGIN TRANSACTION", RO),
    ("PREPARE p AS SELECT 1", RO),
    ("EXECUTE p", RO),
    ("DEALLOCATE p", RO),
    # more than one statement, statements hidden behind comments
    ("SELECT 1; DROP VIEW tokens", RO),
    ("SELECT 1; SELECT 2", RO),
    ("SELECT 1 /* ; */ ; DELETE FROM runs", RO),
    ("/* SELECT */ DROP VIEW tokens", RO),
    ("-- SELECT 1\nDROP VIEW tokens", RO),
    ("SELECT 1 -- harmless\n; CREATE TABLE t AS SELECT 1", RO),
    # files outside the lake (and DuckDB's temporary directory in the working directory)
    ("SELECT * FROM read_csv('/etc/passwd')", DENY),
    ("SELECT * FROM read_text('/etc/hostname')", DENY),
    ("SELECT * FROM read_blob('{out}/secret.parquet')", DENY),
    ("SELECT * FROM read_parquet('{out}/secret.parquet')", DENY),
    ("SELECT * FROM '{out}/secret.parquet'", DENY),
    ("SELECT * FROM parquet_metadata('{out}/secret.parquet')", DENY),
    ("SELECT * FROM read_json('{out}/secret.json')", DENY),
    ("SELECT * FROM sniff_csv('/etc/passwd')", DENY),
    ("SELECT * FROM glob('/etc/*')", DENY),
    ("SELECT * FROM glob('{out}/*')", DENY),
    ("SELECT * FROM read_parquet('{lake}/../out/secret.parquet')", DENY),
    ("SELECT * FROM read_parquet('{sib}/secret.parquet')", DENY),
    ("SELECT * FROM read_csv('.tmp/secret.csv')", DENY),
    ("SELECT * FROM read_csv('{cwd}/.tmp/secret.csv')", DENY),
    ("SELECT * FROM read_text('{cwd}/.tmp/*')", DENY),
    ("SELECT * FROM read_parquet('https://example.com/x.parquet')", DENY),
]


def _tree(*roots: Path) -> dict[str, str | None]:
    """Every folder (None) and file (sha256 of its bytes) under `roots`."""
    out: dict[str, str | None] = {}
    for root in roots:
        for folder, _dirs, files in os.walk(root):
            out[folder] = None
            for f in files:
                p = os.path.join(folder, f)
                out[p] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def _answers(lk) -> dict[str, list]:
    return {
        q: lk.sql(q).to_pylist()
        for q in (
            "SELECT run, count(*) AS n, min(threshold) AS t FROM outliers GROUP BY run ORDER BY run",
            "SELECT * FROM runs ORDER BY run",
            "SELECT run, count(*) AS n FROM tokens GROUP BY run ORDER BY run",
            "SELECT run, probe, metric, value FROM probe_results ORDER BY ALL",
            "SELECT run, block, neuron, rank FROM neurons ORDER BY ALL",
            "SELECT run, threshold FROM thresholds_at(0.5) ORDER BY run",
        )
    }


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    lake, out, sib, cwd = base / "lake", base / "out", base / "lake2", base / "cwd"
    write_run(lake, "a", **tiny_run(seed=1, n_images=5))
    b = tiny_run(seed=2, n_images=4)
    b["manifest"]["outlier_ref"] = "a"
    write_run(lake, "b", **b)
    synthetic_probe_result(lake, "a", "position", values={("normal", "top1"): 97.0})
    write_neurons(lake, "a", pa.table({
        "run": ["a"], "method": ["jiang"], "detect_block": pa.array([0], pa.int16()),
        "highest_block": pa.array([0], pa.int16()), "sparsity_filter": [True],
        "rank": pa.array([1], pa.int32()), "block": pa.array([0], pa.int16()),
        "neuron": pa.array([3], pa.int32()), "score": [1.0], "mean_abs_outlier": [1.0],
        "mean_abs_normal": [0.5], "outlier_share": [0.2], "sparse_share": [0.9],
        "n_images": [5], "n_outlier": [3], "n_normal": [70]}))
    for folder in (out, sib):
        folder.mkdir()
        pq.write_table(pa.table({"secret": [42]}), folder / "secret.parquet")
    (out / "secret.json").write_text('{"secret": 42}')
    (cwd / ".tmp").mkdir(parents=True)
    (cwd / ".tmp" / "secret.csv").write_text("secret,42\n")
    return {"lake": lake, "out": out, "sib": sib, "cwd": cwd}


@pytest.fixture(scope="module")
def lk(hostile):
    prev = os.getcwd()
    os.chdir(hostile["cwd"])  # DuckDB's default temporary directory is ./.tmp
    try:
        lake = open_lake(hostile["lake"])
        baseline = _answers(lake)
        yield lake, baseline
    finally:
        os.chdir(prev)


def test_the_battery_is_large():
    assert len(BATTERY) >= 50
    assert len({s for s, _ in BATTERY}) == len(BATTERY)


@pytest.mark.parametrize("stmt,kind", BATTERY, ids=[f"{i:02d}" for i in range(len(BATTERY))])
def test_hostile_statement_is_refused_and_changes_nothing(hostile, lk, stmt, kind):
    lake, baseline = lk
    text = stmt.format(**{k: str(v) for k, v in hostile.items()})
    watched = (hostile["lake"], hostile["out"], hostile["sib"], hostile["cwd"])
    before = _tree(*watched)
    want = {RO: ReadOnlyQuery, DENY: duckdb.Error, ANY: (ReadOnlyQuery, duckdb.Error)}[kind]
    with pytest.raises(want) as got:
        lake.sql(text)
    if kind == DENY:
        assert "ermission" in str(got.value) or "disabled" in str(got.value), got.value
    assert _tree(*watched) == before
    assert _answers(lake) == baseline


def test_writes_fail_even_on_the_unchecked_connection(hostile):
    """Lake.connect() checks no statement, yet nothing in its catalog can be written: every base
    relation is a view (over the lake's files, or constants for `runs`)."""
    before = _tree(hostile["lake"])
    con = open_lake(hostile["lake"]).connect()
    for stmt in ("WITH x AS (DELETE FROM runs RETURNING run) SELECT * FROM x",
                 "WITH x AS (INSERT INTO runs (run) VALUES ('zz') RETURNING run) SELECT * FROM x",
                 "WITH x AS (UPDATE runs SET threshold_run = 'zz' RETURNING run) SELECT * FROM x",
                 "DELETE FROM tokens", "UPDATE images SET label = 0",
                 "INSERT INTO neurons SELECT * FROM neurons",
                 "DELETE FROM probe_results", "DELETE FROM threshold_norms"):
        with pytest.raises(duckdb.Error):
            con.execute(stmt).fetchall()
    kinds = con.execute("SELECT DISTINCT table_type FROM information_schema.tables").fetchall()
    assert kinds == [("VIEW",)]
    assert con.execute("SELECT count(*) FROM outliers").fetchone()[0] > 0
    assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 2
    assert _tree(hostile["lake"]) == before


def test_the_check_finds_writes_anywhere_in_the_tree():
    """Independently of what the catalog holds: on a connection with a real, writable table the
    statement check still refuses every data-modifying clause, at any depth."""
    con = duckdb.connect()
    con.execute("CREATE TABLE t (a INTEGER)")
    for stmt in ("WITH x AS (DELETE FROM t RETURNING a) SELECT * FROM x",
                 ("SELECT * FROM (SELECT * FROM (WITH x AS (INSERT INTO t VALUES (1) RETURNING "
                  "a) SELECT * FROM x))"),
                 ("SELECT (SELECT count(*) FROM (WITH x AS (UPDATE t SET a = 2 RETURNING a) "
                  "SELECT * FROM x))"),
                 "WITH x AS (COPY t TO 'x.csv') SELECT * FROM x",
                 "EXPLAIN ANALYZE WITH x AS (DELETE FROM t RETURNING a) SELECT * FROM x"):
        with pytest.raises(ReadOnlyQuery, match="read-only"):
            check_read_only(con, stmt)
    for ok in ("SELECT * FROM t", ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 "
                                   "FROM r WHERE n < 3) SELECT * FROM r"),
               "SELECT * FROM t UNION SELECT 2 EXCEPT SELECT 3",
               "EXPLAIN SELECT * FROM t", "DESCRIBE t", "SUMMARIZE t", "FROM t SELECT a",
               "SELECT * FROM (PIVOT t ON a IN (1) USING count(*))",
               "WITH x AS MATERIALIZED (SELECT 1) SELECT * FROM x", "SELECT $1::INTEGER"):
        check_read_only(con, ok)
    assert con.execute("SELECT count(*) FROM t").fetchone()[0] == 0


def test_reading_duckdbs_default_temporary_directory_fails(tmp_path, monkeypatch):
    """DuckDB allows reading its temporary directory (./.tmp by default, relative to the working
    directory) whatever allowed_directories says; the lake's connection puts it inside the lake."""
    write_run(tmp_path / "lake", "a", **tiny_run())
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "secret.csv").write_text("secret,42\n")
    monkeypatch.chdir(tmp_path)
    lk = open_lake(tmp_path / "lake")
    for path in (".tmp/secret.csv", str(tmp_path / ".tmp" / "secret.csv")):
        with pytest.raises(duckdb.Error, match="ermission|disabled"):
            lk.sql(f"SELECT * FROM read_csv('{path}')")
        with pytest.raises(duckdb.Error, match="ermission|disabled"):
            lk.connect().execute(f"SELECT * FROM read_csv('{path}')").fetchall()
    tmp = lk.sql("SELECT current_setting('temp_directory') AS d").column(0)[0].as_py()
    assert tmp.startswith(str(lk.path) + "/.tokenlake-sql-tmp-")
    assert not Path(tmp).exists()  # created only when a query spills

