"""Beyond the paper: the register-era families extract on the CPU and get an outlier card each,
and experiments/beyond.toml plans them at their native resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenlake.cli import _experiments
from tokenlake.cli.main import main
from tokenlake.extract import family_of, resolve_model
from tokenlake.extract._models import meta_backbone
from tokenlake.store import open_lake

BEYOND = Path(__file__).resolve().parents[1] / "experiments" / "beyond.toml"
# the smallest of each family in timm, at a few patches' size (random weights, CPU)
SMALLEST = {"dinov3_s": (48, "eva"), "eva02_s": (42, "eva"), "radio_b": (48, "vit"),
            "siglip_v2_b": (48, "siglip"), "aimv2_l": (42, "vit")}


def test_beyond_plans_every_family_at_its_native_resolution(capsys):
    exp = _experiments.load(BEYOND)
    names = {r.name() for r in exp.runs}
    fams = set()
    for run in exp.runs:
        spec = resolve_model(run.model)
        assert run.img_size is None and run.subset in ("val5k", "val500"), run.name()
        fams.add(family_of(meta_backbone(spec, spec.img_size)).name)
        if not run.record_mlp:  # per-block norms: the card's emergence block
            assert run.blocks == "all", run.name()
        if run.test_time_registers:
            assert run.test_time_registers.rpartition(":")[0] in names
    assert fams == {"eva", "vit", "siglip"}
    assert {m.split("_")[0] for m in (r.model for r in exp.runs)} >= {
        "dinov3", "eva02", "radio", "siglip", "aimv2"}
    _experiments.print_plan(exp, None)
    assert "GPU-hours" in capsys.readouterr().out


@pytest.fixture(scope="module")
def lake(tmp_path_factory, image_helpers):
    imgs = tmp_path_factory.mktemp("imgs")
    image_helpers.write_flat_folder(imgs, n=3)
    path = tmp_path_factory.mktemp("lake")
    assert main(["subset", "--lake", str(path), "--name", "few", "--data", str(imgs)]) == 0
    for alias, (px, _) in SMALLEST.items():
        assert main(["extract", "--lake", str(path), "--model", alias, "--subset", "few",
                     "--img-size", str(px), "--weights", "random", "--blocks", "all",
                     "--decode-workers", "0", "--quiet", "--run", alias]) == 0
    return path


def test_every_family_extracts_and_gets_a_card(lake, capsys):
    db = open_lake(lake)
    for alias, (_, fam) in SMALLEST.items():
        m = db.manifest(alias)
        assert m["token_layout"]["family"] == fam and m["random_weights"], alias
        assert db.validate(alias) == []
    capsys.readouterr()
    assert main(["cards", "--lake", str(lake), "--format", "json"]) == 0
    cards = {c["run"]: c for c in json.loads(capsys.readouterr().out)}
    assert set(cards) == set(SMALLEST)
    for alias, card in cards.items():
        assert card["random_weights"] is True
        assert card["threshold"] > 0 and card["n_blocks"] == db.manifest(alias)[
            "token_layout"]["depth"], alias
    assert main(["cards", "--lake", str(lake)]) == 0
    table = capsys.readouterr().out
    assert all(alias in table for alias in SMALLEST) and "RANDOM" in table
