"""Position probe (paper Table 1): a linear layer maps a patch token to its grid index.

The paper: "This task is formulated as classification, where each token predicts its original
patch position. [...] A linear layer maps the token embedding (D) to an integer in
[0, (Y/P)^2 - 1], which is then converted to a grid coordinate. Training uses cross-entropy (CE)
and mean squared error (MSE) loss, reporting top-1 accuracy and L2 distance to the ground-truth
position. The total loss is CE + 0.5 x MSE". Token embeddings: the output tokens by default
(`tokens`, _data.TOKENS); normal/outlier from the pre-norm norm column (the `outliers` view).

Loss: CE over the gh*gw positions + mse_weight * MSE between the softmax-expected (row, col) and the
true (row, col), both divided by (gh-1, gw-1) so the MSE lives in [0, 1] like the CE's scale.
One probe is trained on all stored patch tokens of the training images and evaluated on the
held-out test images by group (normal / outlier / all).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tokenlake.probes import _data
from tokenlake.probes._results import run_cached, torch_bytes
from tokenlake.probes._train import TrainSpec, apply_head, train_linear
from tokenlake.store import open_lake

DEFAULTS: dict[str, Any] = {
    "lrs": (1e-3, 3e-3, 1e-2, 3e-2),
    "batch_size": 1024,
    "weight_decay": 0.0,
    "max_epochs": 30,
    "patience": 3,
    "val_fraction": 0.1,
    "test_fraction": 0.2,
    "mse_weight": 0.5,
    "standardize": True,
    "max_train_tokens": None,
}


def centre_baseline(gh: int, gw: int) -> float:
    """Mean L2 distance (grid cells) from every cell of a uniform gh x gw grid to its centre.

    The paper (Table 1): average L2 distance "is susceptible to trivial solutions (e.g., always
    predicting the image center), especially under uniform distributions like ours. We report
    this trivial solution in the Baseline column".

    The centre is ((gh-1)/2, (gw-1)/2): 14.15 for 37x37, 5.35 for 14x14 (paper Table 1).
    """
    r, c = np.divmod(np.arange(gh * gw), gw)
    return float(np.hypot(r - (gh - 1) / 2, c - (gw - 1) / 2).mean())


def _config(info: _data.RunInfo, tinfo_fp: str, seed: int, tokens: str,
            hp: dict[str, Any]) -> dict[str, Any]:
    spec = TrainSpec("adam", tuple(hp["lrs"]), hp["weight_decay"], hp["batch_size"],
                     hp["max_epochs"], hp["patience"])
    return {
        "run": info.run, "run_fingerprint": info.fingerprint, "threshold_run": info.threshold_run,
        "threshold_run_fingerprint": tinfo_fp, "seed": seed, "tokens": tokens,
        "train": spec.to_dict(),
        "split": {"train": round(1 - hp["val_fraction"] - hp["test_fraction"], 6),
                  "val": hp["val_fraction"], "test": hp["test_fraction"], "by": "image"},
        "mse_weight": hp["mse_weight"], "standardize": hp["standardize"],
        "max_train_tokens": hp["max_train_tokens"],
    }


def split_parts(idx: dict[str, np.ndarray], config: dict[str, Any], seed: int):
    s = config["split"]
    sp = _data.split_images(idx["image_id"], seed, (s["train"], s["val"], s["test"]))
    parts = {k: np.flatnonzero(np.isin(idx["image_id"], ids)) for k, ids in sp.items()}
    cap = config.get("max_train_tokens")
    if cap and parts["train"].size > cap:
        rng = np.random.default_rng([seed, 0xCA9])
        parts["train"] = np.sort(rng.choice(parts["train"], int(cap), replace=False))
    return sp, parts


def grid_metrics(pred: np.ndarray, y: np.ndarray, gh: int, gw: int) -> dict[str, float]:
    pr, pc = np.divmod(pred, gw)
    tr, tc = np.divmod(y, gw)
    return {
        "top1": float(100.0 * np.mean(pred == y)) if y.size else None,
        "dist": float(np.mean(np.hypot(pr - tr, pc - tc))) if y.size else None,
        "centre_dist": float(np.mean(np.hypot(tr - (gh - 1) / 2, tc - (gw - 1) / 2)))
        if y.size else None,
        "n": float(y.size),
    }


def predict_positions(head, feats, idx, *, batch_size, device, mu, sd) -> np.ndarray:
    head = head.to(device)
    out = apply_head(
        head,
        _data.torch_batches(feats, idx, batch_size=batch_size, device=device, mu=mu, sd=sd,
                            targets=lambda b, p: ()),
        lambda o, b: o.argmax(1).cpu().numpy(),
    )
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def position(
    lake: str | Path, run: str, *, tokens: str = "post", device: str | None = None,
    force: bool = False, seed: int = _data.DEFAULT_SEED, quiet: bool = False, **hp: Any,
) -> dict[str, Any]:
    """Train (or reuse) the position probe of `run` on its `tokens` ("post": output tokens, "pre":
    before the final norm); returns the result dict (see README)."""
    hp = _data.merge_hp("position", DEFAULTS, hp)
    lk = open_lake(lake)
    info = _data.run_info(lk, run)
    _data.check_tokens(lk, run, tokens)
    tfp = _data.run_info(lk, info.threshold_run).fingerprint if info.threshold_run != run else ""
    config = _config(info, tfp, seed, tokens, hp)
    dev = _data.resolve_device(device)

    def compute():
        idx = _data.patch_index(lk, run)
        gh, gw = info.grid
        sp, parts = split_parts(idx, config, seed)
        feats = _data.TokenFeatures(lk, run, idx["slot"], tokens=tokens)
        if hp["standardize"]:
            mu_np, sd_np = _data.fit_standardizer(feats, parts["train"], seed)
        else:
            mu_np = np.zeros(info.dim, np.float32)
            sd_np = np.ones(info.dim, np.float32)
        mu, sd = torch.from_numpy(mu_np).to(dev), torch.from_numpy(sd_np).to(dev)
        label = idx["row"] * gw + idx["col"]
        scale = np.array([max(gh - 1, 1), max(gw - 1, 1)], np.float32)
        coords = np.stack([idx["row"], idx["col"]], 1).astype(np.float32) / scale
        cells = torch.from_numpy(
            np.stack(np.divmod(np.arange(gh * gw), gw), 1).astype(np.float32) / scale
        ).to(dev)

        def targets(b, _pix):
            return (torch.from_numpy(label[b]).to(dev), torch.from_numpy(coords[b]).to(dev))

        def loss_fn(out, batch):
            _, y, xy = batch
            expected = out.softmax(1) @ cells
            return F.cross_entropy(out, y) + hp["mse_weight"] * F.mse_loss(expected, xy)

        def val_fn(out, batch):
            return float((out.argmax(1) == batch[1]).sum()), float(batch[1].numel())

        bs = hp["batch_size"]
        mk = {"batch_size": bs, "device": dev, "mu": mu, "sd": sd, "targets": targets}
        spec = TrainSpec(**{k: (tuple(v) if k == "lrs" else v)
                            for k, v in config["train"].items()})
        outcome = train_linear(
            in_dim=info.dim, out_dim=gh * gw, spec=spec,
            train_batches=lambda e: _data.torch_batches(
                feats, parts["train"], shuffle=True, rng=_data.epoch_rng(seed, e), **mk),
            steps_per_epoch=-(-parts["train"].size // bs),
            val_batches=lambda: _data.torch_batches(feats, parts["val"], **mk),
            loss_fn=loss_fn, val_fn=lambda o, b: val_fn(o, b), higher_is_better=True,
            device=dev, seed=seed, desc=f"position {run}", quiet=quiet,
        )
        test = parts["test"]
        pred = predict_positions(outcome.head, feats, test, batch_size=bs, device=dev, mu=mu, sd=sd)
        y, out_flag = label[test], idx["outlier"][test]
        metrics = {
            "normal": grid_metrics(pred[~out_flag], y[~out_flag], gh, gw),
            "outlier": grid_metrics(pred[out_flag], y[out_flag], gh, gw),
            "all": grid_metrics(pred, y, gh, gw),
            "grid": {"baseline_dist": centre_baseline(gh, gw), "n_positions": float(gh * gw),
                     "chance_top1": 100.0 / (gh * gw)},
        }
        result = {
            "metrics": metrics,
            "choices": {
                **_choices(outcome, spec, dev, feats.cached),
                "embeddings": _data.TOKENS_MEANING[tokens], "grid": [gh, gw], "loss": "CE + mse_weight * MSE(softmax-expected (row, col) / "
                "(gh-1, gw-1), true (row, col) / (gh-1, gw-1))",
                "images": {k: int(v.size) for k, v in sp.items()},
                "tokens": {k: int(v.size) for k, v in parts.items()},
                "tokens_without_slot": int(idx["n_without_slot"]),
            },
            "history": outcome.history,
        }
        weights = {"weight": outcome.head.weight.detach().cpu(), "bias": outcome.head.bias.detach().cpu(),
                   "mu": torch.from_numpy(mu_np), "sd": torch.from_numpy(sd_np),
                   "grid": torch.tensor([gh, gw])}
        return result, {"weights.pt": torch_bytes(weights)}

    return run_cached(lake, run, "position", config, compute, force=force)


def _choices(outcome, spec: TrainSpec, dev, cached: bool) -> dict[str, Any]:
    return {
        "train": spec.to_dict(), "schedule": "cosine to 0 over max_epochs (per step)",
        "chosen_lr": outcome.chosen_lr, "epochs_run": outcome.epochs_run,
        "best_epoch": outcome.best_epoch, "stopped_early": outcome.stopped_early,
        "val_metric": outcome.val_metric, "val_by_lr": outcome.val_by_lr, "device": str(dev),
        "features_in_memory": bool(cached),
    }
