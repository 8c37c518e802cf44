"""Render a `make bench` results file as the Markdown table of docs/BENCH.md.

    python bench/table.py bench-out/results.json > table.md
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def table(result: dict) -> str:
    lines = ["| bench | measurement | value | target | ok | note |", "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        value = row["value"]
        shown = "-" if isinstance(value, float) and math.isnan(value) else f"{value:.4g} {row['unit']}"
        ok = {True: "yes", False: "**no**", None: "-"}[row.get("ok")]
        note = str(row.get("note", "")).replace("|", "\\|")
        lines.append(f"| {row['bench'].removeprefix('bench_')} | {row['name']} | {shown} | "
                     f"{row.get('target', '-')} | {ok} | {note} |")
    return "\n".join(lines)


def header(result: dict) -> str:
    d = result["device"]
    gpu = f", gpu {d['gpu']}" if d.get("gpu") else ""
    return (f"Recorded by `make bench`: cpu_count {d['cpu_count']}, python {d['python']}, torch "
            f"{d['torch']}, cuda {d['cuda']}{gpu}; {result['when']} UTC.")


def main(argv: list[str]) -> int:
    result = json.loads(Path(argv[0]).read_text())
    print(header(result))
    print()
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
