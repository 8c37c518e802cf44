"""`tokenlake run FILE` (an experiment file, here or on a SLURM cluster) and `tokenlake status`
(where its steps stand). Only argument handling here: cli/_runner.py and cli/_status.py work."""

from __future__ import annotations

import argparse
import sys

from tokenlake.cli._options import add_lake

# flag -> the [slurm] key it overrides (extract/_slurmopts.py)
_CLUSTER_FLAGS = {
    "slurm_partition": "partition", "slurm_account": "account", "slurm_qos": "qos",
    "slurm_time": "time", "slurm_memory": "memory", "slurm_gpus": "gpus", "slurm_cpus": "cpus",
    "slurm_constraint": "constraint", "slurm_array_parallelism": "array_parallelism",
    "slurm_sbatch": "sbatch", "slurm_setup": "setup", "max_retries": "max_retries",
}


def register(sub) -> None:
    p = sub.add_parser("run", help="execute an experiment file, skipping what the lake holds "
                                   "(here, or as SLURM jobs with --executor slurm)")
    p.add_argument("file", metavar="EXPERIMENT",
                   help="an experiment file, or the name of one shipped with tokenlake (paper, "
                        "beyond, demo)")
    add_lake(p)
    p.add_argument("--device", default=None,
                   help="cuda, cpu (default: cuda if present; with --executor slurm, cuda when "
                        "tasks get GPUs)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--executor", choices=["local", "slurm"], default="local",
                   help="local: every step here, one after another; slurm: submit the file "
                        "through submitit, each extraction a job array over its shards, each "
                        "step after the steps it needs")
    p.add_argument("--no-wait", action="store_true",
                   help="slurm: submit every step with scheduler dependencies, print the job "
                        "ids and return (default: follow the jobs, retry failed tasks, report)")
    g = p.add_argument_group(
        "cluster options (with --executor slurm; each overrides the file's [slurm] key of the "
        "same name; repeated --slurm-sbatch/--slurm-setup lines add to the table's)")
    g.add_argument("--slurm-partition", metavar="NAME", help="SLURM partition")
    g.add_argument("--slurm-account", metavar="NAME", help="account charged")
    g.add_argument("--slurm-qos", metavar="NAME", help="quality of service")
    g.add_argument("--slurm-time", metavar="TIME", help="per task: minutes, H:MM:SS or D-H:MM:SS (default 240)")
    g.add_argument("--slurm-memory", metavar="SIZE", help="per task, e.g. 64G (SLURM --mem)")
    g.add_argument("--slurm-gpus", type=int, metavar="N", help="GPUs per task of the steps that use one "
                                                    "(default 1)")
    g.add_argument("--slurm-cpus", type=int, metavar="N",
                   help="CPUs per task, also its decoding processes (default 8)")
    g.add_argument("--slurm-constraint", metavar="FEATURES",
                   help="node features (SLURM --constraint, e.g. h100)")
    g.add_argument("--slurm-array-parallelism", type=int, metavar="N",
                   help="an extraction's shards go to at most this many tasks (default 16)")
    g.add_argument("--slurm-sbatch", action="append", default=[], metavar="LINE",
                   help="an extra sbatch option, e.g. '--mail-type=END' (repeatable; none by "
                        "default)")
    g.add_argument("--slurm-setup", action="append", default=[], metavar="LINE",
                   help="a shell line run before each task, e.g. 'module load cuda' "
                        "(repeatable; none by default)")
    g.add_argument("--max-retries", type=int, metavar="N",
                   help="per task: requeues after preemption or time limit, plus resubmissions "
                        "after a failure (default 3)")
    g.add_argument("--slurm-cluster", choices=["slurm", "local"], default="slurm",
                   help="local: the same tasks as processes of this machine, through "
                        "submitit's local executor (to try a file before queueing it)")
    p.set_defaults(func=run)

    p = sub.add_parser("status", help="where every run of the lake stands (with FILE: every "
                                      "step of an experiment file): done, running, failed or "
                                      "waiting, and the log of each failed task")
    p.add_argument("file", metavar="EXPERIMENT", nargs="?",
                   help="an experiment file run on the lake (or a shipped one's name)")
    add_lake(p)
    p.set_defaults(func=status)


def _flags(args: argparse.Namespace) -> dict:
    return {key: getattr(args, flag) for flag, key in _CLUSTER_FLAGS.items()}


def run(args: argparse.Namespace) -> int:
    from tokenlake.cli import _experiments
    from tokenlake.experiments import resolve_experiment

    exp = _experiments.load(resolve_experiment(args.file))

    def log(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr)

    if args.executor == "local":
        given = [f"--{f.replace('_', '-')}" for f in _CLUSTER_FLAGS
                 if getattr(args, f) not in (None, [])]
        given += ["--no-wait"] * args.no_wait + ["--slurm-cluster"] * (args.slurm_cluster != "slurm")
        if given:
            raise ValueError(f"{', '.join(given)} go(es) with --executor slurm")
        return _experiments.execute(exp, lake=args.lake, device=args.device, quiet=args.quiet,
                                    log=log)
    from tokenlake.cli._runner import run_cluster
    from tokenlake.extract import slurm_options

    opts = slurm_options(exp.slurm, where=str(args.file), flags=_flags(args),
                         cluster=args.slurm_cluster)
    return run_cluster(exp, lake=args.lake, opts=opts, device=args.device,
                       wait=not args.no_wait, log=log)


def status(args: argparse.Namespace) -> int:
    from tokenlake.cli._status import print_status
    from tokenlake.cli._status import status as rows_of

    if not args.lake.is_dir():
        raise FileNotFoundError(f"no lake at {args.lake}")
    exp = None
    if args.file:  # an experiment file resolves models: the extract extra
        from tokenlake.cli import _experiments
        from tokenlake.experiments import resolve_experiment

        exp = _experiments.load(resolve_experiment(args.file))
    print_status(rows_of(args.lake, exp), lake=args.lake)
    return 0
