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
    "threshold_norms": ["VARCHAR", "VARCHAR", "FLOAT"],
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


# -- one bad file stays one bad file; lake paths with glob characters (issue 13) ---------------


def _ranking(run: str) -> pa.Table:
    return pa.table({
        "run": [run], "method": ["jiang"], "detect_block": pa.array([0], pa.int16()),
        "highest_block": pa.array([0], pa.int16()), "sparsity_filter": [True],
        "rank": pa.array([1], pa.int32()), "block": pa.array([0], pa.int16()),
        "neuron": pa.array([3], pa.int32()), "score": [1.0], "mean_abs_outlier": [1.0],
        "mean_abs_normal": [0.5], "outlier_share": [0.2], "sparse_share": [0.9],
        "n_images": [5], "n_outlier": [3], "n_normal": [70]})


def _three_runs(root):
    """Runs a, b (whose outliers are judged by a's threshold) and c (3 shards each), with blocks
    for b and c, a probe result and a neuron ranking for a and c."""
    from tokenlake.store import write_neurons
    from tokenlake.store.testing import synthetic_probe_result

    write_run(root, "a", shard_size=2, **tiny_run(n_images=5, seed=1))
    b = tiny_run(n_images=5, seed=2)
    b["manifest"]["outlier_ref"] = "a"
    write_run(root, "b", shard_size=2, blocks=_blocks(b), **b)
    c = tiny_run(n_images=5, seed=3)
    write_run(root, "c", shard_size=2, blocks=_blocks(c), **c)
    for run in ("a", "c"):
        synthetic_probe_result(root, run, "position", values={("normal", "top1"): 90.0})
        write_neurons(root, run, _ranking(run))
    return open_lake(root)


ONE_RUN = {  # queries that reach run a (and b, whose threshold is a's) only
    "tokens": "SELECT count(*) AS n FROM tokens WHERE run = 'a'",
    "images": "SELECT count(*) AS n FROM images WHERE run = 'a'",
    "outliers": "SELECT count(*) AS n FROM outliers WHERE run = 'a'",
    "outliers b": "SELECT count(*) AS n, any_value(threshold_run) AS t FROM outliers WHERE run = 'b'",
    "thresholds": "SELECT threshold AS n FROM thresholds WHERE run = 'a'",
    "thresholds_at": "SELECT threshold AS n FROM thresholds_at(0.5) WHERE run = 'a'",
    "cards": "SELECT n_outliers AS n, threshold FROM cards WHERE run = 'a'",
    "in": "SELECT count(*) AS n FROM tokens WHERE run IN ('a', 'b')",
    "not": "SELECT count(*) AS n FROM tokens WHERE run <> 'c'",
    "join runs": "SELECT count(*) AS n FROM tokens t JOIN runs r USING (run) WHERE r.run = 'a'",
    "join tables": "SELECT count(*) AS n FROM tokens t JOIN images i USING (run, image_id) "
                   "WHERE i.run = 'a'",
    "self join": "SELECT count(*) AS n FROM outliers o JOIN tokens t "
                 "ON t.run = o.run AND t.image_id = o.image_id WHERE o.run = 'b'",
    "runs": "SELECT count(*) AS n FROM runs",
    "probes": "SELECT count(*) AS n FROM probe_results WHERE run = 'a'",
    "neurons": "SELECT count(*) AS n FROM neurons WHERE run = 'a'",
}


def _one_run_answers(lk, skip=()) -> dict:
    out = {k: lk.sql(q).to_pylist() for k, q in ONE_RUN.items() if k not in skip}
    out["param"] = lk.sql("SELECT count(*) AS n FROM outliers WHERE run = ?", params=["b"]).to_pylist()
    return out


def test_a_missing_file_damages_its_run_only(tmp_path):
    from tokenlake.store import DamagedRun

    lk = _three_runs(tmp_path)
    want = _one_run_answers(lk)
    assert want["outliers b"][0]["n"] > 0 and want["outliers b"][0]["t"] == "a"
    lost = tmp_path / "runs" / "c" / "images" / "s00001.parquet"
    lost.unlink()  # while the connection is open: the folder changed, Lake.sql rebuilds it
    assert _one_run_answers(lk) == want
    assert _one_run_answers(open_lake(tmp_path)) == want  # and a fresh open
    for q in ("SELECT count(*) FROM tokens", "SELECT * FROM images WHERE run = 'c'",
              "SELECT count(*) FROM tokens WHERE run = 'c'",  # the whole run, not one table
              "SELECT count(*) FROM blocks", "SELECT * FROM cards", "SELECT * FROM outliers",
              "SELECT count(*) FROM tokens WHERE run = 'a' OR norm > 0",
              # a join whose run comes from data reaches every run's branch: it raises, it
              # never answers without c
              "SELECT count(*) FROM tokens t JOIN (VALUES ('a')) v(r) ON v.r = t.run",
              "SELECT count(*) FROM tokens WHERE run = (SELECT 'a')"):
        with pytest.raises(DamagedRun, match="run 'c' is damaged") as got:
            lk.sql(q)
        msg = str(got.value)
        assert got.value.run == "c" and "runs/c/images/s00001.parquet" in msg and "missing" in msg
        assert f"tokenlake validate --lake {lk.path} --runs c" in msg
    assert lk.sql("SELECT run FROM runs ORDER BY run").column(0).to_pylist() == ["a", "b", "c"]
    lost.write_bytes(b"")  # an empty file in its place: unreadable, found when binding
    with pytest.raises(DamagedRun, match="run 'c' is damaged"):
        lk.sql("SELECT count(*) FROM images")
    assert _one_run_answers(lk) == want


def test_the_command_line_names_the_damaged_run(tmp_path, capsys):
    from tokenlake.cli.main import main

    _three_runs(tmp_path)
    (tmp_path / "runs" / "c" / "errors" / "s00000.parquet").unlink()
    assert main(["sql", "--lake", str(tmp_path), "SELECT count(*) AS n FROM tokens WHERE run = 'a'"
                 ]) == 0
    assert "105" in capsys.readouterr().out
    assert main(["sql", "--lake", str(tmp_path), "SELECT count(*) FROM errors"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run 'c' is damaged" in err
    assert "runs/c/errors/s00000.parquet" in err and "tokenlake validate" in err


NAMED_FOR_A_AND_B = {  # every value a named query's parameters take, for runs a and b
    "runs": ["a", "b"], "run": "b", "q": 0.9, "p": 0.5, "n_bins": 4, "n": 20,
    "image_ids": [0, 1], "threshold": 30.0, "thresholds": [30.0, 30.0],
    "source_ids": ["img0.jpg", "img1.jpg"]}


def test_named_queries_for_other_runs_do_not_reach_a_damaged_run(tmp_path):
    """The analyses' named queries take their runs as a parameter: a damaged run outside it is
    never reached (nor read: they cost the chosen runs only)."""
    lk = _three_runs(tmp_path)
    names = [n for n in tsql.query_names() if tsql.query_info(n).params]
    args = {n: tsql.bind_params(n, {p.name: NAMED_FOR_A_AND_B[p.name]
                                    for p in tsql.query_info(n).params}) for n in names}
    want = {n: lk.sql(tsql.query_text(n), params=args[n]).to_pylist() for n in names}
    assert all(want.values())
    (tmp_path / "runs" / "c" / "tokens" / "s00001.parquet").unlink()
    (tmp_path / "runs" / "c" / "blocks" / "s00001.parquet").unlink()
    got = {n: lk.sql(tsql.query_text(n), params=args[n]).to_pylist() for n in names}
    assert _rounded(got) == _rounded(want)  # skewness & co. vary in the last bits between runs


def _rounded(x):
    if isinstance(x, float):
        return float(f"{x:.10g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def test_a_damaged_threshold_run_names_itself(tmp_path):
    from tokenlake.store import DamagedRun

    lk = _three_runs(tmp_path)
    (tmp_path / "runs" / "a" / "tokens" / "s00002.parquet").unlink()
    assert lk.sql("SELECT count(*) AS n FROM tokens WHERE run = 'b'").column(0)[0].as_py() == 105
    assert lk.sql("SELECT count(*) AS n FROM outliers WHERE run = 'c'").column(0)[0].as_py() > 0
    with pytest.raises(DamagedRun, match=r"run 'a' is damaged \(its patch-token norms set the "
                                         r"outlier threshold of run 'b'\)") as got:
        lk.sql("SELECT count(*) FROM outliers WHERE run = 'b'")
    assert got.value.run == "a"


def test_a_file_corrupted_in_place_under_an_open_connection(tmp_path):
    """Overwriting a file in place leaves its folder's mtime as it was: DuckDB's error on the
    file (when binding the first file of a run, or reading another) names it; Lake.sql rebuilds
    the connection once, then answers for the other runs and reports the damaged one."""
    from tokenlake.store import DamagedRun

    lk = _three_runs(tmp_path)
    want = _one_run_answers(lk)
    for name in ("s00000.parquet", "s00002.parquet"):  # bound at every query / read when reached
        f = tmp_path / "runs" / "c" / "tokens" / name
        good = f.read_bytes()
        with open(f, "r+b") as fh:  # its footer: no reader can open it
            fh.seek(-8, 2)
            fh.write(b"garbage!")
        assert _one_run_answers(lk) == want
        with pytest.raises(DamagedRun, match="run 'c' is damaged") as got:
            lk.sql("SELECT count(*) FROM tokens WHERE run = 'c'")
        assert f"runs/c/tokens/{name}" in str(got.value) and "tokenlake validate" in str(got.value)
        f.write_bytes(good)
        assert lk.sql("SELECT count(*) AS n FROM tokens").column(0)[0].as_py() == 3 * 105


def test_an_unreadable_manifest_damages_its_run_only(tmp_path):
    from tokenlake.store import DamagedRun

    lk = _three_runs(tmp_path)
    # `runs` lists every run and the cards match neuron rankings across all of `runs`: both
    # reach c's row, which cannot be known without its manifest
    want = _one_run_answers(lk, skip=("runs", "cards"))
    m = tmp_path / "runs" / "c" / "manifest.json"
    for text in ("{ not json", m.read_text().replace('"schema_version": 3', '"schema_version": 99')):
        m.write_text(text)
        assert _one_run_answers(open_lake(tmp_path), skip=("runs", "cards")) == want
        for q in ("SELECT * FROM runs", "SELECT * FROM runs WHERE run = 'c'",
                  "SELECT count(*) FROM tokens WHERE run = 'c'"):
            with pytest.raises(DamagedRun, match="run 'c' is damaged: its manifest.json cannot "
                                                 "be read"):
                open_lake(tmp_path).sql(q)


def test_damaged_probe_results_and_rankings_stay_theirs(tmp_path):
    from tokenlake.store import DamagedRun

    lk = _three_runs(tmp_path)
    (tmp_path / "neurons" / "c.parquet").write_bytes(b"not parquet")
    res = next((tmp_path / "probes" / "c").iterdir()) / "result.parquet"
    res.write_bytes(b"not parquet either")
    lk = open_lake(tmp_path)
    assert lk.sql("SELECT count(*) AS n FROM neurons WHERE run = 'a'").column(0)[0].as_py() == 1
    assert lk.sql("SELECT count(*) AS n FROM probe_results WHERE run = 'a'").column(0)[0].as_py() \
        == 1
    assert lk.sql("SELECT count(*) AS n FROM tokens").column(0)[0].as_py() == 3 * 105
    with pytest.raises(DamagedRun, match="neurons/c.parquet cannot be read"):
        lk.sql("SELECT * FROM neurons")
    with pytest.raises(DamagedRun, match=r"probe results of run 'c' \(probes/c/\) cannot be read"):
        lk.sql("SELECT * FROM probe_results WHERE run = 'c'")


def test_new_probe_results_and_rankings_show_up_on_an_open_lake(tmp_path):
    from tokenlake.store import write_neurons
    from tokenlake.store.testing import synthetic_probe_result

    lk = _three_runs(tmp_path)
    n = lambda v: lk.sql(f"SELECT count(*) FROM {v} WHERE run = 'b'").column(0)[0].as_py()
    assert (n("probe_results"), n("neurons")) == (0, 0)
    synthetic_probe_result(tmp_path, "b", "classify", values={("outlier", "acc"): 50.0})
    write_neurons(tmp_path, "b", _ranking("b"))
    assert (n("probe_results"), n("neurons")) == (1, 1)


@pytest.mark.parametrize("name", ["lake[1]", "lake*", "lake?", "la[!k]e", "it's {a,b} \\ lake"])
def test_lake_paths_with_glob_characters(tmp_path, name):
    """Glob characters in the lake's path are taken literally, even where the pattern would
    match another lake (lake[1] would read lake1, lake? lakeX)."""
    import shutil

    plain = tmp_path / "plain"
    want = _one_run_answers(_three_runs(plain))
    everything = "SELECT run, count(*) AS n FROM {} GROUP BY run ORDER BY run"
    whole = {v: open_lake(plain).sql(everything.format(v)).to_pylist()
             for v in ("tokens", "probe_results", "neurons", "outliers", "blocks")}
    for decoy in ("lake1", "lakeX", "lake", "lale"):  # what the globs would match
        _three_runs(tmp_path / decoy)
        (tmp_path / decoy / "runs" / "a" / "tokens" / "s00000.parquet").unlink()
    shutil.copytree(plain, tmp_path / name)
    lk = open_lake(tmp_path / name)
    assert _one_run_answers(lk) == want
    assert {v: lk.sql(everything.format(v)).to_pylist() for v in whole} == whole
    from tokenlake.store import DamagedRun

    with open(tmp_path / name / "runs" / "c" / "tokens" / "s00000.parquet", "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"garbage!")  # in place: found by DuckDB, whose error names the escaped path
    assert _one_run_answers(lk) == want
    with pytest.raises(DamagedRun, match="run 'c' is damaged.*runs/c/tokens/s00000.parquet"):
        lk.sql("SELECT * FROM tokens WHERE run = 'c'")


def test_duckdb_reads_a_page_whose_checksum_fails(tmp_path):
    """A characterisation (store/SCHEMA.md, "SQL"): DuckDB 2.0.1 does not verify Parquet page
    checksums, pyarrow (asked to) does; only `tokenlake validate` finds such a flipped byte. If
    this fails, DuckDB has started verifying them: say so in SCHEMA.md."""
    import duckdb
    import pyarrow.parquet as pq

    f = tmp_path / "x.parquet"
    values = np.arange(100, dtype=np.float32) + 0.5
    pq.write_table(pa.table({"x": values}), f, compression="none", use_dictionary=False,
                   write_page_checksum=True)
    data = bytearray(f.read_bytes())
    data[bytes(data).index(np.float32(50.5).tobytes())] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(OSError, match="CRC"):
        pq.read_table(f, page_checksum_verification=True)
    got = duckdb.connect().execute(f"SELECT x FROM '{f}' WHERE x > 50 AND x < 51").fetchall()
    assert got and got[0][0] != 50.5
