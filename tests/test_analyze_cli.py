"""`tokenlake analyze` / `tokenlake report` sub-commands; no backbone ever runs."""

from __future__ import annotations

import argparse

import pytest

from tokenlake.cli import _analyze_cmd
from tokenlake.store import write_run
from tokenlake.store.testing import synthetic_run


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("lake")
    write_run(root, "same", **synthetic_run(blocks=2))
    write_run(root, "rnd", **synthetic_run(attention="elsewhere", random_weights=True, seed=3,
                                          model="deit3_m", params=38_000_000))
    return root


def _main(argv):
    parser = argparse.ArgumentParser(prog="tokenlake")
    sub = parser.add_subparsers(dest="command", required=True)
    _analyze_cmd.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_no_backbone_runs_for_any_job_or_the_report(lake, tmp_path, monkeypatch, capsys):
    import timm

    def boom(*a, **k):
        raise AssertionError("analyze must not create a model")

    monkeypatch.setattr(timm, "create_model", boom)
    assert _main(["analyze", "all", "--lake", str(lake), "--out", str(tmp_path / "a")]) == 0
    assert _main(["report", "--lake", str(lake), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    for job in ("maps", "norms", "size", "neighbours", "artifacts", "blocks"):
        assert f"{job}: " in out
    names = {p.name for p in (tmp_path / "a").iterdir()}
    for job in ("maps", "norms", "size", "neighbours", "artifacts", "blocks"):
        assert {f"{job}.parquet", f"{job}.csv"} <= names
    assert {"maps.png", "norms.png", "size.png", "neighbours.png", "artifacts.png",
            "blocks_same.png"} <= names
    assert (tmp_path / "r" / "report.html").exists() and (tmp_path / "r" / "report.md").exists()


def test_each_job_alone_with_runs_percentile_images(lake, tmp_path, capsys):
    assert _main(["analyze", "maps", "--lake", str(lake), "--runs", "same", "--out", str(tmp_path),
                  "--images", "img1.jpg", "--percentile", "0.95"]) == 0
    assert "maps.png" in capsys.readouterr().out
    assert _main(["analyze", "blocks", "--lake", str(lake), "--runs", "rnd", "--out", str(tmp_path)]) == 0
    assert "--blocks all" in capsys.readouterr().err


def test_default_out_is_lake_analysis(lake):
    assert _main(["analyze", "norms", "--lake", str(lake)]) == 0
    assert (lake / "analysis" / "norms.csv").exists()


def test_user_errors_exit_2(lake, tmp_path, capsys):
    assert _main(["analyze", "norms", "--lake", str(tmp_path / "none")]) == 2
    assert _main(["analyze", "norms", "--lake", str(lake), "--runs", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert _main(["analyze", "norms", "--lake", str(lake), "--percentile", "98"]) == 2
    assert _main(["analyze", "maps", "--lake", str(lake), "--images", "missing.jpg",
                  "--out", str(tmp_path)]) == 2
    assert _main(["report", "--lake", str(tmp_path / "none")]) == 2
