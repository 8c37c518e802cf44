"""One extraction run end to end: plan, extract the pending shards (here, in a local process pool
or as a SLURM job array), then commit the manifest. Rerunning the same request resumes.

A cluster task runs a part: `_scale.ShardWork` (an array task's shards), `commit_run` (the
manifest, once they are all done) or `extract_here` (a whole run in one task)."""

from __future__ import annotations

import time
from dataclasses import asdict
from importlib.metadata import version

import timm
import torch

from tokenlake import store
from tokenlake.extract._loop import open_writer, work
from tokenlake.extract._models import meta_backbone
from tokenlake.extract._plan import ExtractRequest, Plan, meta_layout, plan
from tokenlake.extract._preprocess import data_config
from tokenlake.extract._scale import run_parallel


def extract(request: ExtractRequest, *, log=print) -> dict:
    """Run (or resume) an extraction; returns the run's manifest."""
    started = time.time()
    p = plan(request)
    if (done := _complete(p, log)) is not None:
        return done
    if request.workers > 1 or request.executor == "slurm":
        run_parallel(p, log=log)
        return _commit(p, started, {}, last=p.n_shards - 1)
    return _here(p, started, log)


def extract_here(request: ExtractRequest, *, log=print) -> dict:
    """The whole run in this process, whatever `request.executor` says: the body of a cluster
    task for a run that cannot be split (keep-if-outlier walks its subset in order)."""
    started = time.time()
    p = plan(request)
    if (done := _complete(p, log)) is not None:
        return done
    return _here(p, started, log)


def commit_run(request: ExtractRequest, *, log=print) -> dict:
    """The manifest of a run whose shards other processes wrote; refuses while any is missing."""
    started = time.time()
    p = plan(request)
    if (done := _complete(p, log)) is not None:
        return done
    return _commit(p, started, {}, last=p.n_shards - 1)


def _complete(p: Plan, log) -> dict | None:
    if open_writer(p).manifest_path.exists():
        log(f"run {p.run} is already complete in {p.request.lake}")
        return store.open_lake(p.request.lake).manifest(p.run)
    if p.weights.is_random:
        log("NOTE: RANDOM WEIGHTS - this run's numbers describe an untrained network, not "
            f"{p.spec.timm_name}")
    return None


def _here(p: Plan, started: float, log) -> dict:
    timing = work(p, log=log)
    return _commit(p, started, timing, last=timing["last_shard"])


def _commit(p: Plan, started: float, timing: dict, *, last: int) -> dict:
    writer = open_writer(p)
    missing = sorted(set(range(last + 1)) - writer.committed())
    if missing:
        raise store.LakeError(f"run {p.run}: shards {missing[:10]} were not written; rerun the "
                              "same command to resume")
    n_shards = last + 1 if p.request.keep_if_outlier else p.n_shards
    writer.commit(_manifest(p, started, timing), n_shards=n_shards)
    return store.open_lake(p.request.lake).manifest(p.run)


def _manifest(p: Plan, started: float, timing: dict) -> dict:
    req = p.request
    model = meta_backbone(p.spec, p.img_size)  # parameter count and data config, no weights
    return {
        "run": p.run, "config": p.config, "model": p.spec.alias, "timm_name": p.spec.timm_name,
        "img_size": p.img_size, "subset": req.subset, "weights": p.weights.kind,
        "weights_path": str(p.weights.path) if p.weights.path else None,
        "weights_sha256": p.weights.sha256, "random_weights": p.weights.is_random,
        "params": sum(t.numel() for t in model.parameters()),
        "token_layout": asdict(meta_layout(p)),
        "native_img_size": p.spec.img_size,  # the alias's (the paper's) resolution
        "data_config": data_config(model, img_size=p.img_size,
                                   preprocess=req.preprocess).to_dict(),
        "preprocess": req.preprocess,
        "subset_info": p.subset_meta, "policy": req.policy, "outlier_ref": req.outlier_ref,
        "threshold": p.threshold,
        "threshold_source": f"98th percentile of patch norms in {req.outlier_ref}"
        if req.outlier_ref else "this run (98th percentile of its patch norms)",
        "versions": {"timm": timm.__version__, "torch": torch.__version__,
                     "tokenlake": version("tokenlake")},
        # the run resumed with other versions than config.versions, accepted (_plan.py)
        **({"version_change": p.version_change} if p.version_change else {}),
        "device": str(p.device), "compute_dtype": p.config["compute_dtype"],
        "embedding_dtype": "float16", "workers": req.workers, "executor": req.executor,
        "pixel_source": f"pixel store {p.pixel_store}" if p.pixel_store
        else "decoded from the source images",
        "wall_time_s": round(time.time() - started, 3),  # of the invocation that committed
        # that invocation's loop, first batch to last shard written (no model construction);
        # None when shards ran in other processes
        "loop_images": timing.get("loop_images"),
        "loop_time_s": round(timing["loop_time_s"], 3) if "loop_time_s" in timing else None,
    }
