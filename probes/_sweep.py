"""Norm-threshold sweep of the trained position probe (paper appendix B, Figure 11).

The paper: "we evaluate the trained position predictor with outliers separated at various
thresholds, i.e., top 2%, 5%, and so forth. [...] Outliers are designated progressively, starting
from the top 50% tokens in terms of norm down to the top 2%."

For each top-k% (50% down to 2%), the threshold is the (1 - k/100)-quantile of the run's own patch
norms (`thresholds_at` view macro, over every patch token of the run); the position probe (trained
or reused with the given position hyper-parameters) is evaluated on the stored patch tokens of its
held-out test images whose norm is above it. Works for any run, random weights included (the
figure's title then says RANDOM WEIGHTS, in red).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenlake.probes import _data
from tokenlake.probes._position import DEFAULTS as POSITION_DEFAULTS
from tokenlake.probes._position import position, predict_positions, split_parts
from tokenlake.probes._results import load_weights, run_cached
from tokenlake.store import open_lake

DEFAULT_TOPS = (50.0, 40.0, 30.0, 20.0, 10.0, 5.0, 2.0)


def _figure(rows: list[dict[str, Any]], *, run: str, random_weights: bool, normal_top1, chance,
            tokens: str):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = [r["top_pct"] for r in rows]
    ys = [r["top1"] if r["top1"] is not None else np.nan for r in rows]
    ax.plot(xs, ys, "o-", label="tokens above threshold")
    if normal_top1 is not None:
        ax.axhline(normal_top1, color="grey", ls="--", lw=1, label="all test tokens")
    ax.axhline(chance, color="k", ls=":", lw=1, label="chance")
    ax.set_xlabel("tokens kept: top % by pre-final-norm L2 norm")
    ax.set_ylabel(f"position probe top-1 accuracy (%), {tokens}-norm tokens")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    title = f"Position probe vs norm threshold - {run}"
    if random_weights:
        ax.set_title("RANDOM WEIGHTS - " + title, color="red")
    else:
        ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def sweep(
    lake: str | Path, run: str, *, tokens: str = "post", device: str | None = None,
    force: bool = False, seed: int = _data.DEFAULT_SEED, quiet: bool = False,
    tops: tuple[float, ...] = DEFAULT_TOPS, **position_hp: Any,
) -> dict[str, Any]:
    """Top-1 of the trained position probe on tokens above each norm threshold (table + figure).

    The position probe reads `tokens` ("post" | "pre"); the thresholds are on the pre-norm norm
    column. `force` retrains the position probe too. The figure is `sweep.png` in the result
    directory.
    """
    hp = {**POSITION_DEFAULTS, **position_hp}
    pos = position(lake, run, tokens=tokens, device=device, force=force, seed=seed, quiet=quiet,
                   **position_hp)
    lk = open_lake(lake)
    info = _data.run_info(lk, run)
    tops = tuple(float(t) for t in tops)
    config = {"run": run, "run_fingerprint": info.fingerprint, "seed": seed, "tokens": tokens,
              "position_config_hash": pos["config_hash"], "tops_pct": list(tops),
              "position_hp": {k: (list(v) if isinstance(v, tuple) else v) for k, v in hp.items()}}
    dev = _data.resolve_device(device)

    def compute():
        idx = _data.patch_index(lk, run, need_outliers=False)
        gh, gw = info.grid
        _, parts = split_parts(idx, pos["config"], seed)
        w = load_weights(pos)
        head = torch.nn.Linear(w["weight"].shape[1], w["weight"].shape[0])
        head.load_state_dict({"weight": w["weight"], "bias": w["bias"]})
        test = parts["test"]
        feats = _data.TokenFeatures(lk, run, idx["slot"][test], tokens=tokens)
        pred = predict_positions(head.eval(), feats, np.arange(test.size), batch_size=4096,
                                 device=dev, mu=w["mu"].to(dev), sd=w["sd"].to(dev))
        y = idx["row"][test] * gw + idx["col"][test]
        norm = idx["norm"][test]
        rows, metrics = [], {}
        for t in tops:
            q = 1.0 - t / 100.0
            thr = lk.sql(f"SELECT threshold FROM thresholds_at({q!r}) WHERE run = ?",
                         params=[run]).column("threshold").to_pylist()[0]
            m = norm > thr
            top1 = float(100.0 * np.mean(pred[m] == y[m])) if m.any() else None
            rows.append({"top_pct": t, "quantile": q, "threshold": thr, "n": int(m.sum()),
                         "top1": top1})
            metrics[f"top{t:g}%"] = {"top1": top1, "threshold": thr, "n": float(m.sum())}
        all_top1 = float(100.0 * np.mean(pred == y)) if y.size else None
        metrics["all"] = {"top1": all_top1, "n": float(y.size)}
        png = _figure(rows, run=run, random_weights=info.random_weights, normal_top1=all_top1,
                      chance=100.0 / (gh * gw), tokens=tokens)
        result = {"metrics": metrics, "table": rows,
                  "choices": {"position_result": pos["path"], "device": str(dev),
                              "embeddings": _data.TOKENS_MEANING[tokens],
                              "random_weights": info.random_weights,
                              "thresholds": "thresholds_at(1 - top/100) of this run's patch norms",
                              "evaluated_on": "stored patch tokens of the position probe's "
                                              "held-out test images"}}
        return result, {"sweep.png": png}

    return run_cached(lake, run, "sweep", config, compute, force=force)
