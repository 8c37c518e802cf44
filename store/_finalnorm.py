"""A run's final norm: the one per-token function from a stored token to the model's output token.

The lake keeps every token **before** the final norm layer, as the paper's norms and feature maps
need ("we calculate these using final-layer output tokens prior to the last Layer Normalization").
Its probes read **output** tokens ("extracting output tokens, unnormalized norms (before the final
LayerNorm), and [CLS] tokens"). Saving the final norm's parameters with the run makes the output
token of any stored embedding one per-token function away, with no re-extraction.

``runs/<run>/final_norm.json`` (schema version 3)::

    {"type": "layer_norm", "dim": D, "eps": 1e-06, "weight": [D floats] | null, "bias": [D] | null}
    {"type": "rms_norm",   "dim": D, "eps": ..., "weight": [D] | null}
    {"type": "identity",   "dim": D}

Floats are the float32 parameters written exactly (a float32 value has an exact decimal form).
The file is written atomically when the run's model is first built and never changes afterwards;
its sha256 goes into the manifest, which `tokenlake validate` checks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from tokenlake.store._errors import ContractError, LakeError, RunConfigMismatch
from tokenlake.store._io import atomic_write

FINAL_NORM_FILE = "final_norm.json"
NORM_TYPES = ("layer_norm", "rms_norm", "identity")
TOKENS = ("pre", "post")


def _vector(value: Any, dim: int, what: str) -> list[float] | None:
    if value is None:
        return None
    v = np.asarray(value, dtype=np.float32)
    if v.shape != (dim,):
        raise ContractError(f"final_norm.{what}: shape {v.shape}, expected ({dim},)")
    if not np.isfinite(v).all():
        raise ContractError(f"final_norm.{what}: non-finite values")
    return v.tolist()


def check_final_norm(norm: dict[str, Any]) -> dict[str, Any]:
    """The canonical JSON form of a final-norm description (see the module doc); ContractError
    for anything else."""
    if not isinstance(norm, dict) or norm.get("type") not in NORM_TYPES:
        raise ContractError(
            f"final_norm: expected a dict with type one of {NORM_TYPES}, got {norm!r:.200}")
    kind = norm["type"]
    allowed = {"identity": {"type", "dim"}, "rms_norm": {"type", "dim", "eps", "weight"},
               "layer_norm": {"type", "dim", "eps", "weight", "bias"}}[kind]
    extra = set(norm) - allowed
    if extra:
        raise ContractError(f"final_norm ({kind}): unknown key(s) {sorted(extra)}")
    dim = norm.get("dim")
    if not isinstance(dim, int) or dim <= 0:
        raise ContractError(f"final_norm.dim must be a positive int, got {dim!r}")
    out: dict[str, Any] = {"type": kind, "dim": dim}
    if kind == "identity":
        return out
    eps = norm.get("eps")
    if not isinstance(eps, int | float) or not eps >= 0:
        raise ContractError(f"final_norm.eps must be a number >= 0, got {eps!r}")
    out["eps"] = float(eps)
    out["weight"] = _vector(norm.get("weight"), dim, "weight")
    if kind == "layer_norm":
        out["bias"] = _vector(norm.get("bias"), dim, "bias")
    return out


def final_norm_bytes(norm: dict[str, Any]) -> bytes:
    return json.dumps(check_final_norm(norm), sort_keys=True, separators=(",", ":")).encode()


def write_final_norm(run_dir: Path, norm: dict[str, Any]) -> dict[str, Any]:
    """Write final_norm.json once; a second writer must bring the very same parameters.

    Returns the manifest entry {file, sha256, type, dim}."""
    data = final_norm_bytes(norm)
    path = run_dir / FINAL_NORM_FILE
    if path.exists():
        old = path.read_bytes()
        if old != data:
            raise RunConfigMismatch(
                f"run {run_dir.name!r}: its saved final-norm parameters ({FINAL_NORM_FILE}) differ "
                "from this model's: the weights changed since the run began. Use --run NEW_NAME "
                f"or delete runs/{run_dir.name}")
    else:
        atomic_write(path, data)
    return final_norm_entry(data, norm["type"], norm["dim"])


def final_norm_entry(data: bytes, kind: str, dim: int) -> dict[str, Any]:
    return {"file": FINAL_NORM_FILE, "sha256": hashlib.sha256(data).hexdigest(), "type": kind,
            "dim": dim}


def read_final_norm(run_dir: Path) -> dict[str, Any] | None:
    """The parameters as numpy float32 arrays, or None when the run has no final_norm.json."""
    path = run_dir / FINAL_NORM_FILE
    if not path.exists():
        return None
    d = check_final_norm(json.loads(path.read_bytes()))
    for k in ("weight", "bias"):
        if d.get(k) is not None:
            d[k] = np.asarray(d[k], dtype=np.float32)
    return d


def apply_final_norm(x: np.ndarray, norm: dict[str, Any]) -> np.ndarray:
    """[n, D] stored (pre-final-norm) tokens -> [n, D] float32 output tokens.

    The same arithmetic as torch's layer_norm / timm's RmsNorm, in float32 (autocast runs
    layer_norm in float32 too): biased variance over the last dimension."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] != norm["dim"]:
        raise LakeError(f"final norm of width {norm['dim']} applied to tokens of width {x.shape[-1]}")
    if norm["type"] == "identity":
        return x.copy()
    if norm["type"] == "layer_norm":
        mu = x.mean(-1, keepdims=True, dtype=np.float32)
        centred = x - mu
        var = np.square(centred).mean(-1, keepdims=True, dtype=np.float32)
        y = centred / np.sqrt(var + np.float32(norm["eps"]))
    else:  # rms_norm
        ms = np.square(x).mean(-1, keepdims=True, dtype=np.float32)
        y = x / np.sqrt(ms + np.float32(norm["eps"]))
    if norm.get("weight") is not None:
        y = y * norm["weight"]
    if norm.get("bias") is not None:
        y = y + norm["bias"]
    return y.astype(np.float32, copy=False)
