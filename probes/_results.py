"""Results: config hashing, reuse of a committed result, and the atomic write through the store."""

from __future__ import annotations

import io
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tokenlake import store

PROBE_VERSION = 2  # bump when a probe's computation changes: old results are not reused
# 2: probes read output (post-norm) tokens by default, seed 42, classify test_run, PVT targets


def rows_from_metrics(metrics: dict[str, dict[str, float]]) -> list[tuple[str, str, float]]:
    return [(g, m, float(v)) for g, d in metrics.items() for m, v in d.items() if v is not None]


def torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def run_cached(
    lake_path: str | Path,
    run: str,
    probe: str,
    config: dict[str, Any],
    compute: Callable[[], tuple[dict[str, Any], dict[str, bytes]]],
    *,
    force: bool,
) -> dict[str, Any]:
    """Reuse the committed result of this exact config, or compute and commit it.

    compute() -> (result dict with a 'metrics' {group: {metric: value}} entry, extra files).
    The returned dict has 'reused' (True when nothing was trained) and 'path'.
    """
    config = {"probe": probe, "probe_version": PROBE_VERSION, **config}
    h = store.probe_config_hash(config)
    if not force:
        found = store.read_probe_result(lake_path, run, probe, h)
        if found is not None:
            return {**found, "reused": True,
                    "path": str(store.probe_result_dir(lake_path, run, probe, h))}
    started = time.time()
    result, files = compute()
    result = {**result, "config": config, "wall_time_s": round(time.time() - started, 3),
              "host": {"torch": torch.__version__, "python": platform.python_version()}}
    path = store.write_probe_result(
        lake_path, run, probe, h, config=config, result=result,
        rows=rows_from_metrics(result["metrics"]), files=files, force=force,
    )
    out = store.read_probe_result(lake_path, run, probe, h)
    return {**out, "reused": False, "path": str(path)}


def load_weights(result: dict[str, Any]) -> dict[str, Any]:
    return torch.load(Path(result["path"]) / "weights.pt", map_location="cpu", weights_only=True)


def format_result(result: dict[str, Any]) -> str:
    """A small text table of a result's metrics, for the CLI."""
    metrics = result["metrics"]
    names = sorted({m for d in metrics.values() for m in d})
    width = max([len(g) for g in metrics] + [11])
    lines = [f"{'token_group':<{width}} " + " ".join(f"{n:>12}" for n in names)]
    for g, d in metrics.items():
        cells = [f"{d[n]:>12.4f}" if d.get(n) is not None else f"{'':>12}" for n in names]
        lines.append(f"{g:<{width}} " + " ".join(cells))
    return "\n".join(lines)
