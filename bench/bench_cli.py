"""Start-up of the command line: `tokenlake --help`, `sql`, `runs`, `validate` and `cards` on a
small lake, each beside `python -c "import duckdb, pyarrow"` (the libraries any SQL answer needs)
measured in the same run, in interleaved rounds.

Goal (issue 12): each command within 0.5 s of that baseline. A row's value is the median wall time
of the command over the rounds, a fresh process each time (the console script, as a user runs it);
the note gives the baseline's median and the command's best. `python bench/run.py --only cli`.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

GOAL_S = 0.5  # over the baseline


def _tokenlake() -> list[str]:
    script = Path(sys.executable).with_name("tokenlake")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tokenlake.cli.main"]


def _lake(root: Path) -> Path:
    from tokenlake.store.testing import synthetic_run

    if root.exists():
        shutil.rmtree(root)
    synthetic_run(n_images=6, seed=1, blocks=3).write(root, "a")
    synthetic_run(n_images=6, seed=2, random_weights=True).write(root, "b")
    return root


def _time(argv: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    took = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    return took


def run(*, out: Path, quick: bool):
    out.mkdir(parents=True, exist_ok=True)
    lake = str(_lake(out / "lake"))
    cli = _tokenlake()
    commands = {
        "tokenlake --help": [*cli, "--help"],
        "tokenlake sql (a count over tokens)": [*cli, "sql", "--lake", lake,
                                                "SELECT run, count(*) FROM tokens GROUP BY run"],
        "tokenlake runs": [*cli, "runs", "--lake", lake],
        "tokenlake validate": [*cli, "validate", "--lake", lake],
        "tokenlake cards": [*cli, "cards", "--lake", lake],
    }
    baseline = [sys.executable, "-c", "import duckdb, pyarrow"]
    rounds = 3 if quick else 9
    times: dict[str, list[float]] = {"baseline": [], **{name: [] for name in commands}}
    for argv in [baseline, *commands.values()]:  # warm the page cache once, untimed
        _time(argv)
    for _ in range(rounds):  # interleaved: a slow moment of the machine hits every command
        times["baseline"].append(_time(baseline))
        for name, argv in commands.items():
            times[name].append(_time(argv))
    base = statistics.median(times["baseline"])
    yield {"name": 'python -c "import duckdb, pyarrow" (baseline)', "value": base, "unit": "s",
           "target": "-", "ok": None,
           "note": f"median of {rounds} rounds; best {min(times['baseline']):.3f} s"}
    for name in commands:
        value = statistics.median(times[name])
        yield {"name": f"{name}: start-up", "value": value, "unit": "s",
               "target": f"<= baseline + {GOAL_S} s", "ok": value <= base + GOAL_S,
               "note": f"{value - base:+.3f} s over the baseline ({base:.3f} s); best "
                       f"{min(times[name]):.3f} s; median of {rounds} rounds"}
