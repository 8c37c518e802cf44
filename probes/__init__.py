"""tokenlake.probes: linear probes over the lake (paper claims 4-5, appendix B).

Each probe reads the lake through `tokenlake.store` only, never runs a backbone, and commits its
result to LAKE/probes/<run>/<probe>-<config_hash>/ and the `probe_results` SQL view. Rerunning with
the same configuration reuses the committed result unless force=True. See probes/README.md.

Probes train with torch: the `probes` extra (`pip install 'tokenlake[probes]'`; `[extract]`
includes it). `DEFAULTS[name]` holds each probe's hyper-parameter defaults. Names are imported on
first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> (private module, attribute)
_EXPORTS = {
    "classify": ("_classify", "classify"),
    "ProbeError": ("_data", "ProbeError"),
    "OFFICIAL_HEADS": ("_heads", "OFFICIAL_HEADS"),
    "heads": ("_heads", "heads"),
    "centre_baseline": ("_position", "centre_baseline"),
    "position": ("_position", "position"),
    "reconstruct": ("_reconstruct", "reconstruct"),
    "registers": ("_registers", "registers"),
    "format_result": ("_results", "format_result"),
    "sweep": ("_sweep", "sweep"),
}
# each probe's hyper-parameter defaults (sweep trains the position probe: its defaults)
_DEFAULTS = {"position": "_position", "reconstruct": "_reconstruct", "classify": "_classify",
             "registers": "_registers", "sweep": "_position", "heads": None}
PROBES = ("position", "reconstruct", "classify", "heads", "registers", "sweep")
# what the `probes` extra installs (pyproject.toml), by import name
EXTRA_MODULES = ("torch", "tqdm")

__all__ = [
    "DEFAULTS",
    "OFFICIAL_HEADS",
    "PROBES",
    "ProbeError",
    "centre_baseline",
    "classify",
    "format_result",
    "heads",
    "position",
    "reconstruct",
    "registers",
    "sweep",
]


def _import(module: str):
    try:
        return importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] not in EXTRA_MODULES:
            raise
        raise ModuleNotFoundError(
            f"tokenlake.probes needs the 'probes' extra ({err.name} is not installed): "
            "pip install 'tokenlake[probes]' (or 'tokenlake[extract]', which includes it)",
            name=err.name) from err


def __getattr__(name: str) -> Any:
    if name == "DEFAULTS":  # probe -> {hyper-parameter: default}
        value: Any = {p: dict(_import(m).DEFAULTS) if m else {} for p, m in _DEFAULTS.items()}
    elif name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = getattr(_import(module), attr)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and editors see
    from tokenlake.probes._classify import classify
    from tokenlake.probes._data import ProbeError
    from tokenlake.probes._heads import OFFICIAL_HEADS, heads
    from tokenlake.probes._position import centre_baseline, position
    from tokenlake.probes._reconstruct import reconstruct
    from tokenlake.probes._registers import registers
    from tokenlake.probes._results import format_result
    from tokenlake.probes._sweep import sweep

    DEFAULTS: dict[str, dict[str, Any]]
