"""`tokenlake status`: where every run of a lake (or every step of an experiment file) stands.

Read from the lake itself (shards committed of total, manifest present, pixel stores, neuron
rankings), the runner's records (LAKE/.tokenlake/jobs/, extract/_records.py) and, where it can be
asked, the scheduler: sacct for SLURM jobs, and for jobs on this machine whether their process
lives. A step is done, running, failed or waiting (queued, requeued, or not started).
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from tokenlake.extract import Submission, jobs_root, pid_alive, retries_used
from tokenlake.extract import job_events as events
from tokenlake.extract import job_failure as failure

_PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "SUSPENDED",
            "PREEMPTED", "RESIZING", "SIGNALING", "STAGE_OUT"}
_RUNNING = {"RUNNING", "COMPLETING"}


@dataclass
class Row:
    step: str
    state: str  # done | running | failed | waiting
    detail: str = ""
    logs: list[str] = field(default_factory=list)  # failed tasks' error logs
    retries: int = 0
    submission: str | None = None


def _alive(pid: int | str | None, host: str | None) -> bool | None:
    """Whether a process of this machine lives (None: another machine's, not asked)."""
    if pid is None or host != socket.gethostname():
        return None
    return pid_alive(pid)


class _Scheduler:
    """The scheduler's word on a task: 'pending' | 'running' | 'ended' | 'unknown', and its own."""

    def __init__(self) -> None:
        self._slurm: dict[str, object] = {}
        self._asked = False

    def want(self, sub: Submission, entry: dict | None) -> None:
        if entry and sub.data.get("cluster") == "slurm" and entry["job_id"] not in self._slurm:
            import submitit

            self._slurm[entry["job_id"]] = submitit.SlurmJob(
                folder=Path(entry["stderr"]).parent, job_id=entry["job_id"])

    def word(self, sub: Submission, entry: dict | None) -> tuple[str, str]:
        data = sub.data
        if data.get("cluster") == "slurm" and entry:
            if not self._asked:  # one sacct call for every job wanted
                import submitit

                submitit.SlurmJob.watcher.update()
                self._asked = True
            job = self._slurm[entry["job_id"]]
            state = job.watcher.get_state(entry["job_id"], mode="cache").split()[0].upper()
            kind = ("pending" if state in _PENDING else "running" if state in _RUNNING
                    else "unknown" if state == "UNKNOWN" else "ended")
            return kind, f"SLURM {state}"
        # a local submitit job's id is its controller's pid; a serial run is the runner itself,
        # which may live on after it ended (a test, a notebook)
        pid = entry["job_id"] if entry else data.get("pid")
        alive = _alive(pid, data.get("host"))
        if entry is None and data.get("ended"):
            alive = False
        if alive is None:
            return "unknown", f"process {pid} on {data.get('host')}, not asked"
        return ("running", f"process {pid} alive") if alive else ("ended", f"process {pid} gone")


def _task(sub: Submission, step: str, key: str, entry: dict | None,
          sched: _Scheduler) -> tuple[str, str, int]:
    attempt = entry["attempt"] if entry else 1
    evs = events(sub.ref(step, key).dir)
    mine = [e for e in evs if e["attempt"] == attempt]
    last = mine[-1] if mine else {"event": None}
    retries = retries_used(evs, attempt)
    kind = last["event"]
    if kind == "done":
        return "done", last.get("summary") or "", retries
    if kind in ("failed", "gave_up"):
        return "failed", failure(mine) or "", retries
    word, said = sched.word(sub, entry)
    if kind == "started":
        where = f"on {last.get('host')} since {last['time']}"
        if word == "ended":
            return "failed", f"stopped without an error ({said}): killed?", retries
        return "running", where, retries
    if word == "running":
        return "running", f"starting ({said})", retries
    if word == "ended":
        return "failed", f"ended before it started ({said}){_cancelled(said)}", retries
    if kind in ("requeued", "resubmitted"):
        return "waiting", f"{kind} ({said})", retries
    return "waiting", f"queued ({said})" if word == "pending" else f"not started ({said})", retries


def _cancelled(said: str) -> str:
    return ": a job it waits for failed" if "CANCELLED" in said else ""


def _latest(lake: Path) -> dict[str, tuple[Submission, dict]]:
    """For each step, the newest submission that submitted or ran it."""
    out = {}
    for sub in Submission.load_all(lake):
        for step, rec in sub.data["steps"].items():
            if rec.get("jobs") or (sub.data["executor"] == "local"
                                   and sub.ref(step, "0").dir.is_dir()):
                out[step] = (sub, rec)
    return out


def _entries(rec: dict) -> dict[str, dict]:
    """The job of the latest attempt of each task."""
    entries: dict[str, dict] = {}
    for e in rec.get("jobs", []):
        if e["task"] not in entries or e["attempt"] >= entries[e["task"]]["attempt"]:
            entries[e["task"]] = e
    return entries


def _scheduler(latest: dict[str, tuple[Submission, dict]]) -> _Scheduler:
    """One scheduler question for every job of interest (sacct answers for the ids asked)."""
    sched = _Scheduler()
    for sub, rec in latest.values():
        for entry in _entries(rec).values():
            sched.want(sub, entry)
    return sched


def _jobs_row(step: str, sub: Submission, rec: dict, sched: _Scheduler) -> Row:
    entries = _entries(rec)
    keys = list(entries) or ["0"]
    tasks = {k: _task(sub, step, k, entries.get(k), sched) for k in keys}
    states = [t[0] for t in tasks.values()]
    row = Row(step, "waiting", submission=sub.id, retries=sum(t[2] for t in tasks.values()))
    failed = {k: t for k, t in tasks.items() if t[0] == "failed"}
    row.logs = [entries[k]["stderr"] for k in failed if k in entries]
    if "running" in states:
        row.state = "running"
    elif failed:
        row.state = "failed"
    elif all(s == "done" for s in states):
        row.state = "done"
    counts = ", ".join(f"{states.count(s)} {s}" for s in ("done", "running", "waiting",
                                                           "failed") if states.count(s))
    first = next(iter(failed.values()), None) or next(
        (t for t in tasks.values() if t[0] == row.state), ("", "", 0))
    row.detail = "; ".join(x for x in (f"tasks: {counts}" if len(tasks) > 1 else "",
                                       first[1]) if x)
    return row


def _run_progress(lake: Path, run: str) -> tuple[bool, str]:
    from tokenlake import store

    d = lake / "runs" / run
    if (d / "manifest.json").is_file():
        m = store.open_lake(lake).manifest(run)
        return True, f"{m['n_images']} images in {m['n_shards']} shards"
    if not d.is_dir():
        return False, "not started"
    db = store.open_lake(lake)
    markers = db.markers(run)
    config = db.run_config(run)
    if config and config.get("keep_if_outlier"):
        kept = sum(m["n_images"] for m in markers.values())
        return False, f"{kept} of {config['n']} images kept, {len(markers)} shards"
    try:
        total = db.layout(run).n_shards
    except (store.LakeError, FileNotFoundError):
        total = "?"
    return False, f"{len(markers)}/{total} shards committed"


def _in_lake(lake: Path, step: str, action) -> tuple[bool, str] | None:
    """What the lake itself says of a step; None for steps that leave no trace to check."""
    kind, _, name = step.partition(".")
    if kind == "extract":
        return _run_progress(lake, name)
    if kind == "pixels":
        from tokenlake import store
        from tokenlake.extract import find_pixel_store

        try:
            found = find_pixel_store(str(lake), action.subset, action.cfg, decoder=action.decoder)
        except (store.LakeError, FileNotFoundError):  # its subset is not drawn yet
            return False, f"subset {action.subset} not drawn yet"
        return (True, f"complete ({found.name})") if found else (False, "not complete")
    if kind == "neurons":
        done = (lake / "neurons" / f"{name}.parquet").is_file()
        return done, "ranked" if done else "not ranked"
    return None


def status(lake: Path, exp=None) -> list[Row]:
    """One row per step of `exp`, else per run of the lake."""
    lake = Path(lake)
    if exp is not None:
        from tokenlake.cli._steps import build

        steps = [(s.id, s.needs, s.action) for s in build(exp, lake=lake, device=None,
                                                           quiet=True, strict=False)]
    else:
        runs = sorted(p.name for p in (lake / "runs").iterdir() if p.is_dir()) \
            if (lake / "runs").is_dir() else []
        steps = [(f"extract.{r}", (), None) for r in runs]
    latest = _latest(lake)
    sched = _scheduler(latest)
    rows: dict[str, Row] = {}
    for step, needs, action in steps:
        found = _in_lake(lake, step, action)
        row = _jobs_row(step, *latest[step], sched) if step in latest else Row(step, "waiting")
        if found is not None and (step not in latest or step.startswith(("extract.", "pixels."))):
            complete, said = found  # a run or a store is what its markers say
            if complete:
                row.state, row.logs = "done", []
            elif row.state == "done":  # every task ended well, the manifest is still to come
                row.state, said = "waiting", f"{said}; its tasks are done, not the step"
            row.detail = "; ".join(x for x in (said, row.detail if not complete else "") if x)
        elif step not in latest:
            row.detail = "not run yet"
        blocking = [n for n in needs if n in rows and rows[n].state != "done"]
        if row.state == "waiting" and blocking:
            failed = [n for n in blocking if rows[n].state == "failed"]
            row.detail = "; ".join(x for x in (row.detail, f"needs {', '.join(blocking)}" + (
                ", which failed" if failed else "")) if x)
        rows[step] = row
    return list(rows.values())


def live_steps(lake: Path, ids: list[str]) -> dict[str, str]:
    """Steps of `ids` that a submission still runs or holds in a queue, or whose runner still
    follows them here (it would submit or run them later)."""
    out = {}
    for sub in Submission.load_all(lake):
        if sub.runner_lives():
            for step, rec in sub.data["steps"].items():
                if step in ids and not rec.get("skip"):
                    out[step] = f"held by the runner of submission {sub.id} (process " \
                                f"{sub.data['pid']})"
    latest = {k: v for k, v in _latest(lake).items() if k in ids and k not in out}
    sched = _scheduler(latest)
    for step in ids:
        if step in latest:
            row = _jobs_row(step, *latest[step], sched)
            if row.state == "running" or (row.state == "waiting" and re.search(
                    r"queued|resubmitted", row.detail)):  # not "not started": nobody holds it
                out[step] = f"{row.state} in submission {row.submission}"
    return out


def print_status(rows: list[Row], *, lake: Path) -> None:
    if not rows:
        print(f"nothing in {lake}: no runs, no submissions")
        return
    width = max(len(r.step) for r in rows)
    print(f"{'step':<{width}}  {'state':<8} detail")
    for r in rows:
        extra = f" [{r.retries} retr{'y' if r.retries == 1 else 'ies'}]" if r.retries else ""
        print(f"{r.step:<{width}}  {r.state:<8} {r.detail}{extra}")
        for log in r.logs:
            print(f"{'':<{width}}  {'':<8} log: {log}")
    counts = {s: sum(r.state == s for r in rows) for s in ("done", "running", "waiting", "failed")}
    print(", ".join(f"{n} {s}" for s, n in counts.items()) + f" ({len(rows)} steps)")
    subs = sorted({r.submission for r in rows if r.submission})
    if subs:
        print(f"records and logs: {jobs_root(lake)}/{{{','.join(subs)}}}" if len(subs) > 1
              else f"records and logs: {jobs_root(lake) / subs[0]}")
