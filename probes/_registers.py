"""Linear heads with and without registers (paper Table 5).

The paper: "CLS + Patch Mean: Concatenation of the [CLS] token and the mean of the output patch
tokens. CLS + Patch Mean + Registers [...] Patch Mean + Registers [...] These linear models are
trained for 20 epochs using SGD with a cosine learning rate scheduler, and we report top-1
accuracy on the validation set."

Three representations of each image, all after the final norm: cls_pm = cls_post || patch_mean_post,
cls_pm_reg = cls_pm || registers_post (flattened), pm_reg = patch_mean_post || registers_post.
SGD (momentum 0.9), cosine, 20 epochs, lr grid; each head keeps its best-validation epoch.
Train/val come from `train_run` (split 90/10 by image) when given, else from `run` (split by image);
test top-1 is on `run`'s held-out (or, with train_run, all) labelled images. The pretrained head,
if given, is evaluated on the same test images.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenlake.probes import _data
from tokenlake.probes._classify import fit_image_classifier
from tokenlake.probes._heads import head_features, head_top1, load_head
from tokenlake.probes._position import _choices
from tokenlake.probes._results import run_cached, torch_bytes
from tokenlake.probes._train import TrainSpec
from tokenlake.store import open_lake

DEFAULTS: dict[str, Any] = {
    "lrs": (1e-3, 1e-2, 1e-1),
    "batch_size": 256,
    "weight_decay": 0.0,
    "max_epochs": 20,
    "momentum": 0.9,
    "val_fraction": 0.1,
    "test_fraction": 0.2,
    "standardize": True,
}
REPRESENTATIONS = {
    "cls_pm": ("cls_post", "patch_mean_post"),
    "cls_pm_reg": ("cls_post", "patch_mean_post", "registers_post"),
    "pm_reg": ("patch_mean_post", "registers_post"),
}


def registers(
    lake: str | Path, run: str, *, head: str | Path | None = None, train_run: str | None = None,
    device: str | None = None, force: bool = False, seed: int = _data.DEFAULT_SEED,
    quiet: bool = False,
    **hp: Any,
) -> dict[str, Any]:
    """Train (or reuse) the three Table-5 heads of `run`."""
    hp = _data.merge_hp("registers", DEFAULTS, hp)
    lk = open_lake(lake)
    info = _data.run_info(lk, run)
    for r in {run, train_run} - {None}:
        miss = {"cls_post", "patch_mean_post", "registers_post"} - _data.run_info(lk, r).arrays
        if miss:
            raise _data.ProbeError(f"run {r!r} lacks image array(s) {sorted(miss)} "
                                   "(registers needs a model with registers)")
    spec = TrainSpec("sgd", tuple(hp["lrs"]), hp["weight_decay"], hp["batch_size"],
                     hp["max_epochs"], None, hp["momentum"])
    head_sha = hashlib.sha256(Path(head).read_bytes()).hexdigest() if head else None
    config = {
        "run": run, "run_fingerprint": info.fingerprint, "train_run": train_run,
        "train_run_fingerprint": _data.run_info(lk, train_run).fingerprint if train_run else None,
        "seed": seed, "tokens": "post",  # cls_post, patch_mean_post, registers_post: output
        "train": spec.to_dict(),
        "split": ({"train": round(1 - hp["val_fraction"], 6), "val": hp["val_fraction"],
                   "test": "all of run", "by": "image"} if train_run else
                  {"train": round(1 - hp["val_fraction"] - hp["test_fraction"], 6),
                   "val": hp["val_fraction"], "test": hp["test_fraction"], "by": "image"}),
        "standardize": hp["standardize"], "head_sha256": head_sha,
    }
    dev = _data.resolve_device(device)

    def compute():
        ids, labels = _data.image_labels(lk, run)
        if train_run:
            tids, tlabels = _data.image_labels(lk, train_run)
            perm = np.random.default_rng([seed, 0x5EED]).permutation(tids.size)
            n_val = max(1, round(hp["val_fraction"] * tids.size))
            rows = {"train": np.sort(perm[n_val:]), "val": np.sort(perm[:n_val])}
            n_classes = int(max(tlabels.max(), labels.max())) + 1
        else:
            s = config["split"]
            sp = _data.split_images(ids, seed, (s["train"], s["val"], s["test"]))
            rows = {k: np.searchsorted(ids, v) for k, v in sp.items()}
            n_classes = int(labels.max()) + 1
        metrics, choices, weights = {}, {}, {}
        test_ids = ids if train_run else ids[rows["test"]]
        test_y = labels if train_run else labels[rows["test"]]
        for name, parts in REPRESENTATIONS.items():
            if train_run:
                xtr = head_features(lk, train_run, tids, parts)
                xte = head_features(lk, run, ids, parts)
                x = np.concatenate([xtr, xte])
                y = np.concatenate([tlabels, labels])
                prt = {"train": rows["train"], "val": rows["val"],
                       "test": np.arange(tids.size, tids.size + ids.size)}
            else:
                x, y, prt = head_features(lk, run, ids, parts), labels, rows
            outcome, mu, sd, pred = fit_image_classifier(
                x, y, prt, n_classes, spec, dev=dev, seed=seed, standardize=hp["standardize"],
                desc=f"registers {name} {run}", quiet=quiet)
            metrics[name] = {"top1": float(100.0 * np.mean(pred == y[prt["test"]])),
                             "n": float(prt["test"].size)}
            choices[name] = _choices(outcome, spec, dev, True)
            weights[name] = {"weight": outcome.head.weight.detach().cpu(),
                             "bias": outcome.head.bias.detach().cpu(),
                             "mu": torch.from_numpy(mu), "sd": torch.from_numpy(sd)}
        if head:
            w, b = load_head(head)
            metrics["pretrained_head"] = {
                "top1": head_top1(lk, run, w, b, test_ids, test_y, dev),
                "n": float(test_ids.size)}
        metrics["baseline"] = {"chance_top1": 100.0 / n_classes}
        return ({"metrics": metrics, "choices": {"per_representation": choices,
                                                 "n_classes": n_classes,
                                                 "early_stopping": "none (fixed epochs); best "
                                                 "validation epoch kept per head"}},
                {"weights.pt": torch_bytes(weights)})

    return run_cached(lake, run, "registers", config, compute, force=force)
