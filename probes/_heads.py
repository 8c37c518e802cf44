"""DINOv2's official linear heads on cached features (paper Table 4).

The paper: "We evaluate pretrained DINOv2 models - trained with and without registers - alongside
the pretrained 1-layer classifier heads from the official DINOv2 repository. These models are
assessed on the ImageNet-1K validation set, with performance reported as top-1 accuracy."

The official 1-layer heads (facebookresearch/dinov2, `dinov2_vit{s,b,l,g}14_linear_head.pth` and
`dinov2_vit{s,b,l,g}14_reg4_linear_head.pth`) are nn.Linear((1 + 1) * D, 1000) state dicts with
`weight` [1000, 2D] and `bias` [1000]. Their input is concat[CLS after the final norm, mean of the
patch tokens after the final norm] = image arrays cls_post || patch_mean_post; registers are
excluded. Top-1 against images.label over every labelled image of the run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenlake.probes import _data
from tokenlake.probes._results import run_cached
from tokenlake.store import open_lake

OFFICIAL_HEADS = {
    f"dinov2_vit{s}14{r}": f"dinov2_vit{s}14{r}_linear_head.pth"
    for s in "sblg" for r in ("", "_reg4")
}
CHUNK = 8192


def load_head(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [C, F], bias [C]) from a local .pth state dict (keys `weight`/`bias`, any prefix)."""
    sd = torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    w = [k for k in sd if k == "weight" or k.endswith(".weight")]
    b = [k for k in sd if k == "bias" or k.endswith(".bias")]
    if len(w) != 1 or len(b) != 1:
        raise _data.ProbeError(
            f"{path}: expected one linear layer's weight and bias, found keys {sorted(sd)[:10]}")
    weight, bias = sd[w[0]].float(), sd[b[0]].float()
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise _data.ProbeError(f"{path}: weight {tuple(weight.shape)} / bias {tuple(bias.shape)} "
                               "is not a linear layer")
    return weight, bias


def head_features(lk, run: str, image_ids: np.ndarray, parts: tuple[str, ...]) -> np.ndarray:
    """concat of image arrays (registers_post flattened) for `image_ids`, float32."""
    out = []
    for p in parts:
        a = lk.image_array(run, p, image_ids).astype(np.float32)
        out.append(a.reshape(len(image_ids), -1))
    return np.concatenate(out, 1)


def head_top1(lk, run: str, weight: torch.Tensor, bias: torch.Tensor, image_ids: np.ndarray,
              labels: np.ndarray, dev: torch.device) -> float:
    """Top-1 (%) of the head on cls_post || patch_mean_post of `image_ids` (streamed by chunk)."""
    w, b = weight.to(dev), bias.to(dev)
    correct = 0
    for s in range(0, image_ids.size, CHUNK):
        x = torch.from_numpy(head_features(lk, run, image_ids[s:s + CHUNK],
                                           ("cls_post", "patch_mean_post"))).to(dev)
        if x.shape[1] != w.shape[1]:
            raise _data.ProbeError(
                f"head expects {w.shape[1]} inputs, run {run!r} gives cls_post||patch_mean_post of "
                f"{x.shape[1]}: is the head for this model?")
        pred = (x @ w.T + b).argmax(1).cpu().numpy()
        correct += int((pred == labels[s:s + CHUNK]).sum())
    return 100.0 * correct / max(image_ids.size, 1)


def heads(
    lake: str | Path, run: str, head: str | Path, *, device: str | None = None,
    force: bool = False, seed: int = _data.DEFAULT_SEED, quiet: bool = False,
) -> dict[str, Any]:
    """Top-1 of a pretrained DINOv2 linear head on the cached features of `run` (no training)."""
    lk = open_lake(lake)
    info = _data.run_info(lk, run)
    missing = {"cls_post", "patch_mean_post"} - info.arrays
    if missing:
        raise _data.ProbeError(f"run {run!r} lacks image array(s) {sorted(missing)}")
    head = Path(head)
    if not head.is_file():
        raise FileNotFoundError(f"no head file {str(head)!r}")
    sha = hashlib.sha256(head.read_bytes()).hexdigest()
    # the image arrays are output (post-norm) features: "tokens" says so for the report
    config = {"run": run, "run_fingerprint": info.fingerprint, "head_sha256": sha,
              "head_file": head.name, "input": "cls_post || patch_mean_post", "tokens": "post"}
    dev = _data.resolve_device(device)

    def compute():
        ids, labels = _data.image_labels(lk, run)
        weight, bias = load_head(head)
        top1 = head_top1(lk, run, weight, bias, ids, labels, dev)
        return {"metrics": {"image": {"top1": top1, "n": float(ids.size),
                                      "n_classes": float(weight.shape[0])}},
                "choices": {"device": str(dev), "head_file": str(head)}}, {}

    return run_cached(lake, run, "heads", config, compute, force=force)
