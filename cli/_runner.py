"""Executing an experiment file's steps: here, one after another (`--executor local`), or as
submitit jobs on SLURM (`--executor slurm`), each extraction a job array over its shards.

Both record what they do under LAKE/.tokenlake/jobs/ (extract/_records.py), which `tokenlake
status` reads, and both refuse to start while another submission still runs a step of the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from tokenlake import store
from tokenlake.cli._steps import CommitRun, Step, build
from tokenlake.extract import (
    ClusterStep,
    Driver,
    ShardWork,
    SlurmOptions,
    Submission,
    check_scheduler,
    draw_subset,
    open_source,
    run_recorded,
    shard_groups,
)


def write_subsets(exp, lake: Path, log) -> None:
    """Subsets are drawn here, before anything runs: an array's size is its subset's shards."""
    for name, spec in exp.subsets.items():
        try:
            store.read_subset(lake, name)
        except (store.LakeError, FileNotFoundError):
            source = open_source(spec["data"], split=spec.get("split"))
            store.write_subset(lake, name, draw_subset(source, n=spec.get("n"),
                                                       seed=spec.get("seed", 42)))
            log(f"subset {name}: written")


def _file_meta(exp) -> dict:
    if exp.path is None:
        return {"file": None}
    path = Path(exp.path)
    return {"file": str(path.resolve()), "file_sha256": hashlib.sha256(path.read_bytes())
            .hexdigest() if path.is_file() else None}


def _refuse_live(lake: Path, steps) -> None:
    from tokenlake.cli._status import live_steps

    live = live_steps(lake, [s.id for s in steps])
    if live:
        shown = "; ".join(f"{k} ({v})" for k, v in list(live.items())[:5])
        raise ValueError(f"{len(live)} step(s) of this file are still queued or running: {shown}. "
                         f"Wait for them (`tokenlake status --lake {lake}`) or cancel them "
                         "(scancel) before running the file again; a runner gone for good "
                         f"(its machine lost): remove its record, {lake}/.tokenlake/jobs/ID")


def run_serial(exp, *, lake: Path, device: str | None, quiet: bool, log=print) -> int:
    write_subsets(exp, lake, log)
    steps = build(exp, lake=lake, device=device, quiet=quiet)
    _refuse_live(lake, steps)
    sub = Submission.create(lake, steps=steps, executor="local", cluster=None, wait=True,
                            options={"max_retries": 0}, **_file_meta(exp))
    try:
        for step in steps:
            log(f"$ {step.command}")
            summary = run_recorded(step.action, sub.ref(step.id, "0"), log=log)
            if summary:
                log(summary)
    finally:
        sub.end()
    return 0


def _expand(step: Step, lake: Path, opts: SlurmOptions) -> ClusterStep:
    """A step as cluster tasks: an extraction's pending shards dealt round-robin to at most
    `array_parallelism` tasks, then its manifest; a keep-if-outlier run is one task."""
    unit = ClusterStep(step.id, step.command, [step.action], needs=step.needs, gpu=step.gpu)
    if step.kind == "pixels":
        from tokenlake.extract import find_pixel_store

        if find_pixel_store(str(lake), step.action.subset, step.action.cfg,
                            decoder=step.action.decoder):
            unit.tasks, unit.skip = [], "complete in the lake"
    if step.request is None:
        return unit
    req = step.request
    run_dir = lake / "runs" / req.run
    if (run_dir / "manifest.json").is_file():
        unit.tasks, unit.skip = [], "complete in the lake"
    elif not req.keep_if_outlier:  # the run walks its subset in order: one task
        n_shards = -(-store.read_subset(lake, req.subset).num_rows // req.shard_size)
        done = {int(p.stem[1:]) for p in (run_dir / "shards").glob("s*.json")
                if p.stem[1:].isdigit()}
        pending = [i for i in range(n_shards) if i not in done]
        groups = shard_groups(pending, max(1, min(len(pending), opts.array_parallelism)))
        req = dataclasses.replace(req, workers=max(1, len(groups)))  # the manifest says so
        unit.tasks = [ShardWork(req, tuple(g)) for g in groups]
        unit.finish = CommitRun(req)
    return unit


def run_cluster(exp, *, lake: Path, opts: SlurmOptions, device: str | None, wait: bool,
                log=print, say=print, poll_s: float | None = None) -> int:
    """`log`: progress; `say`: what must be seen even with --quiet (job ids, the outcome)."""
    if not wait and opts.cluster == "local":
        raise ValueError("--no-wait needs a scheduler to start each job after the jobs it "
                         "needs; submitit's local executor has none: run without --no-wait")
    check_scheduler(opts)
    write_subsets(exp, lake, log)
    # the tasks' nodes decide nothing: every task of a run must plan the same configuration
    device = device or ("cuda" if opts.gpus else "cpu")
    steps = build(exp, lake=lake, device=device, quiet=True, executor="slurm",
                  decode_workers=max(1, min(8, opts.cpus - 1)), pixel_workers=opts.cpus)
    _refuse_live(lake, steps)
    units = [_expand(s, lake, opts) for s in steps]
    sub = Submission.create(lake, steps=units, executor="slurm", cluster=opts.cluster,
                            wait=wait, options=opts.to_json(), device=device, **_file_meta(exp))
    skipped = sum(u.skip is not None for u in units)
    log(f"submission {sub.id}: {len(units)} steps ({skipped} already complete) through "
        f"submitit ({opts.cluster}); records and logs in {sub.dir}")
    driver = Driver(sub, units, opts, log=log, poll_s=poll_s)
    follow = f"tokenlake status --lake {lake}" + (f" {exp.path}" if exp.path else "")
    if not wait:
        try:
            submitted = driver.submit_all()
        finally:
            sub.end()
        for step, ids in submitted.items():
            say(f"  {step}: job {' then '.join(ids)}")
        say(f"submitted; follow with `{follow}` (or `squeue --me`); logs in {sub.dir / 'logs'}")
        return 0
    try:
        ok = driver.run()
    finally:
        sub.end()
    say(("every step is done" if ok else "some steps did not end (above)") + f"; `{follow}`")
    return 0 if ok else 1
