"""Extraction end to end through the CLI: a tiny lake from generated images, checked independently."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tokenlake.cli.main import main
from tokenlake.extract import create_backbone, resolve_model, resolve_weights
from tokenlake.extract._preprocess import normalise
from tokenlake.store import open_lake


@pytest.fixture(scope="module")
def folder(tmp_path_factory, image_helpers):
    root = tmp_path_factory.mktemp("imgs")
    expected = image_helpers.write_imagefolder(root, per_class=3)
    return root, expected


@pytest.fixture(scope="module")
def lake(folder, tmp_path_factory):
    root, _ = folder
    path = tmp_path_factory.mktemp("lake")
    assert main(["subset", "--lake", str(path), "--name", "tiny", "--data", str(root)]) == 0
    for model, px in (("dinov2_s_reg4", 56), ("pvt_b0", 64)):
        code = main(["extract", "--lake", str(path), "--model", model, "--subset", "tiny",
                     "--weights", "random", "--img-size", str(px), "--batch-size", "4",
                     "--shard-size", "5", "--decode-workers", "0", "--quiet"])
        assert code == 0
    return path


def test_every_input_lands_in_images_or_errors(lake, folder):
    _, expected = folder
    db = open_lake(lake)
    for run in ("dinov2_s_reg4-56-tiny-random", "pvt_b0-64-tiny-random"):
        got = db.sql(f"SELECT source_id, 'ok' AS outcome FROM images WHERE run = '{run}' UNION ALL "
                     f"SELECT source_id, reason FROM errors WHERE run = '{run}'").to_pylist()
        outcome = {r["source_id"]: r["outcome"] for r in got}
        assert len(got) == len(outcome) == len(expected)  # no duplicates, nothing lost
        for path, (_cls, want) in expected.items():
            assert outcome[path] == ("ok" if want[0] == "ok" else want[1]), path


def test_manifest_times_the_loop_without_model_construction(lake, folder):
    _, expected = folder
    man = open_lake(lake).manifest("pvt_b0-64-tiny-random")
    # images and errors alike, after the first batch of 4 (the warm-up, not timed)
    assert man["loop_images"] == len(expected) - 4
    assert 0 < man["loop_time_s"] <= man["wall_time_s"]


def test_tokens_rows_and_labels(lake):
    db = open_lake(lake)
    rows = db.sql("SELECT run, kind, count(*) AS n, count(slot) AS stored FROM tokens "
                  "GROUP BY ALL ORDER BY ALL").to_pylist()
    n_img = db.sql("SELECT run, count(*) AS n FROM images GROUP BY run").to_pylist()
    n = {r["run"]: r["n"] for r in n_img}
    counts = {(r["run"], r["kind"]): (r["n"], r["stored"]) for r in rows}
    vit, pvt = "dinov2_s_reg4-56-tiny-random", "pvt_b0-64-tiny-random"
    assert counts[(vit, "cls")] == (n[vit], n[vit])
    assert counts[(vit, "reg")] == (4 * n[vit], 4 * n[vit])
    assert counts[(vit, "patch")] == (16 * n[vit], 16 * n[vit])
    assert counts[(pvt, "patch")] == (4 * n[pvt], 4 * n[pvt])
    labels = db.sql("SELECT DISTINCT label FROM images ORDER BY label").column("label").to_pylist()
    assert labels == [0, 1, 2]


def test_stored_embeddings_equal_a_fresh_forward_on_the_stored_pixels(lake):
    """Independent check: rebuild the model, feed it the lake's own pixels, compare embeddings."""
    db = open_lake(lake)
    run = "dinov2_s_reg4-56-tiny-random"
    man = db.manifest(run)
    assert man["random_weights"] is True
    tok = db.sql(f"SELECT image_id, token, slot, norm, attn FROM tokens WHERE run = '{run}' "
                 "ORDER BY image_id, token").to_pandas()
    first = tok[tok.image_id == tok.image_id.min()]
    emb, cells = db.gather(run, first.slot.to_numpy(), pixels=True)
    pixels = cells[5:].reshape(4, 4, 14, 14, 3).transpose(0, 2, 1, 3, 4).reshape(1, 56, 56, 3)
    model = create_backbone(resolve_model("dinov2_s_reg4"), weights=resolve_weights("random"),
                            img_size=56)
    from tokenlake.extract._preprocess import DataConfig

    cfg = DataConfig(**{k: tuple(v) if isinstance(v, list) else v
                        for k, v in man["data_config"].items()})
    with torch.no_grad():
        x = normalise(torch.from_numpy(pixels), cfg)
        spatial, prefix = model.forward_intermediates(
            x, indices=[11], norm=False, intermediates_only=True, return_prefix_tokens=True)[0]
    ref = torch.cat([prefix, spatial.flatten(2).transpose(1, 2)], 1)[0].numpy()
    np.testing.assert_allclose(emb.astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(first.norm.to_numpy(), np.linalg.norm(ref, axis=-1), rtol=1e-4)
    cls = db.image_array(run, "cls_post", [int(first.image_id.iloc[0])])
    with torch.no_grad():
        post = model.forward_features(x)
    np.testing.assert_allclose(cls[0], post[0, 0].numpy(), rtol=1e-4, atol=1e-5)


def test_parquet_is_readable_by_polars_pandas_and_duckdb_directly(lake):
    import duckdb
    import polars as pl

    files = sorted((lake / "runs").glob("*/tokens/*.parquet"))
    assert files
    assert pl.read_parquet(files[0]).height == pq.read_table(files[0]).to_pandas().shape[0]
    n = duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{files[0]}')").fetchone()[0]
    assert n > 0


def test_validate_and_runs_commands(lake, capsys):
    assert main(["validate", "--lake", str(lake)]) == 0
    assert main(["runs", "--lake", str(lake)]) == 0
    out = capsys.readouterr().out
    assert "dinov2_s_reg4-56-tiny-random" in out and "random" in out


def test_sql_command_formats(lake, tmp_path, capsys):
    q = "SELECT run, count(*) AS n FROM outliers GROUP BY run ORDER BY run"
    assert main(["sql", "--lake", str(lake), q]) == 0
    assert "pvt_b0-64-tiny-random" in capsys.readouterr().out
    assert main(["sql", "--lake", str(lake), q, "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("run,n")
    out = tmp_path / "o.parquet"
    assert main(["sql", "--lake", str(lake), q, "--format", "parquet", "--output", str(out)]) == 0
    assert pq.read_table(out).num_rows == 2
    assert main(["sql", "--lake", str(lake), f"COPY tokens TO '{tmp_path}/x.csv'"]) == 2


def test_rerun_is_a_no_op_and_changed_config_is_refused(lake, capsys):
    args = ["extract", "--lake", str(lake), "--model", "pvt_b0", "--subset", "tiny", "--weights",
            "random", "--img-size", "64", "--shard-size", "5", "--decode-workers", "0", "--quiet"]
    assert main(args) == 0
    assert main([*args[:-3], "--shard-size", "7", "--quiet"]) == 2
    assert "shard_size" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--model", "dinov2_gg"], "Did you mean"),
    (["--model", "dinov2_s", "--img-size", "800"], "798 or 812"),
    (["--model", "pvt_b0", "--policy", "sample"], "--outlier-ref"),
    (["--model", "pvt_b0", "--subset", "nope"], "nope"),
])
def test_bad_requests_fail_before_any_model_runs(lake, capsys, argv, message, monkeypatch):
    import tokenlake.extract._loop as loop

    monkeypatch.setattr(loop, "create_backbone", lambda *a, **k: pytest.fail("model was built"))
    base = ["extract", "--lake", str(lake), "--weights", "random", "--quiet"]
    if "--subset" not in argv:
        argv = [*argv, "--subset", "tiny"]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err
