"""Many processes, one run: shards are the unit of work and each process owns whole shards.

Locally a process pool; on a cluster the same shard lists become a SLURM job array through
submitit, each task a `ShardWork` that plans the run on its node and resumes from the markers when
it is requeued. Every shard is deterministic and its slots depend only on its index, so the lake
is the same whatever the number of workers.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tokenlake import store
from tokenlake.extract._loop import open_writer, work
from tokenlake.extract._plan import ExtractRequest, Plan, plan


def shard_groups(pending: list[int], n: int) -> list[list[int]]:
    """Round-robin, so every worker gets early and late shards alike."""
    return [g for g in (pending[i::n] for i in range(n)) if g]


@dataclasses.dataclass(frozen=True)
class ShardWork:
    """A cluster task: these shards of the run, planned on the task's node (a pickled request
    is small; a plan holds every input of the subset). Committed shards are skipped."""

    request: ExtractRequest
    shards: tuple[int, ...]

    def __call__(self, *, log=print) -> str:
        p = plan(self.request)
        open_writer(p)  # refuses a run made with another configuration before a model is built
        work(p, list(self.shards), log=log)
        done = open_writer(p).committed()
        return f"run {p.run}: {sum(s in done for s in self.shards)} of {len(self.shards)} shards"


def _worker(p: Plan, shards: list[int]) -> dict:
    if p.device.type == "cuda" and p.device.index is not None:
        # Before this process's first CUDA call. Without it the current device stays cuda:0, and
        # anything that uses the current device - leaving a `torch.cuda.stream(...)` block,
        # an allocation without an explicit device - makes a context (~500 MB) on GPU 0 in
        # every worker. set_device rather than CUDA_VISIBLE_DEVICES in the child: the pool's
        # processes inherit the parent's environment, torch caches the device count at the
        # first query, and device indices stay those the user and the logs name.
        torch.cuda.set_device(p.device.index)
    quiet = dataclasses.replace(p.request, quiet=True)
    return work(dataclasses.replace(p, request=quiet), shards, log=lambda _text: None)


def _local_device(p: Plan, index: int) -> Plan:
    """Worker `index`'s plan: with a plain "cuda" device, worker i runs on cuda:(i % GPUs); a
    device the user named by index (cuda:1) is every worker's."""
    if p.device.type == "cuda" and p.device.index is None:
        n = torch.cuda.device_count()
        if n:
            return dataclasses.replace(p, device=torch.device("cuda", index % n))
    return p


def run_parallel(p: Plan, *, log=print) -> None:
    writer = open_writer(p)
    pending = sorted(set(range(p.n_shards)) - writer.committed())
    groups = shard_groups(pending, p.request.workers)
    if not groups:
        return
    if p.request.executor == "slurm":
        _run_slurm(p, groups, log=log)
        return
    context = multiprocessing.get_context("spawn")  # CUDA and fork do not mix
    with cf.ProcessPoolExecutor(max_workers=len(groups), mp_context=context) as pool:
        futures = [pool.submit(_worker, _local_device(p, i), g) for i, g in enumerate(groups)]
        _watch(p, writer, [f.result for f in futures], lambda: all(f.done() for f in futures))


def _watch(p: Plan, writer, results, finished) -> None:
    """One progress bar for all workers, from the shard markers they commit."""
    bar = tqdm(total=p.n_shards, unit="shard", desc=p.run, disable=p.request.quiet,
               initial=len(writer.committed()))
    try:
        while not finished():
            time.sleep(0.5)
            bar.n = len(writer.committed())
            bar.refresh()
        for result in results:
            result()  # re-raises a worker's error here
        bar.n = len(writer.committed())
        bar.refresh()
    finally:
        bar.close()


def _run_slurm(p: Plan, groups: list[list[int]], *, log) -> None:
    """The groups as one job array (checkpointable tasks, retried as `tokenlake run` does);
    returns once every task succeeded, and the caller commits the manifest."""
    from tokenlake.extract._cluster import ClusterStep, Driver
    from tokenlake.extract._records import Submission
    from tokenlake.extract._slurmopts import request_options

    opts = request_options(p.request.slurm)
    request = dataclasses.replace(p.request, quiet=True)
    step = ClusterStep(id=f"extract.{p.run}", command=f"tokenlake extract ... --run {p.run}",
                       tasks=[ShardWork(request, tuple(g)) for g in groups], gpu=True)
    sub = Submission.create(Path(p.request.lake), steps=[step], executor="slurm",
                            cluster=opts.cluster, wait=True, file=None, options=opts.to_json())
    log(f"run {p.run}: {len(groups)} tasks through submitit ({opts.cluster}); records and logs "
        f"in {sub.dir}; rerun the same command to resume if they are interrupted")
    try:
        ok = Driver(sub, [step], opts, log=log).run()
    finally:
        sub.end()
    if not ok:
        raise store.LakeError(f"run {p.run}: some tasks failed (logs above); rerun the same "
                              "command to resume from the shards they committed")
