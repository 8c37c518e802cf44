"""Image classification from one token per image (paper Table 3).

The paper: "A linear classifier is trained on ImageNet-1K using 200,000 images containing at least
one outlier token. Per image, a [CLS], random normal, or random outlier token is selected.
Training uses cross-entropy loss, Adam, a cosine learning rate schedule, and early stopping
(patience = 3) based on validation accuracy." Images: labelled, >= 1 stored outlier and >= 1 stored
normal patch (probes/_imagefeats.py). With `test_run` (the model's validation-image run) the
probe trains on the training run, early-stops on a held-out part of it and is tested on the test
run's images, whose outliers are judged by the training run's threshold. Without it the training
run is split train/val/test by image and the result says it tested on the run's own images. The
three probes (cls / normal / outlier) share the same images and split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tokenlake.probes import _data
from tokenlake.probes import _imagefeats as feats
from tokenlake.probes._position import _choices
from tokenlake.probes._results import run_cached, torch_bytes
from tokenlake.probes._train import TrainOutcome, TrainSpec, apply_head, train_linear
from tokenlake.store import open_lake

DEFAULTS: dict[str, Any] = {
    "lrs": (1e-3, 3e-3, 1e-2),
    "batch_size": 256,
    "weight_decay": 0.0,
    "max_epochs": 30,
    "patience": 3,
    "val_fraction": 0.1,
    "test_fraction": 0.2,
    "standardize": True,
}
GROUPS = ("cls", "normal", "outlier")


def fit_image_classifier(
    x: np.ndarray, y: np.ndarray, parts: dict[str, np.ndarray], n_classes: int, spec: TrainSpec,
    *, dev: torch.device, seed: int, standardize: bool, desc: str, quiet: bool,
) -> tuple[TrainOutcome, np.ndarray, np.ndarray, np.ndarray]:
    """Train linear heads (lr grid) on rows parts['train'] of x, early-stop on parts['val'] top-1;
    returns (outcome, mu, sd, predicted labels of parts['test'])."""
    feats = _data.ArrayFeatures(x)
    if standardize:
        mu_np, sd_np = _data.standardizer(x[parts["train"]])
    else:
        mu_np, sd_np = np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
    mu, sd = torch.from_numpy(mu_np).to(dev), torch.from_numpy(sd_np).to(dev)
    y_t = torch.from_numpy(y).to(dev)
    mk = {"batch_size": spec.batch_size, "device": dev, "mu": mu, "sd": sd,
              "targets": lambda b, _p: (y_t[torch.from_numpy(b).to(dev)],)}
    outcome = train_linear(
        in_dim=x.shape[1], out_dim=n_classes, spec=spec,
        train_batches=lambda e: _data.torch_batches(
            feats, parts["train"], shuffle=True, rng=_data.epoch_rng(seed, e), **mk),
        steps_per_epoch=-(-parts["train"].size // spec.batch_size),
        val_batches=lambda: _data.torch_batches(feats, parts["val"], **mk),
        loss_fn=lambda o, b: F.cross_entropy(o, b[1]),
        val_fn=lambda o, b: (float((o.argmax(1) == b[1]).sum()), float(b[1].numel())),
        higher_is_better=True, device=dev, seed=seed, desc=desc, quiet=quiet,
    )
    pred = apply_head(outcome.head.to(dev), _data.torch_batches(feats, parts["test"], **mk),
                      lambda o, b: o.argmax(1).cpu().numpy())
    pred = np.concatenate(pred) if pred else np.zeros(0, np.int64)
    return outcome, mu_np, sd_np, pred


def _config(lk, run: str, info: _data.RunInfo, test_run: str | None, tokens: str, seed: int,
            spec: TrainSpec, hp: dict[str, Any]) -> dict[str, Any]:
    tfp = _data.run_info(lk, info.threshold_run).fingerprint if info.threshold_run != run else ""
    val = hp["val_fraction"]
    split = ({"train": round(1 - val, 6), "val": val, "test": "test run", "by": "image"}
             if test_run else
             {"train": round(1 - val - hp["test_fraction"], 6), "val": val,
              "test": hp["test_fraction"], "by": "image"})
    return {
        "run": run, "run_fingerprint": info.fingerprint, "threshold_run": info.threshold_run,
        "threshold_run_fingerprint": tfp, "test_run": test_run,
        "test_run_fingerprint": _data.run_info(lk, test_run).fingerprint if test_run else None,
        "tokens": tokens, "seed": seed, "train": spec.to_dict(), "split": split,
        "standardize": hp["standardize"],
    }


def classify(
    lake: str | Path, run: str, *, test_run: str | None = None, tokens: str = "post",
    device: str | None = None, force: bool = False, seed: int = _data.DEFAULT_SEED,
    quiet: bool = False, **hp: Any,
) -> dict[str, Any]:
    """Train (or reuse) the three one-token image classifiers of `run` (cls / normal / outlier).

    test_run: a run of the same model over other images (the validation images): trained on `run`
    (val_fraction of it held out for early stopping), tested on every eligible image of test_run.
    None: `run` split train/val/test by image. tokens: "post" (output tokens, default) | "pre".
    """
    if test_run is not None and "test_fraction" in hp:
        raise _data.ProbeError("test_fraction does not apply with test_run: the test images are "
                               "the test run's")
    hp = _data.merge_hp("classify", DEFAULTS, hp)
    lk = open_lake(lake)
    info = _data.run_info(lk, run)
    _data.check_tokens(lk, run, tokens)
    if test_run is not None:
        feats.check_test_run(lk, run, test_run)
        _data.check_tokens(lk, test_run, tokens)
    spec = TrainSpec("adam", tuple(hp["lrs"]), hp["weight_decay"], hp["batch_size"],
                     hp["max_epochs"], hp["patience"])
    config = _config(lk, run, info, test_run, tokens, seed, spec, hp)
    dev = _data.resolve_device(device)

    def side(r: str, rng_key: int):
        """(images, labels, features, cls source) of run r, outliers by the training rule."""
        idx = _data.patch_index(lk, r, threshold_run=info.threshold_run)
        images, y = feats.eligible_images(lk, r, idx)
        if images.size < (1 if r == test_run else 3):
            raise _data.ProbeError(
                f"run {r!r}: only {images.size} labelled image(s) with both a stored outlier and "
                "a stored normal patch; classify needs more")
        x, source = feats.image_features(lk, r, _data.run_info(lk, r), idx, images,
                                         tokens=tokens, rng=np.random.default_rng([seed, rng_key]))
        return images, y, x, source

    def compute():
        images, y, x, cls_source = side(run, 0xC1A5)
        s = config["split"]
        if test_run is None:
            sp = _data.split_images(images, seed, (s["train"], s["val"], s["test"]))
            parts = {k: np.searchsorted(images, v) for k, v in sp.items()}
            tested_run, tested_ids, held_out = run, sp["test"], "split of the training run"
        else:
            sp = _data.split_train_val(images, seed, s["val"])
            t_images, t_y, t_x, _ = side(test_run, 0x7E57)
            parts = {k: np.searchsorted(images, v) for k, v in sp.items()}
            parts["test"] = np.arange(images.size, images.size + t_images.size)
            x = {g: np.concatenate([x[g], t_x[g]]) for g in x}
            y = np.concatenate([y, t_y])
            tested_run, tested_ids, held_out = test_run, t_images, "test run"
        n_classes = int(y.max()) + 1
        yt = y[parts["test"]]
        metrics: dict[str, dict[str, float]] = {}
        choices: dict[str, Any] = {}
        weights: dict[str, Any] = {}
        for g in GROUPS:
            outcome, mu, sd, pred = fit_image_classifier(
                x[g], y, parts, n_classes, spec, dev=dev, seed=seed,
                standardize=hp["standardize"], desc=f"classify {g} {run}", quiet=quiet)
            metrics[g] = {"top1": float(100.0 * np.mean(pred == yt)), "n": float(yt.size)}
            choices[g] = _choices(outcome, spec, dev, True)
            weights[g] = {"weight": outcome.head.weight.detach().cpu(),
                          "bias": outcome.head.bias.detach().cpu(),
                          "mu": torch.from_numpy(mu), "sd": torch.from_numpy(sd)}
        majority = np.bincount(y[parts["train"]], minlength=n_classes).argmax()
        metrics["baseline"] = {"chance_top1": 100.0 / n_classes,
                               "majority_top1": float(100.0 * np.mean(yt == majority)),
                               "n_classes": float(n_classes)}
        listing, digest = feats.listing(lk, tested_run, tested_ids)
        result = {
            "metrics": metrics,
            "choices": {
                "per_group": choices, "cls_source": cls_source,
                "embeddings": _data.TOKENS_MEANING[tokens],
                "images": {k: int(v.size) for k, v in parts.items()},
                "images_eligible": int(images.size),
                "test": feats.tested(tested_run, tested_ids, held_out, digest),
                "outliers": {"threshold_run": info.threshold_run,
                             "threshold": _data.threshold_of(lk, info.threshold_run),
                             "rule": "pre-final-norm norm > the threshold run's 98th percentile "
                                     "of patch norms (training and test images alike)"},
                "token_pick": "uniform per image, numpy default_rng([seed, 0xC1A5]) (test run: "
                              "[seed, 0x7E57])"},
        }
        return result, {"weights.pt": torch_bytes(weights), "test_images.parquet": listing}

    return run_cached(lake, run, "classify", config, compute, force=force)
