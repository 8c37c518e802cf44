"""Probe behaviour: determinism, reuse, force, atomic results, clear errors, heads, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tokenlake import probes
from tokenlake.cli import _probe_cmd
from tokenlake.probes import ProbeError
from tokenlake.probes._synthetic import planted_run
from tokenlake.store import open_lake

SMALL = {"max_epochs": 4, "lrs": (1e-2,)}


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe_behaviour")
    planted_run(path, "small", n_images=60, grid=4, seed=5)
    return path


def test_deterministic_numbers(lake):
    a = probes.position(lake, "small", quiet=True, seed=7, **SMALL)
    b = probes.position(lake, "small", quiet=True, seed=7, force=True, **SMALL)
    assert b["reused"] is False
    assert a["metrics"] == b["metrics"]
    assert a["history"] == b["history"]
    wa = torch.load(f"{a['path']}/weights.pt", weights_only=True)
    assert torch.equal(wa["weight"], torch.load(f"{b['path']}/weights.pt", weights_only=True)["weight"])
    c = probes.classify(lake, "small", quiet=True, seed=7, **SMALL)
    d = probes.classify(lake, "small", quiet=True, seed=7, force=True, **SMALL)
    assert c["metrics"] == d["metrics"]


def test_reuse_and_force(lake, monkeypatch):
    first = probes.reconstruct(lake, "small", quiet=True, seed=1, **SMALL)
    assert first["reused"] is False
    from tokenlake.probes import _train

    calls = []
    real = _train.train_linear
    monkeypatch.setattr("tokenlake.probes._reconstruct.train_linear",
                        lambda **kw: calls.append(1) or real(**kw))
    again = probes.reconstruct(lake, "small", quiet=True, seed=1, **SMALL)
    assert again["reused"] is True and calls == []
    assert again["created"] == first["created"] and again["metrics"] == first["metrics"]
    forced = probes.reconstruct(lake, "small", quiet=True, seed=1, force=True, **SMALL)
    assert forced["reused"] is False and calls == [1]
    assert forced["created"] != first["created"]
    other = probes.reconstruct(lake, "small", quiet=True, seed=2, **SMALL)
    assert other["config_hash"] != first["config_hash"]
    d = open_lake(lake).path / "probes" / "small"
    assert {p.name for p in (d / f"reconstruct-{first['config_hash']}").iterdir()} >= {
        "result.json", "config.json", "weights.pt", "result.parquet"}
    cfg = json.loads((d / f"reconstruct-{first['config_hash']}" / "config.json").read_text())
    assert cfg["train"]["optimizer"] == "adamw" and cfg["split"]["by"] == "image"


def test_killed_probe_leaves_nothing_visible(lake, monkeypatch):
    def boom(**kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("tokenlake.probes._position.train_linear", boom)
    with pytest.raises(KeyboardInterrupt):
        probes.position(lake, "small", quiet=True, seed=99, **SMALL)
    n = open_lake(lake).sql(
        "SELECT count(*) FROM probe_results WHERE probe = 'position' AND run = 'small'")
    before = n.column(0)[0].as_py()
    monkeypatch.undo()
    r = probes.position(lake, "small", quiet=True, seed=99, **SMALL)
    assert r["reused"] is False
    after = open_lake(lake).sql(
        "SELECT count(*) FROM probe_results WHERE probe = 'position' AND run = 'small'")
    assert after.column(0)[0].as_py() > before
    assert not list((open_lake(lake).path / "probes").glob(".staging/*/*"))


def test_error_without_embeddings(tmp_path):
    planted_run(tmp_path, "summary", n_images=20, store_patches=False)
    with pytest.raises(ProbeError, match="stores no patch-token embeddings"):
        probes.position(tmp_path, "summary", quiet=True)
    assert _probe_cmd.main(["probe", "reconstruct", "--lake", str(tmp_path), "--run", "summary",
                            "--quiet"]) == 2


def test_error_without_outliers(tmp_path):
    planted_run(tmp_path, "flat", n_images=20, all_outlier_free=True)
    with pytest.raises(ProbeError, match="no usable outlier"):
        probes.classify(tmp_path, "flat", quiet=True)


def test_error_without_labels(tmp_path):
    planted_run(tmp_path, "nolabel", n_images=20, labels=False)
    with pytest.raises(ProbeError, match="no image labels"):
        probes.classify(tmp_path, "nolabel", quiet=True)


def test_registers_needs_registers(lake):
    with pytest.raises(ProbeError, match="registers_post"):
        probes.registers(lake, "small", quiet=True)


def test_heads_matches_plain_torch(tmp_path):
    info = planted_run(tmp_path, "val", n_images=200, n_classes=10, seed=11)
    lk = open_lake(tmp_path)
    ids = np.arange(200)
    cls = torch.from_numpy(lk.image_array("val", "cls_post", ids))
    pm = torch.from_numpy(lk.image_array("val", "patch_mean_post", ids))
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(2 * cls.shape[1], 10)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g))
        head.bias.copy_(torch.randn(10, generator=g))
    path = tmp_path / "dinov2_vits14_linear_head.pth"
    torch.save(head.state_dict(), path)
    with torch.no_grad():
        pred = head(torch.cat([cls, pm], 1)).argmax(1).numpy()
    expected = 100.0 * float(np.mean(pred == info["label"]))
    r = probes.heads(tmp_path, "val", path, quiet=True)
    assert r["metrics"]["image"]["top1"] == pytest.approx(expected, abs=1e-9)
    assert r["metrics"]["image"]["n"] == 200
    bad = tmp_path / "bad.pth"
    torch.save(torch.nn.Linear(5, 10).state_dict(), bad)
    with pytest.raises(ProbeError, match="head expects"):
        probes.heads(tmp_path, "val", bad, quiet=True)


def test_cli_probe(lake, capsys):
    rc = _probe_cmd.main(["probe", "position", "--lake", str(lake), "--run", "small", "--quiet",
                          "--max-epochs", "3", "--lrs", "0.01,0.03", "--seed", "4"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "position small" in out and "normal" in out and "outlier" in out
    rc = _probe_cmd.main(["probe", "position", "--lake", str(lake), "--run", "small", "--quiet",
                          "--max-epochs", "3", "--lrs", "0.01,0.03", "--seed", "4", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert res["reused"] is True and res["config"]["train"]["lrs"] == [0.01, 0.03]
    assert _probe_cmd.main(["probe", "registers", "--lake", str(lake), "--run", "small",
                            "--patience", "2"]) == 2
