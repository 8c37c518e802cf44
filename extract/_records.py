"""The runner's records of what it submitted and what each task did: LAKE/.tokenlake/jobs/ (house-
keeping beside the lake, not its data contract).

`<submission>/submission.json` is written by the runner alone: the file it ran, the options, each
step with the command a user would type, the steps it needs, and its jobs (ids, attempts, log
paths). `<submission>/tasks/<step>.<task>/a<attempt>.<n>.<event>.json` is one file per event of a
task (started, done, failed, requeued, gave_up, resubmitted), so that tasks on different nodes
never write the same file. Standard library and tokenlake.store only: `tokenlake status` reads
them without a cluster library.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tokenlake.store._io import read_json, write_json

JOBS = Path(".tokenlake") / "jobs"


def jobs_root(lake: str | Path) -> Path:
    return Path(lake) / JOBS


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def pid_alive(pid: int | str) -> bool:
    """Whether a process of this machine lives; a finished child nobody reaped (a zombie) does
    not."""
    stat = Path(f"/proc/{int(pid)}/stat")
    if stat.exists():
        return stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class TaskRef:
    """Where a task's events go, and its retry budget."""

    lake: str
    submission: str
    step: str
    task: str  # "0", "1", ... (an array's tasks) or "finish"
    attempt: int = 1  # 2, 3, ...: resubmitted by the runner after a failure
    max_retries: int = 3

    @property
    def dir(self) -> Path:
        return jobs_root(self.lake) / self.submission / "tasks" / f"{self.step}.{self.task}"


def record(ref: TaskRef, kind: str, **fields) -> None:
    """One event file; `n` orders the events of an attempt (one process per task at a time)."""
    ref.dir.mkdir(parents=True, exist_ok=True)
    prefix = f"a{ref.attempt:02d}."
    n = sum(1 for p in ref.dir.iterdir() if p.name.startswith(prefix) and p.suffix == ".json")
    write_json(ref.dir / f"{prefix}{n:03d}.{kind}.json",
               {"event": kind, "time": now(), "attempt": ref.attempt, **fields})


def events(folder: Path) -> list[dict]:
    """A task's events in order (attempt, then sequence)."""
    if not folder.is_dir():
        return []
    return [read_json(p) for p in sorted(folder.glob("a*.json"))]


def failure(evs: list[dict]) -> str | None:
    """Why an attempt failed, from its events: a spent retry budget says so first."""
    for kind, key in (("gave_up", "reason"), ("failed", "error")):
        said = [e[key] for e in evs if e["event"] == kind]
        if said:
            return said[-1]
    return None


def retries_used(evs: list[dict], attempt: int) -> int:
    """Requeues of every attempt so far, plus the resubmissions that made `attempt`."""
    return sum(e["event"] == "requeued" for e in evs) + attempt - 1


class Submission:
    """LAKE/.tokenlake/jobs/<id>/submission.json: what one `tokenlake run` submitted."""

    def __init__(self, lake: Path, data: dict) -> None:
        self.lake, self.data = Path(lake), data

    @classmethod
    def create(cls, lake: Path, *, steps: list, **meta) -> Submission:
        """`steps`: objects with id, command, needs, gpu (and skip: why nothing runs)."""
        # UTC to the microsecond first: ids sort in the order they were made, across machines
        sid = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f") + "-" + uuid.uuid4().hex[:4]
        data = {"id": sid, "created": now(), "host": socket.gethostname(), "pid": os.getpid(),
                **meta,
                "steps": {s.id: {"command": s.command, "needs": list(s.needs), "gpu": s.gpu,
                                 "skip": getattr(s, "skip", None), "jobs": []} for s in steps}}
        sub = cls(lake, data)
        sub.save()
        return sub

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def dir(self) -> Path:
        return jobs_root(self.lake) / self.id

    def save(self) -> None:
        write_json(self.dir / "submission.json", self.data)

    def add_job(self, step: str, entry: dict) -> None:
        self.data["steps"][step]["jobs"].append(entry)
        self.save()

    def end(self) -> None:
        """The runner is done following (its jobs may still be queued: the scheduler says)."""
        self.data["ended"] = now()
        self.save()

    def runner_lives(self) -> bool:
        """Whether the runner that follows this submission still runs here (False when it ended
        or is gone; on another machine it cannot be asked, and its jobs speak for it)."""
        if self.data.get("ended") or not self.data.get("wait"):
            return False
        if self.data.get("host") != socket.gethostname():
            return False
        return pid_alive(self.data["pid"])

    def ref(self, step: str, task: str, attempt: int = 1) -> TaskRef:
        return TaskRef(str(self.lake), self.id, step, task, attempt,
                       self.data.get("options", {}).get("max_retries", 3))

    @staticmethod
    def load_all(lake: Path) -> list[Submission]:
        """Every submission of the lake, oldest first (ids start with their UTC time)."""
        root = jobs_root(lake)
        paths = sorted(root.glob("*/submission.json")) if root.is_dir() else []
        return [Submission(lake, read_json(p)) for p in paths]
