"""tokenlake.analyze: figures and tables for the paper's claims 1-3 and appendices A and C, the
outlier cards, register-neuron rankings and the report. Reads the lake only through
`tokenlake.store`; never runs a backbone (a read-only install has all it needs).

One function per job; each takes the lake (path or Lake), `runs=None` (all complete runs), `out`
(default LAKE/analysis), `percentile=0.98`, and returns a dict of what it wrote and key numbers.
`card_table(lake, runs=None)` gives the outlier cards as an Arrow table (`tokenlake cards`),
`side_by_side(table)` as the command prints them; `rank_neurons(lake, run, ...)` ranks a
`--record-mlp` run's neurons (`tokenlake neurons`).

Names are imported on first use (PEP 562): `import tokenlake.analyze` loads no plotting library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> (private module, attribute)
_EXPORTS = {
    "artifacts": ("_artifacts", "artifacts"),
    "blocks": ("_blocks", "blocks"),
    "card_table": ("_cards", "card_table"),
    "cards": ("_cards", "cards"),
    "side_by_side": ("_cards", "side_by_side"),
    "maps": ("_maps", "maps"),
    "neighbours": ("_neighbours", "neighbours"),
    "rank_neurons": ("_neurons", "rank_neurons"),
    "norms": ("_norms", "norms"),
    "reference": ("_probes", "reference"),
    "report": ("_report", "report"),
    "size": ("_size", "size"),
}
# the jobs of `tokenlake analyze NAME`, in the order `analyze all` runs them
JOB_NAMES = ("maps", "norms", "size", "neighbours", "artifacts", "blocks")

__all__ = [
    "JOBS",
    "JOB_NAMES",
    "artifacts",
    "blocks",
    "card_table",
    "cards",
    "maps",
    "neighbours",
    "norms",
    "rank_neurons",
    "reference",
    "report",
    "side_by_side",
    "size",
]


def __getattr__(name: str) -> Any:
    if name == "JOBS":  # name -> job function
        value: Any = {job: __getattr__(job) for job in JOB_NAMES}
    elif name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and editors see
    from tokenlake.analyze._artifacts import artifacts
    from tokenlake.analyze._blocks import blocks
    from tokenlake.analyze._cards import card_table, cards, side_by_side
    from tokenlake.analyze._maps import maps
    from tokenlake.analyze._neighbours import neighbours
    from tokenlake.analyze._neurons import rank_neurons
    from tokenlake.analyze._norms import norms
    from tokenlake.analyze._probes import reference
    from tokenlake.analyze._report import report
    from tokenlake.analyze._size import size

    JOBS: dict[str, Any]
