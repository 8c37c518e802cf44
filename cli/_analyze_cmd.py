"""`tokenlake analyze NAME` and `tokenlake report`: the analysis jobs on an existing lake.

cli/main.py wires `register(subparsers)`. Handlers return an int exit code. Both read the lake
only (a read-only install runs them: no backbone library is imported).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenlake.analyze import JOB_NAMES  # the package's __init__ only: nothing heavy
from tokenlake.cli._options import add_lake


def register(subparsers) -> None:
    p = subparsers.add_parser("analyze", help="figures and tables for the paper's claims, from the lake")
    p.add_argument("name", choices=[*JOB_NAMES, "all"], metavar="NAME",
                   help="maps | norms | size | neighbours | artifacts | blocks | all")
    add_lake(p)
    p.add_argument("--runs", default=None, help="comma list of runs (default: all complete runs)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: LAKE/analysis)")
    p.add_argument("--percentile", type=float, default=0.98,
                   help="outlier threshold quantile of patch norms (default 0.98 = top 2%%)")
    p.add_argument("--images", default=None,
                   help="maps: comma list of source_ids (default: inputs in every run, most outliers first)")
    p.set_defaults(func=analyze_cmd)

    p = subparsers.add_parser("report", help="static HTML + Markdown report of every figure, table and verdict")
    add_lake(p)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: LAKE/report)")
    p.add_argument("--runs", default=None,
                   help="comma list of runs, used as given in the verdicts (default: every complete "
                        "run in the figures, one canonical run per model in the verdicts)")
    p.add_argument("--subset", default="val5k",
                   help="the canonical subset whose runs the verdicts read (default val5k, the "
                        "paper's 5,000 validation images)")
    p.add_argument("--percentile", type=float, default=0.98,
                   help="outlier threshold quantile of patch norms (default 0.98 = top 2%%)")
    p.set_defaults(func=report_cmd)


def _check(args) -> str | None:
    if not 0 < args.percentile < 1:
        return f"--percentile must be in (0, 1), got {args.percentile}"
    if not args.lake.is_dir():
        return f"no lake at {args.lake}"
    return None


def analyze_cmd(args: argparse.Namespace) -> int:
    from tokenlake import analyze
    from tokenlake.store import LakeError

    if (msg := _check(args)) is not None:
        print(f"tokenlake analyze: error: {msg}", file=sys.stderr)
        return 2
    names = JOB_NAMES if args.name == "all" else (args.name,)
    rc = 0
    for name in names:
        kw = {"runs": args.runs, "out": args.out, "percentile": args.percentile}
        if name == "maps" and args.images:
            kw["images"] = args.images
        try:
            res = analyze.JOBS[name](args.lake, **kw)
        except (LakeError, ValueError) as err:
            print(f"tokenlake analyze {name}: error: {err}", file=sys.stderr)
            rc = 2
            continue
        figs = [res["figure"]] if "figure" in res else list(res.get("figures", {}).values())
        for f in figs + ([res["disagree_figure"]] if "disagree_figure" in res else []):
            print(f"{name}: {f}")
        if "table" in res:
            print(f"{name}: {res['table']['parquet']} (+ .csv)")
        for run, why in res.get("missing", {}).items():
            print(f"{name}: run {run}: {why}", file=sys.stderr)
    return rc


def report_cmd(args: argparse.Namespace) -> int:
    from tokenlake import analyze
    from tokenlake.store import LakeError

    if (msg := _check(args)) is not None:
        print(f"tokenlake report: error: {msg}", file=sys.stderr)
        return 2
    try:
        res = analyze.report(args.lake, out=args.out, runs=args.runs, percentile=args.percentile,
                             subset=args.subset)
    except (LakeError, ValueError) as err:
        print(f"tokenlake report: error: {err}", file=sys.stderr)
        return 2
    print(f"report: {res['html']}\nreport: {res['md']}")
    for claim, verdict in res["claims"].items():
        print(f"  {claim}: {verdict}")
    for m in res["missing"]:
        print(f"  missing: {m}")
    for e in res["errors"]:  # a bug, not missing data: the report says so, the exit status too
        print(f"tokenlake report: error: {e['part']} failed: {e['error']} (a bug; traceback "
              f"under Errors in the report)", file=sys.stderr)
    return 1 if res["errors"] else 0
