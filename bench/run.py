"""`make bench`: run every bench/bench_*.py, print each measurement beside its target, save results.

Each bench module exposes ``run(*, out: Path, quick: bool)`` returning (or yielding) rows; a row is
``{"bench", "name", "value", "unit", "target", "ok", "note"}`` where ``target`` is a readable goal
("<= 0.5 s", ">= 0.95x") and ``ok`` is True/False/None (None: not applicable on this machine).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch


def _device() -> dict:
    from tokenlake.extract._loader import usable_cpus

    info = {"host": platform.node(), "cpu_count": os.cpu_count(), "usable_cpus": usable_cpus(),
            "python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses and worker processes look the module up by name
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--only", default=None, help="run only bench_<ONLY>.py")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds a bench may take (benches whose run() takes budget_s: gpu)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    path = args.out / "results.json"

    def save() -> None:  # after every row: a run cut short (a GPU lease ending) keeps its rows
        result = {"device": _device(), "when": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)

    here = Path(__file__).resolve().parent
    for bench in sorted(here.glob("bench_*.py")):
        if args.only and bench.stem != f"bench_{args.only}":
            continue
        print(f"== {bench.stem}", flush=True)
        started = time.time()
        module = _load(bench)
        options = {"out": args.out / bench.stem, "quick": args.quick}
        if args.budget_s is not None:
            if "budget_s" not in inspect.signature(module.run).parameters:
                parser.error(f"{bench.stem} has no time budget; --budget-s goes with --only gpu")
            options["budget_s"] = args.budget_s
        for row in module.run(**options):
            row.setdefault("bench", bench.stem)
            rows.append(row)
            save()
            mark = {True: "ok  ", False: "MISS", None: "n/a "}[row.get("ok")]
            print(f"  [{mark}] {row['name']:<58} {row['value']:>10.4g} {row['unit']:<6} "
                  f"target {row.get('target', '-'):<10} {row.get('note', '')}", flush=True)
        print(f"   ({time.time() - started:.0f} s)")
    save()
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
