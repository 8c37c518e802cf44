"""Steps on a cluster: submitting them through submitit and following them to the end.

A step is one or more tasks (an extraction's shards: one job array) and, optionally, a `finish`
task that runs once they all succeeded (the run's manifest). A graph of steps runs one of two ways:

- `Driver.submit_all` (`tokenlake run --no-wait`): every step at once, each job waiting for the
  jobs of the steps it needs (SLURM `afterok`; a failed one cancels its dependents). Preempted and
  timed-out tasks requeue themselves; a failed task stays failed until `tokenlake run` is rerun.
- `Driver.run` (the default): this process submits a step once the steps it needs are done,
  resubmits a failed task while its retry budget lasts (its shards resume from their markers)
  and reports. submitit's local executor has no scheduler to hold jobs back: it runs only so.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from tokenlake.extract._records import (
    Submission,
    TaskRef,
    events,
    failure,
    now,
    record,
    retries_used,
)
from tokenlake.extract._slurmopts import SlurmOptions, executor_parameters
from tokenlake.extract._tasks import Task


@dataclass
class ClusterStep:
    id: str
    command: str  # the equivalent tokenlake command line
    tasks: list = field(default_factory=list)  # actions, `action(log=...)`; several: a job array
    finish: object | None = None  # an action run after every task succeeded
    needs: tuple[str, ...] = ()  # ids of earlier steps
    gpu: bool = False
    skip: str | None = None  # why nothing is submitted (e.g. the run is in the lake)


def check_scheduler(opts: SlurmOptions) -> None:
    """Before anything is recorded: SLURM's commands must be here (submitit needs both)."""
    missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
    if opts.cluster == "slurm" and missing:
        raise ValueError(f"--executor slurm: no `{'`, `'.join(missing)}` on this machine's PATH: "
                         "submit from a SLURM login node, or try the same tasks here with "
                         "--slurm-cluster local")


def make_executor(folder: Path, opts: SlurmOptions, *, gpu: bool, name: str,
                  after: tuple[str, ...] = ()):
    import submitit

    if opts.cluster == "local":
        if after:
            raise ValueError("submitit's local executor cannot hold a job until others end: "
                             "run without --no-wait")
        ex = submitit.LocalExecutor(folder, max_num_timeout=opts.max_retries)
        ex.update_parameters(timeout_min=opts.time, gpus_per_node=opts.gpus if gpu else 0,
                             setup=list(opts.setup))
        return ex
    check_scheduler(opts)
    ex = submitit.SlurmExecutor(folder, max_num_timeout=opts.max_retries)
    ex.update_parameters(**executor_parameters(opts, gpu=gpu, name=name, after=after))
    return ex


def outcome(job, ref: TaskRef, *, shared_disk: bool = True) -> tuple[str, str]:
    """('running' | 'done' | 'failed', why) of a submitted task: why from the task's own failed
    event, else submitit's trace, else the scheduler's state (a task killed without a word)."""
    from submitit.core.utils import UncompletedJobError

    if not job.done():
        return "running", ""
    if not shared_disk and not job.paths.result_pickle.exists():
        err = UncompletedJobError("has not produced any output")  # no slow disk to wait for
    else:
        try:
            err = job.exception()  # waits a little for a result file on a slow shared disk
        except UncompletedJobError as e:
            err = e
    if err is None:
        return "done", ""
    said = failure([e for e in events(ref.dir) if e["attempt"] == ref.attempt])
    if said is not None:
        return "failed", said
    if "has not produced any output" in str(err):
        return "failed", f"ended without a result (scheduler state {job.state}): killed?"
    parts = str(err).split("-" * 22)  # FailedJobError: message, trace, hint
    lines = [t for t in (parts[1] if len(parts) > 2 else str(err)).splitlines() if t.strip()]
    return "failed", lines[-1].strip() if lines else type(err).__name__


@dataclass
class _Live:
    jobs: dict = field(default_factory=dict)  # task key -> submitit job
    attempts: dict = field(default_factory=dict)  # task key -> attempt
    ended: dict = field(default_factory=dict)  # task key -> "done" | "failed"


class Driver:
    def __init__(self, sub: Submission, steps: list[ClusterStep], opts: SlurmOptions, *,
                 log=print, poll_s: float | None = None) -> None:
        ids = set()
        for s in steps:
            missing = [n for n in s.needs if n not in ids]
            if missing:
                raise ValueError(f"step {s.id} needs {missing}, not an earlier step")
            if not (s.skip or s.tasks or s.finish is not None):
                raise ValueError(f"step {s.id} has nothing to run")
            ids.add(s.id)
        self.sub, self.steps, self.opts, self.log = sub, steps, opts, log
        self.poll_s = poll_s if poll_s is not None else (0.5 if opts.cluster == "local" else 15)

    # -- submission ---------------------------------------------------------------------------

    def _submit(self, step: ClusterStep, actions: dict, *, attempt: int = 1,
                after: tuple[str, ...] = ()) -> dict:
        folder = self.sub.dir / "logs" / step.id
        gpu = step.gpu and "finish" not in actions  # a run's manifest needs no GPU
        ex = make_executor(folder, self.opts, gpu=gpu, name=f"tl-{step.id}"[:100], after=after)
        tasks = [Task(a, self.sub.ref(step.id, key, attempt)) for key, a in actions.items()]
        jobs = ex.submit_array(tasks)
        for key, job in zip(actions, jobs):
            self.sub.add_job(step.id, {
                "task": key, "attempt": attempt, "job_id": str(job.job_id),
                "array_id": str(job.job_id).split("_")[0] if len(jobs) > 1 else None,
                "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
                "after": list(after), "submitted": now()})
        return dict(zip(actions, jobs))

    def submit_all(self) -> dict[str, list[str]]:
        """Every step at once with scheduler dependencies; returns step -> job ids."""
        final: dict[str, str] = {}
        out: dict[str, list[str]] = {}
        for step in self.steps:
            if step.skip:
                continue
            after = tuple(final[n] for n in step.needs if n in final)
            ids = []
            if step.tasks:
                jobs = self._submit(step, dict(enumerate_tasks(step)), after=after)
                first = str(next(iter(jobs.values())).job_id).split("_")[0]
                ids.append(first if len(jobs) == 1 else f"{first} (array of {len(jobs)})")
                after = (first,)
            if step.finish is not None:
                job = self._submit(step, {"finish": step.finish}, after=after)["finish"]
                ids.append(str(job.job_id))
                after = (str(job.job_id),)
            final[step.id] = after[0]
            out[step.id] = ids
        return out

    # -- following ----------------------------------------------------------------------------

    def run(self) -> bool:
        """Submit each step when its needs are done; True when every step ended done."""
        state = {s.id: "done" if s.skip else "waiting" for s in self.steps}
        live = {s.id: _Live() for s in self.steps}
        while True:
            for step in self.steps:
                if state[step.id] == "waiting":
                    state[step.id] = self._start(step, state, live[step.id])
                elif state[step.id] == "running":
                    state[step.id] = self._follow(step, live[step.id])
            if not any(v in ("waiting", "running") for v in state.values()):
                return all(v == "done" for v in state.values())
            time.sleep(self.poll_s)

    def _start(self, step: ClusterStep, state: dict, live: _Live) -> str:
        bad = [n for n in step.needs if state[n] in ("failed", "blocked")]
        if bad:
            self.log(f"blocked {step.id}: needs {', '.join(bad)}, which did not end")
            return "blocked"
        if any(state[n] != "done" for n in step.needs):
            return "waiting"
        actions = dict(enumerate_tasks(step)) or {"finish": step.finish}
        live.jobs.update(self._submit(step, actions))
        live.attempts.update(dict.fromkeys(actions, 1))
        self.log(f"submitted {step.id}: {self._describe(live, actions)}")
        return "running"

    def _follow(self, step: ClusterStep, live: _Live) -> str:
        for key, job in list(live.jobs.items()):
            if key in live.ended:
                continue
            result, why = outcome(job, self.sub.ref(step.id, key, live.attempts[key]),
                                  shared_disk=self.opts.cluster != "local")
            if result == "running":
                continue
            if result == "done":
                live.ended[key] = "done"
            elif not self._retry(step, key, live, why):
                live.ended[key] = "failed"
                self.log(f"failed {step.id} task {key}: {why}; log: {job.paths.stderr}")
        if len(live.ended) < len(live.jobs):
            return "running"
        if "failed" in live.ended.values():
            return "failed"
        if step.finish is not None and "finish" not in live.jobs:
            live.jobs.update(self._submit(step, {"finish": step.finish}))
            live.attempts["finish"] = 1
            self.log(f"submitted {step.id}: {self._describe(live, ['finish'])}")
            return "running"
        self.log(f"done {step.id}")
        return "done"

    def _retry(self, step: ClusterStep, key: str, live: _Live, why: str) -> bool:
        attempt = live.attempts[key]
        evs = events(self.sub.ref(step.id, key, attempt).dir)
        mine = [e for e in evs if e["attempt"] == attempt]
        if any(e["event"] == "gave_up" or (e["event"] == "failed" and not e["retry"])
               for e in mine):
            return False  # an error of the request itself, or requeues spent
        used = retries_used(evs, attempt)
        if used >= self.opts.max_retries:
            return False
        ref = self.sub.ref(step.id, key, attempt + 1)
        record(ref, "resubmitted", retry=used + 1, max_retries=self.opts.max_retries, why=why)
        action = step.finish if key == "finish" else dict(enumerate_tasks(step))[key]
        live.jobs.update(self._submit(step, {key: action}, attempt=attempt + 1))
        live.attempts[key] = attempt + 1
        self.log(f"resubmitted {step.id} task {key} (retry {used + 1} of "
                 f"{self.opts.max_retries}): {why}")
        return True

    def _describe(self, live: _Live, keys) -> str:
        jobs = [live.jobs[k] for k in keys]
        where = Path(jobs[0].paths.stderr).parent
        ids = ", ".join(str(j.job_id) for j in jobs)
        kind = "the run's manifest" if list(keys) == ["finish"] else f"{len(jobs)} task(s)"
        return f"{kind}, job {ids} (logs in {where})"


def enumerate_tasks(step: ClusterStep):
    return ((str(i), a) for i, a in enumerate(step.tasks))
