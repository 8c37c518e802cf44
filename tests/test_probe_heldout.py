"""Table 3 tested on validation images: classify(run, test_run=...) (tokenlake.probes)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tokenlake import probes
from tokenlake.cli import _experiments, _probe_cmd
from tokenlake.probes import ProbeError
from tokenlake.store import open_lake
from tokenlake.store.testing import probe_run

PAPER = Path(__file__).resolve().parents[1] / "experiments" / "paper.toml"


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    """One planted "model" (seed 0) over training images and over validation images. The
    validation run's own threshold comes from a run whose norms are 10x lower, so by its own
    rule every patch is an outlier; by the training run's rule only the planted ones are."""
    path = tmp_path_factory.mktemp("heldout")
    model = {"seed": 0, "grid": 8, "n_classes": 4}
    probe_run(n_images=20, image_seed=9, norm_scale=0.1, source_prefix="x/",
              **model).write(path, "lowref")
    probe_run(n_images=300, image_seed=1, source_prefix="train/", **model).write(path, "train")
    truth = probe_run(n_images=120, image_seed=2, source_prefix="val/",
                      manifest_extra={"outlier_ref": "lowref"}, **model).write(path, "val").truth
    probe_run(n_images=40, image_seed=3, source_prefix="train/", **model).write(path, "seen")
    probe_run(n_images=40, image_seed=4, source_prefix="o/",
              manifest_extra={"weights_sha256": "f" * 64}, **model).write(path, "other")
    return path, truth


def test_trains_on_the_training_run_and_tests_on_the_test_run(lake):
    path, truth = lake
    db = open_lake(path)
    own = db.sql("SELECT count(*) FROM outliers WHERE run = 'val'").column(0)[0].as_py()
    assert own == 120 * 64  # by its own threshold every patch is an outlier: nothing to test
    r = probes.classify(path, "train", test_run="val", quiet=True)
    n_test = int(truth["outlier"].any(1).sum())  # images with a planted outlier
    assert r["config"]["test_run"] == "val" and r["config"]["split"]["test"] == "test run"
    assert r["choices"]["test"]["run"] == "val"
    assert r["choices"]["test"]["held_out"] == "test run"
    assert r["choices"]["test"]["n_images"] == n_test == r["metrics"]["outlier"]["n"]
    assert r["choices"]["outliers"]["threshold_run"] == "train"
    assert r["choices"]["outliers"]["threshold"] == pytest.approx(10.0)
    listed = pq.read_table(Path(r["path"]) / "test_images.parquet").to_pydict()
    assert len(listed["source_id"]) == n_test and all(s.startswith("val/")
                                                      for s in listed["source_id"])
    assert listed["label"] == [int(v) for v in truth["label"][truth["outlier"].any(1)]]
    # the planted class signal of the training run's outliers carries over to unseen images
    m = r["metrics"]
    assert m["outlier"]["top1"] > 85.0
    assert m["normal"]["top1"] < 50.0 and m["cls"]["top1"] < 50.0
    assert r["choices"]["images"]["train"] + r["choices"]["images"]["val"] == r["choices"][
        "images_eligible"]


def test_without_a_test_run_it_says_it_tested_the_training_images(lake):
    r = probes.classify(lake[0], "train", quiet=True, max_epochs=3)
    t = r["choices"]["test"]
    assert r["config"]["test_run"] is None
    assert t["run"] == "train" and t["held_out"] == "split of the training run"
    assert t["n_images"] == r["choices"]["images"]["test"] == r["metrics"]["cls"]["n"]
    listed = pq.read_table(Path(r["path"]) / "test_images.parquet").column("source_id")
    assert len(listed) == t["n_images"] and all(s.startswith("train/") for s in listed.to_pylist())


def test_refuses_a_test_run_of_another_model_or_with_seen_images(lake):
    path = lake[0]
    with pytest.raises(ProbeError, match=r"not of the model.*weights_sha256"):
        probes.classify(path, "train", test_run="other", quiet=True)
    with pytest.raises(ProbeError, match=r"shares 40 image\(s\).*source_id"):
        probes.classify(path, "train", test_run="seen", quiet=True)
    with pytest.raises(ProbeError, match="is the training run"):
        probes.classify(path, "train", test_run="train", quiet=True)
    with pytest.raises(ProbeError, match="test_fraction does not apply"):
        probes.classify(path, "train", test_run="val", test_fraction=0.3, quiet=True)


def test_cli_test_run(lake, capsys):
    rc = _probe_cmd.main(["probe", "classify", "--lake", str(lake[0]), "--run", "train",
                          "--test-run", "val", "--quiet", "--max-epochs", "2", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["config"]["test_run"] == "val" and res["choices"]["test"]["run"] == "val"
    assert _probe_cmd.main(["probe", "classify", "--lake", str(lake[0]), "--run", "train",
                            "--test-run", "seen", "--quiet"]) == 2
    assert "shares 40 image(s)" in capsys.readouterr().err


def test_paper_classify_probes_test_on_the_models_validation_run():
    """Each Table-3 entry of experiments/paper.toml names a test run of the same model and
    resolution over validation images; every probe entry is a valid `tokenlake probe` line."""
    exp = _experiments.load(PAPER)
    runs = {r.name(): r for r in exp.runs}
    parser = argparse.ArgumentParser()
    _probe_cmd.register(parser.add_subparsers(dest="command"))
    classify = [e for e in exp.probes if e["name"] == "classify"]
    assert len(classify) == 6
    for e in exp.probes:
        argv = ["probe", e["name"], "--lake", "L"] + [
            a for k, v in e.items() if k != "name" for a in (f"--{k.replace('_', '-')}", str(v))]
        parser.parse_args(argv)  # SystemExit on an option the CLI does not know
        for k in ("run", "train_run", "test_run"):
            assert e.get(k, e["run"]) in runs, shlex.join(argv)
    for e in classify:
        train, test = runs[e["run"]], runs[e["test_run"]]
        assert (test.model, test.img_size, test.weights, test.preprocess) == (
            train.model, train.img_size, train.weights, train.preprocess)
        assert exp.subsets[test.subset]["split"] == "validation"
        assert exp.subsets[train.subset]["split"] == "train"
        assert train.outlier_ref == e["test_run"]  # one threshold for both
        assert test.policy in ("all", "sample")  # patch embeddings stored
