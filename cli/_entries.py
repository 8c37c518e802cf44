"""The `[[analyses]]`, `[[probes]]` and `[report]` entries of an experiment file: checked when the
file is loaded (an unknown key or a key given to a probe that does not take it is an error, never
ignored), turned into keyword arguments of tokenlake.analyze and tokenlake.probes, and into the
equivalent command line for the log."""

from __future__ import annotations

import shlex
from pathlib import Path

from tokenlake.cli._analyze_cmd import JOB_NAMES

ANALYSIS_KEYS = ("name", "runs", "out", "percentile", "images")
REPORT_KEYS = ("out", "runs", "subset", "percentile")
PROBES = ("position", "reconstruct", "classify", "heads", "registers", "sweep")
_HEAD_PAIRS = (("run", "head"), ("run_without", "head_without"),
               ("run_with_registers", "head_with_registers"))
# options beyond name/run/force/seed, and the probes that take them (as `tokenlake probe`)
_OPTIONS = {"test_run": ("classify",), "train_run": ("registers",),
            "tokens": ("position", "reconstruct", "classify", "sweep"),
            "target": ("reconstruct",), "head": ("heads", "registers"), "tops": ("sweep",),
            "run_without": ("heads",), "head_without": ("heads",),
            "run_with_registers": ("heads",), "head_with_registers": ("heads",)}
_FLOATS = ("lrs", "tops")


def _hyper(name: str) -> dict:
    """The probe's hyper-parameters and their defaults (probes/README.md)."""
    from tokenlake.probes import _classify, _position, _reconstruct, _registers

    return {"position": _position.DEFAULTS, "sweep": _position.DEFAULTS,
            "reconstruct": _reconstruct.DEFAULTS, "classify": _classify.DEFAULTS,
            "registers": _registers.DEFAULTS, "heads": {}}[name]


def check_analysis(entry: dict, where: str) -> None:
    if entry.get("name") not in (*JOB_NAMES, "all"):
        raise ValueError(f"{where}: name must be one of {', '.join((*JOB_NAMES, 'all'))}, not "
                         f"{entry.get('name')!r}")
    unknown = sorted(set(entry) - set(ANALYSIS_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {', '.join(ANALYSIS_KEYS)}")
    _percentile(entry, where)
    if "images" in entry and entry["name"] not in ("maps", "all"):
        raise ValueError(f"{where}: images goes with the maps analysis")


def check_report(options: dict, where: str) -> None:
    unknown = sorted(set(options) - set(REPORT_KEYS))
    if unknown:
        raise ValueError(f"{where}: [report] has unknown key(s) {unknown}; known: "
                         f"{', '.join(REPORT_KEYS)}")
    _percentile(options, where)


def _percentile(entry: dict, where: str) -> None:
    p = entry.get("percentile", 0.98)
    if not isinstance(p, int | float) or not 0 < p < 1:
        raise ValueError(f"{where}: percentile must be in (0, 1), not {p!r}")


def check_probe(entry: dict, where: str) -> None:
    name = entry.get("name")
    if name not in PROBES:
        raise ValueError(f"{where}: name must be one of {', '.join(PROBES)}, not {name!r}")
    hyper = _hyper(name)
    for key in entry:
        if key in ("name", "run", "force", "seed") or key in hyper:
            continue
        if key in ("device", "quiet"):
            raise ValueError(f"{where}: {key} is the runner's (`tokenlake run --{key}`)")
        if key not in _OPTIONS:
            raise ValueError(f"{where}: unknown key {key!r} for probe {name}; its options: "
                             f"{', '.join(sorted({*hyper, *_takes(name)}))}")
        if name not in _OPTIONS[key]:
            raise ValueError(f"{where}: {key} does not apply to probe {name} (only "
                             f"{', '.join(_OPTIONS[key])})")
    if name == "heads":
        given = [(r, h) for r, h in _HEAD_PAIRS if entry.get(r) or entry.get(h)]
        if not given or any(not (entry.get(r) and entry.get(h)) for r, h in given):
            raise ValueError(f"{where}: heads needs run with head, or run_without with "
                             "head_without and/or run_with_registers with head_with_registers")
    elif not entry.get("run"):
        raise ValueError(f"{where}: probe {name} needs run")
    for key in _FLOATS:
        if key in entry:
            _floats(entry[key], f"{where}: {key}")


def _takes(name: str) -> list[str]:
    return ["run", "force", "seed", *(k for k, v in _OPTIONS.items() if name in v)]


def _floats(value, where: str) -> tuple[float, ...]:
    try:
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(float(v) for v in items if str(v).strip())
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be numbers (a list or '1e-3,1e-2'), not {value!r}") \
            from None


def analysis_kwargs(entry: dict) -> list[tuple[str, dict]]:
    """(job, keyword arguments) per analysis job of the entry, as `tokenlake analyze` calls them."""
    names = JOB_NAMES if entry["name"] == "all" else (entry["name"],)
    runs = entry.get("runs")
    common = {"runs": ",".join(runs) if isinstance(runs, list) else runs,
              "out": entry.get("out"), "percentile": entry.get("percentile", 0.98)}
    return [(n, {**common, **({"images": entry["images"]} if n == "maps" and entry.get("images")
                              else {})}) for n in names]


def probe_calls(entry: dict, *, device: str | None, quiet: bool) -> list[tuple[str, tuple, dict]]:
    """(tokenlake.probes function, positional, keyword arguments) per call of the entry."""
    name = entry["name"]
    common = {"device": device, "quiet": quiet, "force": bool(entry.get("force", False))}
    if "seed" in entry:
        common["seed"] = int(entry["seed"])
    if name == "heads":
        return [("heads", (entry[r], entry[h]), common) for r, h in _HEAD_PAIRS if entry.get(r)]
    kwargs = dict(common)
    for key, value in entry.items():
        if key in ("name", "run", "force", "seed"):
            continue
        kwargs[key] = _floats(value, key) if key in _FLOATS else value
    return [(name, (entry["run"],), kwargs)]


def report_kwargs(options: dict) -> dict:
    runs = options.get("runs")
    return {"out": options.get("out"), "runs": ",".join(runs) if isinstance(runs, list) else runs,
            "percentile": options.get("percentile", 0.98),
            **({"subset": options["subset"]} if "subset" in options else {})}


def argv(command: str, flags: dict, *, lake: Path | None = None, positional: bool = True) -> str:
    """The command line that does the same work: `tokenlake COMMAND [NAME] --lake L --key v`."""
    words = ["tokenlake", command]
    flags = dict(flags)
    if positional and "name" in flags:
        words.append(str(flags.pop("name")))
    if lake is not None:
        words += ["--lake", str(lake)]
    for key, value in flags.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        else:
            words += [flag, ",".join(map(str, value)) if isinstance(value, list | tuple)
                      else str(value)]
    return shlex.join(words)
