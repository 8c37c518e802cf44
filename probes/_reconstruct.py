"""Pixel reconstruction probe (paper Table 2): a linear layer maps a patch token to its P x P x 3 pixels.

The paper: "A linear layer reconstructs the image patch from token embeddings (D), outputting
P^2 x 3 values (flattened RGB patch). Training minimizes MSE loss with AdamW [...] using a cosine
learning rate schedule for up to 30 epochs, with early stopping (patience = 3) based on validation
MSE." Token embeddings: the output tokens by default (`tokens`, see _data.TOKENS). Targets are the
`target` cells (aligned | centred, probes/_cells.py) normalised as the model's input:
(pixels / 255 - mean) / std with the run manifest's data_config. Loss: MSE (mean over values); AdamW; cosine; early stopping on the
validation per-patch squared L2 error. Reported: per-patch squared L2 error (sum over P*P*3) on the
test images, for normal and outlier tokens, and the error of always predicting the training
mean patch ("mean_patch" baseline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenlake.probes import _cells, _data
from tokenlake.probes._position import _choices, split_parts
from tokenlake.probes._results import run_cached, torch_bytes
from tokenlake.probes._train import TrainSpec, apply_head, train_linear
from tokenlake.store import open_lake

DEFAULTS: dict[str, Any] = {
    "lrs": (1e-3, 3e-3, 1e-2),
    "batch_size": 1024,
    "weight_decay": 1e-4,
    "max_epochs": 30,
    "patience": 3,
    "val_fraction": 0.1,
    "test_fraction": 0.2,
    "standardize": True,
    "max_train_tokens": None,
}


def reconstruct(
    lake: str | Path, run: str, *, tokens: str = "post", target: str = "aligned",
    device: str | None = None, force: bool = False, seed: int = _data.DEFAULT_SEED,
    quiet: bool = False, **hp: Any,
) -> dict[str, Any]:
    """Train (or reuse) the pixel-reconstruction probe of `run` on its `tokens` ("post": output
    tokens, "pre": before the final norm), reconstructing the `target` cells ("aligned" |
    "centred"; they differ for PVT only)."""
    hp = _data.merge_hp("reconstruct", DEFAULTS, hp)
    lk = open_lake(lake)
    info = _data.run_info(lk, run)
    if info.cell is None:
        raise _data.ProbeError(f"run {run!r} has no pixels array")
    _data.check_tokens(lk, run, tokens)
    cells = _cells.plan_cells(lk, run, info, target)
    mean, std = info.mean_std
    tfp = _data.run_info(lk, info.threshold_run).fingerprint if info.threshold_run != run else ""
    spec = TrainSpec("adamw", tuple(hp["lrs"]), hp["weight_decay"], hp["batch_size"],
                     hp["max_epochs"], hp["patience"])
    config = {
        "run": run, "run_fingerprint": info.fingerprint, "threshold_run": info.threshold_run,
        "threshold_run_fingerprint": tfp, "seed": seed, "tokens": tokens, "target": target,
        "train": spec.to_dict(),
        "split": {"train": round(1 - hp["val_fraction"] - hp["test_fraction"], 6),
                  "val": hp["val_fraction"], "test": hp["test_fraction"], "by": "image"},
        "standardize": hp["standardize"], "max_train_tokens": hp["max_train_tokens"],
        "pixel_norm": {"mean": mean.tolist(), "std": std.tolist()},
    }
    dev = _data.resolve_device(device)

    def compute():
        idx = _data.patch_index(lk, run)
        sp, parts = split_parts(idx, config, seed)
        reader = (_cells.centred_reader(lk, run, _cells.neighbour_slots(idx, info.grid),
                                        -cells.rf_offset, info.cell) if cells.derive else None)
        feats = _data.TokenFeatures(lk, run, idx["slot"], tokens=tokens, pixels=True,
                                    cells=reader)
        if hp["standardize"]:
            mu_np, sd_np = _data.fit_standardizer(feats, parts["train"], seed)
        else:
            mu_np, sd_np = np.zeros(info.dim, np.float32), np.ones(info.dim, np.float32)
        mu, sd = torch.from_numpy(mu_np).to(dev), torch.from_numpy(sd_np).to(dev)
        m_t = torch.from_numpy(mean).to(dev)
        s_t = torch.from_numpy(std).to(dev)
        n_out = info.cell * info.cell * 3

        def targets(b, pix):
            p = torch.from_numpy(pix).to(dev).float().div_(255.0)
            return (((p - m_t) / s_t).reshape(len(b), n_out),)

        def loss_fn(out, batch):
            return torch.nn.functional.mse_loss(out, batch[1])

        def val_fn(out, batch):
            return float(((out - batch[1]) ** 2).sum()), float(batch[1].shape[0])

        bs = hp["batch_size"]
        mk = {"batch_size": bs, "device": dev, "mu": mu, "sd": sd, "targets": targets}
        outcome = train_linear(
            in_dim=info.dim, out_dim=n_out, spec=spec,
            train_batches=lambda e: _data.torch_batches(
                feats, parts["train"], shuffle=True, rng=_data.epoch_rng(seed, e), **mk),
            steps_per_epoch=-(-parts["train"].size // bs),
            val_batches=lambda: _data.torch_batches(feats, parts["val"], **mk),
            loss_fn=loss_fn, val_fn=val_fn, higher_is_better=False, device=dev, seed=seed,
            desc=f"reconstruct {run}", quiet=quiet,
        )
        # training mean patch, for the trivial baseline
        tot = torch.zeros(n_out, dtype=torch.float64, device=dev)
        for b in _data.torch_batches(feats, parts["train"], **mk):
            tot += b[1].double().sum(0)
        mean_patch = (tot / max(parts["train"].size, 1)).float()
        head = outcome.head.to(dev)
        test = parts["test"]
        errs = apply_head(
            head, _data.torch_batches(feats, test, **mk),
            lambda o, b: (((o - b[1]) ** 2).sum(1).cpu().numpy(),
                          ((mean_patch - b[1]) ** 2).sum(1).cpu().numpy()),
        )
        sse = np.concatenate([e[0] for e in errs]) if errs else np.zeros(0)
        base = np.concatenate([e[1] for e in errs]) if errs else np.zeros(0)
        flag = idx["outlier"][test]

        def group(mask):
            if not mask.any():
                return {"l2": None, "mean_patch_l2": None, "n": 0.0}
            return {"l2": float(sse[mask].mean()), "mean_patch_l2": float(base[mask].mean()),
                    "n": float(mask.sum())}

        metrics = {"normal": group(~flag), "outlier": group(flag),
                   "all": group(np.ones_like(flag))}
        result = {
            "metrics": metrics,
            "choices": {
                **_choices(outcome, spec, dev, feats.cached),
                "cell": info.cell, "embeddings": _data.TOKENS_MEANING[tokens],
                "target": cells.to_dict(), "loss": "MSE over P*P*3 normalised pixel values",
                "metric": "per-patch squared L2 error = sum over P*P*3 of squared error "
                          "(normalised pixel space), mean over the group's test tokens",
                "images": {k: int(v.size) for k, v in sp.items()},
                "tokens": {k: int(v.size) for k, v in parts.items()},
            },
            "history": outcome.history,
        }
        weights = {"weight": outcome.head.weight.detach().cpu(),
                   "bias": outcome.head.bias.detach().cpu(),
                   "mu": torch.from_numpy(mu_np), "sd": torch.from_numpy(sd_np)}
        return result, {"weights.pt": torch_bytes(weights)}

    return run_cached(lake, run, "reconstruct", config, compute, force=force)
