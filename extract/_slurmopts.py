"""Cluster options: an experiment file's `[slurm]` table and the `--slurm-*` flags, checked before
anything is submitted, and turned into submitit executor parameters.

Every task of a submission gets the same options; steps that need no GPU (a run's manifest,
neuron rankings, analyses, the report, PIL pixel stores) ask for none.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

CLUSTERS = ("slurm", "local")  # local: submitit's LocalExecutor, every task a process here


@dataclass(frozen=True)
class SlurmOptions:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: int = 240  # minutes per task (SLURM sends the checkpoint signal 90 s before)
    memory: str | None = None  # --mem per task, "64G"
    gpus: int = 1  # per task, for the steps that use one
    cpus: int = 8  # per task; also a task's decoding processes (not the node's core count)
    constraint: str | None = None
    array_parallelism: int = 16  # an extraction's shards go to at most this many tasks
    sbatch: tuple[str, ...] = ()  # extra "#SBATCH --key=value" lines
    setup: tuple[str, ...] = ()  # shell lines run before each task (module load, activate)
    max_retries: int = 3  # requeues after preemption or time limit + resubmissions, per task
    cluster: str = "slurm"  # a command-line choice, never in the table

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


TABLE_KEYS = tuple(f.name for f in fields(SlurmOptions) if f.name != "cluster")
_STRINGS = ("partition", "account", "qos", "constraint")
_COUNTS = {"gpus": 0, "cpus": 1, "array_parallelism": 1, "max_retries": 0}  # key: minimum
# sbatch options tokenlake sets itself, or that a table key sets
_MANAGED = {"array", "dependency", "output", "error", "job-name", "open-mode", "signal",
            "kill-on-invalid-dep", "wckey", "nodes", "ntasks-per-node"}
_OWN = {"partition": "partition", "account": "account", "qos": "qos", "time": "time",
        "mem": "memory", "gpus-per-node": "gpus", "cpus-per-task": "cpus",
        "constraint": "constraint"}


def slurm_options(table: dict, *, where: str, flags: dict | None = None,
                  cluster: str = "slurm") -> SlurmOptions:
    """The `[slurm]` table (unknown keys refused), then the flags given (None: not given); list
    flags (sbatch, setup) add lines after the table's."""
    unknown = sorted(set(table) - set(TABLE_KEYS))
    if unknown:
        raise ValueError(f"{where}: [slurm] has unknown key(s) {unknown}; known: "
                         f"{', '.join(TABLE_KEYS)}")
    merged = dict(table)
    for key, value in (flags or {}).items():
        if key not in TABLE_KEYS:
            raise ValueError(f"unknown cluster option {key!r}")
        if value is None or value == []:
            continue
        merged[key] = [*_lines(table.get(key, []), key, where), *value] if key in (
            "sbatch", "setup") else value
    if cluster not in CLUSTERS:
        raise ValueError(f"cluster must be one of {', '.join(CLUSTERS)}, not {cluster!r}")
    return _checked(merged, where, cluster)


def request_options(raw: dict) -> SlurmOptions:
    """ExtractRequest.slurm (Python API, `tokenlake extract --executor slurm`): the table's keys,
    plus `cluster`; `time_min` is the older name of `time`."""
    raw = dict(raw)
    cluster = raw.pop("cluster", "slurm")
    if "time_min" in raw:
        if "time" in raw:
            raise ValueError("ExtractRequest.slurm: give time or time_min, not both")
        raw["time"] = raw.pop("time_min")
    return slurm_options(raw, where="ExtractRequest.slurm", cluster=cluster)


def _checked(raw: dict, where: str, cluster: str) -> SlurmOptions:
    out = {"cluster": cluster}
    for key, value in raw.items():
        if key in _STRINGS:
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: [slurm] {key} must be a non-empty string")
            out[key] = value.strip()
        elif key in _COUNTS:
            if isinstance(value, bool) or not isinstance(value, int) or value < _COUNTS[key]:
                raise ValueError(f"{where}: [slurm] {key} must be an integer >= {_COUNTS[key]}, "
                                 f"not {value!r}")
            out[key] = value
        elif key == "time":
            out[key] = minutes(value, where=where)
        elif key == "memory":
            out[key] = memory(value, where=where)
        else:  # sbatch, setup
            out[key] = tuple(_lines(value, key, where))
    for line in out.get("sbatch", ()):
        sbatch_line(line, where=where)  # refused now, not at the first submission
    return SlurmOptions(**out)


def _lines(value, key: str, where: str) -> list[str]:
    if isinstance(value, str) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{where}: [slurm] {key} must be a list of non-empty strings "
                         f"(one line each), not {value!r}")
    return [v.strip() for v in value]


_DAYS = re.compile(r"(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?")
_HMS = re.compile(r"(\d+):(\d+):(\d+)")


def minutes(value, *, where: str = "time") -> int:
    """Minutes from an integer or SLURM's `H:MM:SS`, `D-H`, `D-H:MM`, `D-H:MM:SS`; seconds round
    up. `4:00` is refused: SLURM reads it as four minutes, a reader as four hours."""
    if isinstance(value, int) and not isinstance(value, bool):
        total = value * 60
    elif isinstance(value, str) and value.strip().isdigit():
        total = int(value) * 60
    elif isinstance(value, str) and (m := _DAYS.fullmatch(value.strip())):
        d, h, mi, s = (int(x or 0) for x in m.groups())
        total = ((d * 24 + h) * 60 + mi) * 60 + s
    elif isinstance(value, str) and (m := _HMS.fullmatch(value.strip())):
        h, mi, s = (int(x) for x in m.groups())
        total = (h * 60 + mi) * 60 + s
    else:
        raise ValueError(f"{where}: [slurm] time {value!r}: give minutes (240) or H:MM:SS "
                         "(4:00:00) or D-H:MM:SS (1-00:00:00)")
    if total <= 0:
        raise ValueError(f"{where}: [slurm] time must be positive, not {value!r}")
    return -(-total // 60)


_MEM = re.compile(r"(\d+)\s*([KMGT])B?", re.IGNORECASE)


def memory(value, *, where: str = "memory") -> str:
    """SLURM's --mem: an integer (GB) or a size with a unit, `64G`, `500M`, `1TB`."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return f"{value}G"
    if isinstance(value, str) and (m := _MEM.fullmatch(value.strip())) and int(m.group(1)) > 0:
        return f"{int(m.group(1))}{m.group(2).upper()}"
    raise ValueError(f"{where}: [slurm] memory {value!r}: give GB as an integer (64) or a size "
                     "with a unit (64G, 500M)")


def sbatch_line(line: str, *, where: str = "sbatch") -> tuple[str, str | bool]:
    """`#SBATCH --mail-type=END`, `--mail-type END` or `--exclusive` -> (key, value or True)."""
    text = line.strip()
    if text.startswith("#SBATCH"):
        text = text[len("#SBATCH"):].strip()
    if not text.startswith("--") or len(text) < 3:
        raise ValueError(f"{where}: [slurm] sbatch line {line!r}: write a long option, "
                         "e.g. '--mail-type=END' (short options like -p are not read)")
    key, sep, value = text[2:].partition("=")
    if not sep:
        key, _, value = key.partition(" ")
    key, value = key.strip(), value.strip()
    if key in _MANAGED:
        raise ValueError(f"{where}: [slurm] sbatch line {line!r}: tokenlake sets --{key} itself")
    if key in _OWN:
        raise ValueError(f"{where}: [slurm] sbatch line {line!r}: use the [slurm] key "
                         f"{_OWN[key]!r} (flag --slurm-{_OWN[key].replace('_', '-')})")
    return key, value or True


def executor_parameters(opts: SlurmOptions, *, gpu: bool, name: str,
                        after: tuple[str, ...] = ()) -> dict:
    """Parameters of submitit's SlurmExecutor for one step: `after` are job ids it waits for
    (afterok; a failed one cancels it rather than leaving it pending for ever)."""
    extra = dict(sbatch_line(line) for line in opts.sbatch)
    params = {"job_name": name, "time": opts.time, "cpus_per_task": opts.cpus, "nodes": 1,
              "ntasks_per_node": 1, "array_parallelism": opts.array_parallelism,
              "setup": list(opts.setup)}
    if gpu and opts.gpus:
        params["gpus_per_node"] = opts.gpus
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(opts, key):
            params[key] = getattr(opts, key)
    if opts.memory:
        params["mem"] = opts.memory
    if after:
        params["dependency"] = "afterok:" + ":".join(after)
        extra["kill-on-invalid-dep"] = "yes"
    if extra:
        params["additional_parameters"] = extra
    return params
