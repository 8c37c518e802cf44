"""Image classification from one token per image (paper Table 3).

Images: those of the run with a label, >= 1 stored outlier patch and >= 1 stored normal patch
(the paper trains on images with >= 1 outlier). Per image one feature: the CLS token's stored
pre-final-norm embedding (runs without a cls token - Swin/PVT - or without a stored CLS embedding:
the image array cls_post, i.e. the average-pooled token), a seeded random normal patch, or a
seeded random outlier patch. The three probes share the same train/val/test images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tokenlake.probes import _data
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


def _pick(image_id: np.ndarray, mask: np.ndarray, images: np.ndarray, rng) -> np.ndarray:
    """Index (into the patch index) of one uniformly drawn token per image among `mask` tokens."""
    cand = np.flatnonzero(mask)
    ids = image_id[cand]  # sorted by image_id already (SQL ORDER BY)
    starts = np.searchsorted(ids, images, side="left")
    ends = np.searchsorted(ids, images, side="right")
    counts = ends - starts
    if (counts == 0).any():
        raise AssertionError("image without candidates")  # filtered before
    return cand[starts + (rng.random(images.size) * counts).astype(np.int64)]


def classify(
    lake: str | Path, run: str, *, device: str | None = None, force: bool = False, seed: int = 0,
    quiet: bool = False, **hp: Any,
) -> dict[str, Any]:
    """Train (or reuse) the three one-token image classifiers of `run` (cls / normal / outlier)."""
    hp = _data.merge_hp("classify", DEFAULTS, hp)
    lk = open_lake(lake)
    info = _data.run_info(lk, run)
    tfp = _data.run_info(lk, info.threshold_run).fingerprint if info.threshold_run != run else ""
    spec = TrainSpec("adam", tuple(hp["lrs"]), hp["weight_decay"], hp["batch_size"],
                     hp["max_epochs"], hp["patience"])
    config = {
        "run": run, "run_fingerprint": info.fingerprint, "threshold_run": info.threshold_run,
        "threshold_run_fingerprint": tfp, "seed": seed, "train": spec.to_dict(),
        "split": {"train": round(1 - hp["val_fraction"] - hp["test_fraction"], 6),
                  "val": hp["val_fraction"], "test": hp["test_fraction"], "by": "image"},
        "standardize": hp["standardize"],
    }
    dev = _data.resolve_device(device)

    def compute():
        img_ids, labels = _data.image_labels(lk, run)
        idx = _data.patch_index(lk, run)
        has_out = np.unique(idx["image_id"][idx["outlier"]])
        has_norm = np.unique(idx["image_id"][~idx["outlier"]])
        images = np.intersect1d(np.intersect1d(has_out, has_norm), img_ids)
        if images.size < 3:
            raise _data.ProbeError(
                f"run {run!r}: only {images.size} labelled image(s) with both a stored outlier and "
                "a stored normal patch; classify needs more"
            )
        y_all = labels[np.searchsorted(img_ids, images)]
        n_classes = int(labels.max()) + 1
        rng = np.random.default_rng([seed, 0xC1A5])
        pick = {"outlier": _pick(idx["image_id"], idx["outlier"], images, rng),
                "normal": _pick(idx["image_id"], ~idx["outlier"], images, rng)}
        x = {g: lk.gather(run, idx["slot"][p]).astype(np.float32) for g, p in pick.items()}
        cls = lk.sql(
            "SELECT image_id, slot FROM tokens WHERE run = ? AND kind = 'cls' AND slot IS NOT NULL "
            "ORDER BY image_id, token", params=[run])
        cls_ids = cls.column("image_id").to_numpy()
        if cls.num_rows and np.isin(images, cls_ids).all():
            first = np.searchsorted(cls_ids, images)
            x["cls"] = lk.gather(run, cls.column("slot").to_numpy()[first]).astype(np.float32)
            cls_source = "tokens (CLS embedding before the final norm)"
        elif "cls_post" in info.arrays:
            x["cls"] = lk.image_array(run, "cls_post", images).astype(np.float32)
            cls_source = "cls_post (after the final norm; average-pooled token for Swin/PVT)"
        else:
            raise _data.ProbeError(f"run {run!r} has neither stored CLS embeddings nor cls_post")
        s = config["split"]
        sp = _data.split_images(images, seed, (s["train"], s["val"], s["test"]))
        parts = {k: np.searchsorted(images, v) for k, v in sp.items()}
        metrics: dict[str, dict[str, float]] = {}
        choices: dict[str, Any] = {}
        weights: dict[str, Any] = {}
        for g in GROUPS:
            outcome, mu, sd, pred = fit_image_classifier(
                x[g], y_all, parts, n_classes, spec, dev=dev, seed=seed,
                standardize=hp["standardize"], desc=f"classify {g} {run}", quiet=quiet)
            yt = y_all[parts["test"]]
            metrics[g] = {"top1": float(100.0 * np.mean(pred == yt)), "n": float(yt.size)}
            choices[g] = _choices(outcome, spec, dev, True)
            weights[g] = {"weight": outcome.head.weight.detach().cpu(),
                          "bias": outcome.head.bias.detach().cpu(),
                          "mu": torch.from_numpy(mu), "sd": torch.from_numpy(sd)}
        ytr = y_all[parts["train"]]
        majority = np.bincount(ytr, minlength=n_classes).argmax()
        metrics["baseline"] = {
            "chance_top1": 100.0 / n_classes,
            "majority_top1": float(100.0 * np.mean(y_all[parts["test"]] == majority)),
            "n_classes": float(n_classes),
        }
        result = {
            "metrics": metrics,
            "choices": {"per_group": choices, "cls_source": cls_source,
                        "images": {k: int(v.size) for k, v in sp.items()},
                        "images_eligible": int(images.size),
                        "token_pick": "uniform per image, numpy default_rng([seed, 0xC1A5])"},
        }
        return result, {"weights.pt": torch_bytes(weights)}

    return run_cached(lake, run, "classify", config, compute, force=force)
