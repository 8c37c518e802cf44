"""Tasks that survive preemption.

A `Task` is a submitit `Checkpointable` around one piece of work (an extraction's shards, a
run's manifest, a probe, ...). When SLURM preempts it or its time limit nears, submitit calls
`checkpoint`, which requeues the same task: its work resumes from the lake's markers, since every
shard is committed on its own. Requeues and the runner's resubmissions share one budget per task
(`max_retries`); each is recorded (extract/_records.py).
"""

from __future__ import annotations

import os
import socket
import traceback

from submitit.helpers import Checkpointable

from tokenlake.extract._records import TaskRef, events, record, retries_used


def _job_id() -> str | None:
    try:
        import submitit

        return submitit.JobEnvironment().job_id
    except (RuntimeError, KeyError):  # not inside a submitit job (the serial runner)
        return None


# errors of the request itself: a retry would fail the same way
def _deterministic(err: BaseException) -> bool:
    from submitit.core.utils import UncompletedJobError

    from tokenlake.extract._models import ModelRequestError
    from tokenlake.extract._sources import SourceError
    from tokenlake.store import LakeError

    return isinstance(err, ValueError | TypeError | LookupError | FileNotFoundError | LakeError
                      | ModelRequestError | SourceError | UncompletedJobError)


class Task(Checkpointable):
    """`action(log=print)` run as a cluster task, with its events recorded."""

    def __init__(self, action, ref: TaskRef) -> None:
        self.action, self.ref = action, ref

    def __call__(self):
        return run_recorded(self.action, self.ref, log=_flushed_print, job=_job_id())

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on the scheduler's signal: requeue unless the budget is spent
        (returning None makes submitit end the task as failed)."""
        ref = self.ref
        used = retries_used(events(ref.dir), ref.attempt)
        if used >= ref.max_retries:
            record(ref, "gave_up", reason=f"interrupted by the scheduler after {used} retries "
                                          f"(max_retries {ref.max_retries})")
            return None
        record(ref, "requeued", retry=used + 1, max_retries=ref.max_retries, host=_host(),
               reason="interrupted by the scheduler's signal (preemption or time limit); "
                      "resumes from the lake's markers")
        return super().checkpoint(*args, **kwargs)


def run_recorded(action, ref: TaskRef, *, log, job: str | None = None):
    """Run `action` with started / done / failed events (the serial runner uses it too)."""
    record(ref, "started", host=_host(), pid=os.getpid(), job=job)
    try:
        summary = action(log=log)
    except Exception as err:
        record(ref, "failed", error=f"{type(err).__name__}: {err}"[:2000],
               retry=not _deterministic(err), trace=traceback.format_exc()[-6000:])
        raise
    record(ref, "done", summary=summary if isinstance(summary, str) else None)
    return summary


def _host() -> str:
    return socket.gethostname()


def _flushed_print(text: str) -> None:
    print(text, flush=True)  # a task's log is read while it runs
