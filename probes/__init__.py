"""tokenlake.probes: linear probes over the lake (paper claims 4-5, appendix B).

Each probe reads the lake through `tokenlake.store` only, never runs a backbone, and commits its
result to LAKE/probes/<run>/<probe>-<config_hash>/ and the `probe_results` SQL view. Rerunning with
the same configuration reuses the committed result unless force=True. See probes/README.md.
"""

from tokenlake.probes._classify import classify
from tokenlake.probes._data import ProbeError
from tokenlake.probes._heads import OFFICIAL_HEADS, heads
from tokenlake.probes._position import centre_baseline, position
from tokenlake.probes._reconstruct import reconstruct
from tokenlake.probes._registers import registers
from tokenlake.probes._results import format_result
from tokenlake.probes._sweep import sweep

PROBES = ("position", "reconstruct", "classify", "heads", "registers", "sweep")

__all__ = [
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
