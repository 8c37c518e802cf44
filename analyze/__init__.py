"""tokenlake.analyze: figures and tables for the paper's claims 1-3 and appendices A and C, and
the report. Reads the lake only through `tokenlake.store`; never runs a backbone.

One function per job; each takes the lake (path or Lake), `runs=None` (all complete runs), `out`
(default LAKE/analysis), `percentile=0.98`, and returns a dict of what it wrote and key numbers.
"""

from tokenlake.analyze._artifacts import artifacts
from tokenlake.analyze._blocks import blocks
from tokenlake.analyze._maps import maps
from tokenlake.analyze._neighbours import neighbours
from tokenlake.analyze._norms import norms
from tokenlake.analyze._probes import reference
from tokenlake.analyze._report import report
from tokenlake.analyze._size import size

JOBS = {"maps": maps, "norms": norms, "size": size, "neighbours": neighbours,
        "artifacts": artifacts, "blocks": blocks}

__all__ = ["JOBS", "artifacts", "blocks", "maps", "neighbours", "norms", "reference", "report",
           "size"]
