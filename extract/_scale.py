"""Many processes, one run: shards are the unit of work and each process owns whole shards.

Locally a process pool; on a cluster the same shard lists become a SLURM job array through
submitit. Every shard is deterministic and its slots depend only on its index, so the lake is the
same whatever the number of workers.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tokenlake.extract._loop import open_writer, work
from tokenlake.extract._plan import Plan


def shard_groups(pending: list[int], n: int) -> list[list[int]]:
    """Round-robin, so every worker gets early and late shards alike."""
    return [g for g in (pending[i::n] for i in range(n)) if g]


def _worker(p: Plan, shards: list[int]) -> dict:
    quiet = dataclasses.replace(p.request, quiet=True)
    return work(dataclasses.replace(p, request=quiet), shards, log=lambda _text: None)


def _local_device(p: Plan, index: int) -> Plan:
    if p.device.type == "cuda" and p.device.index is None and torch.cuda.device_count() > 1:
        return dataclasses.replace(p, device=torch.device("cuda", index % torch.cuda.device_count()))
    return p


def run_parallel(p: Plan, *, log=print) -> None:
    writer = open_writer(p)
    pending = sorted(set(range(p.n_shards)) - writer.committed())
    groups = shard_groups(pending, p.request.workers)
    if not groups:
        return
    if p.request.executor == "slurm":
        jobs = _submit_slurm(p, groups, log=log)
        _watch(p, writer, [job.result for job in jobs], lambda: all(j.done() for j in jobs))
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


def _submit_slurm(p: Plan, groups: list[list[int]], *, log) -> list:
    import submitit

    opts = p.request.slurm
    folder = Path(p.request.lake) / "slurm" / p.run
    executor = submitit.AutoExecutor(folder=folder, cluster=opts.get("cluster", "slurm"))
    params = {"timeout_min": opts.get("time_min", 240), "tasks_per_node": 1, "nodes": 1,
              "gpus_per_node": opts.get("gpus", 1), "cpus_per_task": opts.get("cpus", 8),
              "slurm_array_parallelism": opts.get("array_parallelism", len(groups)),
              "name": f"tokenlake-{p.run}"}
    if opts.get("partition"):
        params["slurm_partition"] = opts["partition"]
    executor.update_parameters(**params)
    jobs = executor.map_array(_worker, [p] * len(groups), groups)
    log(f"submitted {len(jobs)} SLURM tasks for {p.run} (logs in {folder}); "
        "rerun the same command to resume if they are interrupted")
    return jobs
