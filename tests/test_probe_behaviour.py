"""Probe behaviour: determinism, reuse, force, atomic results, clear errors, heads, CLI."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch

from tokenlake import probes
from tokenlake.cli import _probe_cmd
from tokenlake.probes import ProbeError
from tokenlake.store import LakeError, open_lake
from tokenlake.store.testing import probe_run

SMALL = {"max_epochs": 4, "lrs": (1e-2,)}


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe_behaviour")
    probe_run(n_images=60, grid=4, seed=5).write(path, "small")
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
    probe_run(n_images=20, store="prefix").write(tmp_path, "summary")
    with pytest.raises(ProbeError, match="stores no patch-token embeddings"):
        probes.position(tmp_path, "summary", quiet=True)
    assert _probe_cmd.main(["probe", "reconstruct", "--lake", str(tmp_path), "--run", "summary",
                            "--quiet"]) == 2


def test_error_without_outliers(tmp_path):
    probe_run(n_images=20, p_outlier=0.0).write(tmp_path, "flat")
    with pytest.raises(ProbeError, match="no usable outlier"):
        probes.classify(tmp_path, "flat", quiet=True)


def test_error_without_labels(tmp_path):
    probe_run(n_images=20, labels=False).write(tmp_path, "nolabel")
    with pytest.raises(ProbeError, match="no image labels"):
        probes.classify(tmp_path, "nolabel", quiet=True)


def test_registers_needs_registers(lake):
    with pytest.raises(ProbeError, match="registers_post"):
        probes.registers(lake, "small", quiet=True)


def test_heads_matches_plain_torch(tmp_path):
    info = probe_run(n_images=200, n_classes=10, seed=11).write(tmp_path, "val").truth
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


def test_seed_defaults_to_42(lake, capsys):
    """The paper: "All experiments use a random seed of 42" - Python API and CLI alike."""
    for name in probes.PROBES:
        assert inspect.signature(getattr(probes, name)).parameters["seed"].default == 42, name
    r = probes.position(lake, "small", quiet=True, **SMALL)
    assert r["config"]["seed"] == 42
    rc = _probe_cmd.main(["probe", "position", "--lake", str(lake), "--run", "small", "--quiet",
                          "--max-epochs", "4", "--lrs", "0.01", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["reused"] is True and res["config_hash"] == r["config_hash"]


def test_tokens_recorded(lake, tmp_path):
    """Every probe's config says which embeddings it read: "post" by default, "pre" on request;
    heads and registers read post-norm image arrays and say "post"."""
    for fn in (probes.position, probes.reconstruct, probes.classify):
        post = fn(lake, "small", quiet=True, **SMALL)
        pre = fn(lake, "small", quiet=True, tokens="pre", **SMALL)
        assert post["config"]["tokens"] == "post" and pre["config"]["tokens"] == "pre"
        assert post["config_hash"] != pre["config_hash"]
        assert "output tokens" in json.dumps(post["choices"])
    sw = probes.sweep(lake, "small", quiet=True, tokens="pre", tops=(50.0,), **SMALL)
    assert sw["config"]["tokens"] == "pre"
    with pytest.raises(ProbeError, match="tokens must be one of"):
        probes.position(lake, "small", quiet=True, tokens="output", **SMALL)
    probe_run(n_images=40, grid=4, n_reg=2, seed=2).write(tmp_path, "reg")
    head = tmp_path / "head.pth"
    torch.save(torch.nn.Linear(32, 4).state_dict(), head)
    assert probes.heads(tmp_path, "reg", head, quiet=True)["config"]["tokens"] == "post"
    r = probes.registers(tmp_path, "reg", quiet=True, max_epochs=2, lrs=(0.01,))
    assert r["config"]["tokens"] == "post"


def test_post_tokens_of_a_run_without_final_norm(tmp_path, capsys):
    """A run written before final norms were saved: tokens='post' is the store's error (naming
    the re-extraction), never a silent fallback; tokens='pre' still works."""
    probe_run(n_images=30, grid=4, final_norm=None).write(tmp_path, "old")
    for fn in (probes.position, probes.reconstruct, probes.classify, probes.sweep):
        with pytest.raises(LakeError, match=r"no saved final-norm.*tokenlake extract"):
            fn(tmp_path, "old", quiet=True, **SMALL)
    assert probes.position(tmp_path, "old", quiet=True, tokens="pre", **SMALL)["metrics"]
    assert _probe_cmd.main(["probe", "classify", "--lake", str(tmp_path), "--run", "old",
                            "--quiet"]) == 2
    assert "no saved final-norm" in capsys.readouterr().err


def test_cli_options_belong_to_their_probes(lake, capsys):
    base = ["--lake", str(lake), "--run", "small", "--quiet"]
    for argv in (["heads", *base, "--head", "x.pth", "--tokens", "pre"],
                 ["position", *base, "--test-run", "other"],
                 ["position", *base, "--target", "centred"],
                 ["classify", *base, "--train-run", "other"]):
        assert _probe_cmd.main(["probe", *argv]) == 2
        assert "does not apply to probe" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _probe_cmd.main(["probe", "position", *base, "--tokens", "output"])
    rc = _probe_cmd.main(["probe", "reconstruct", *base, "--tokens", "pre", "--target", "centred",
                          "--max-epochs", "2", "--lrs", "0.01", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["config"]["tokens"] == "pre" and res["config"]["target"] == "centred"


def test_patch_index_flags_are_the_outliers_view(tmp_path):
    """Only stored tokens are read (a 200k 'sample' run has ~270M patch rows); their flag is the
    `outliers` view's, also for a run whose threshold comes from another run."""
    from tokenlake.probes import _data

    probe_run(n_images=30, grid=8, norm_scale=0.5, seed=3).write(tmp_path, "ref")  # threshold 5
    probe_run(n_images=30, grid=4, unstored=0.5, seed=4,
              manifest_extra={"outlier_ref": "ref"}).write(tmp_path, "s")
    db = open_lake(tmp_path)
    for run in ("ref", "s"):
        idx = _data.patch_index(db, run, need_outliers=False)
        view = db.sql("SELECT image_id, token, slot FROM outliers WHERE run = ? "
                      "AND slot IS NOT NULL ORDER BY image_id, token", params=[run]).to_pydict()
        flagged = idx["outlier"]
        assert idx["image_id"][flagged].tolist() == view["image_id"]
        assert idx["slot"][flagged].tolist() == view["slot"]
        n = db.sql("SELECT count(*) FILTER (WHERE slot IS NULL), count(*) FILTER (WHERE slot IS "
                   "NOT NULL) FROM tokens WHERE run = ? AND kind = 'patch'", params=[run]).to_pylist()[0]
        assert list(n.values()) == [idx["n_without_slot"], idx["slot"].size]
    assert idx["n_without_slot"] > 0 and idx["outlier"].all()  # 10 > ref's threshold 5


def test_cli_choices_are_the_probes():
    from tokenlake.probes import _cells, _data

    assert _probe_cmd.TOKENS == _data.TOKENS and _probe_cmd.TARGETS == _cells.TARGETS
    assert _probe_cmd.DEFAULT_SEED == _data.DEFAULT_SEED == 42
