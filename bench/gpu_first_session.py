"""The first session on a GPU: the checks that only a GPU can run, in one go (docs/BENCH.md).

    python bench/gpu_first_session.py            # on the GPU node, ~8 minutes
    python bench/gpu_first_session.py --quick    # smaller sizes, ~4 minutes
    python bench/gpu_first_session.py --cpu-smoke --out /tmp/s  # the same logic on the CPU (tests)

Steps, each on its own (one that fails or raises does not stop the next):

1. sanitizer: a tiny extraction - a torchvision (nvjpeg) pixel store, then policy `all` reading it
   (copy stream, pinned buffers) and one decoding JPEGs itself - in a child process with
   TORCH_CUDA_SANITIZER=1 (it must be set before torch is imported): ok when it ends cleanly and
   reports no data race ("CSAN").
2. sync_debug: `torch.cuda.set_sync_debug_mode("warn")` around an extraction; the warnings are
   counted by the line that synchronised (informational: the per-batch loop should not appear).
3. cpu_vs_gpu: the same photos extracted on the CPU (fp32) and on the GPU in fp32 and bf16; the
   per-token norms (relative) and attention (absolute) compared against `TOLERANCES`.
4. workers_gpu0: an extraction with `workers=2` while nvidia-smi is polled: every process it
   starts may hold a context on one GPU only, and GPU 0 holds no more worker contexts than its
   share (on one GPU: one per worker; on several: one) - a stray context is what a worker
   without `torch.cuda.set_device` makes on GPU 0.
5. bench: `python bench/run.py --only gpu` with the time that is left, its results copied to
   `--results` (docs/bench-results-gpu.json, for the lead to commit).

Photos: the folder in TOKENLAKE_IMAGENET_SAMPLE when set, else generated JPEGs. A summary JSON
(`<out>/session.json`) is rewritten after each step. Without CUDA the script says so and exits 2,
except with --cpu-smoke, which runs every step on the CPU with a tiny model and small sizes (the
sanitizer and sync-debug mode are then off, as both need a GPU, and no GPU context is found to
judge) so that the one GPU
session does not fail on something the CPU could have caught. Exit status: 0 when no step failed,
1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SAMPLE_ENV = "TOKENLAKE_IMAGENET_SAMPLE"
# per-token differences from the CPU's fp32 run. fp32 on the GPU differs by summation order only
# (the adapter turns TF32 off for fp32 runs); bf16 autocast keeps 8 bits of mantissa, ~0.4% per
# rounding, which a ViT's residual stream accumulates
TOLERANCES = {
    "fp32": {"norm_rel_median": 1e-4, "norm_rel_p99": 1e-3, "attn_abs_p99": 1e-4},
    "bf16": {"norm_rel_median": 2e-2, "norm_rel_p99": 1e-1, "attn_abs_p99": 2e-2},
}
STEPS = ("sanitizer", "sync_debug", "cpu_vs_gpu", "workers_gpu0", "bench")


@dataclass(frozen=True)
class Session:
    out: Path
    device: str  # "cuda", or "cpu" with --cpu-smoke
    smoke: bool
    quick: bool
    photos: Path
    model: str
    px: int
    n: int  # photos per extraction
    deadline: float  # time.time() by which the bench must end
    results: Path

    def lake(self, name: str, n: int | None = None) -> Path:
        """A fresh lake holding a subset "s" of the first `n` photos."""
        from tokenlake.extract import draw_subset, open_source
        from tokenlake.store import write_subset

        lake = self.out / "lakes" / name
        shutil.rmtree(lake, ignore_errors=True)
        write_subset(lake, "s", draw_subset(open_source(str(self.photos)), n=None,
                                            limit=n or self.n))
        return lake

    def extract(self, lake: Path, **options) -> dict:
        from tokenlake.extract import ExtractRequest, extract

        request = {"lake": str(lake), "model": self.model, "subset": "s", "weights": "random",
                   "img_size": self.px, "batch_size": 8, "shard_size": 16, "device": self.device,
                   "decode_workers": 0, "quiet": True, **options}
        return extract(ExtractRequest(**request), log=lambda _t: None)


def _photos(out: Path, *, n: int) -> Path:
    """TOKENLAKE_IMAGENET_SAMPLE, or `n` generated JPEGs of ImageNet-like sizes."""
    sample = os.environ.get(SAMPLE_ENV)
    if sample:
        if not Path(sample).is_dir():
            raise SystemExit(f"{SAMPLE_ENV}={sample} is not a folder; unset it to use generated "
                             "photos")
        return Path(sample)
    from tokenlake.extract.testing import write_rgb_jpeg

    folder = out / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        if not (folder / f"p{i:04d}.jpg").exists():
            write_rgb_jpeg(folder, f"p{i:04d}.jpg", width=int(rng.integers(300, 500)),
                           height=int(rng.integers(240, 400)), seed=i)
    return folder


# -- 1. the CUDA sanitizer, in a child process --------------------------------------------------

def sanitizer(s: Session) -> dict:
    env = dict(os.environ)
    env.pop("TORCH_CUDA_SANITIZER", None)
    if not s.smoke:  # torch enables it on import when the variable exists; it needs a GPU
        env["TORCH_CUDA_SANITIZER"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-extract", "--out", str(s.out),
           "--model", s.model, "--px", str(s.px)] + (["--cpu-smoke"] if s.smoke else [])
    try:
        done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True,
                              timeout=120 if s.smoke else 300)
    except subprocess.TimeoutExpired as err:
        return {"ok": False, "error": f"timed out after {err.timeout:.0f} s (the sanitizer "
                "slows every kernel launch; try --quick)"}
    races = done.stderr.count("CSAN detected a possible data race")
    ok = done.returncode == 0 and races == 0 and "CSAN" not in done.stderr
    return {"ok": ok, "returncode": done.returncode, "races": races,
            "child": _last_json(done.stdout), "stderr_tail": done.stderr[-4000:]}


def _last_json(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def child_extract(s: Session) -> dict:
    """What the sanitizer watches: the torchvision decoder's store, then extraction reading it
    (policy all: copy stream, pinned buffers) and one decoding JPEGs itself."""
    from tokenlake.extract import build_pixels

    lake = s.lake("sanitizer", 16)
    build_pixels(str(lake), "s", s.model, img_size=s.px, decoder="torchvision",
                 device=s.device, quiet=True)
    store_fed = s.extract(lake, policy="all", decoder="torchvision", run="store-fed")
    # decoded in this process: the sanitizer checks every op's stream, which a DataLoader worker
    # forked after CUDA started cannot ask for
    decoded = s.extract(lake, policy="summary", run="decoded", decode_workers=0)
    return {"store_fed_images": store_fed["n_images"], "decoded_images": decoded["n_images"],
            "sanitizer": os.environ.get("TORCH_CUDA_SANITIZER")}


# -- 2. synchronisations the extraction makes -----------------------------------------------------

def sync_debug(s: Session) -> dict:
    import torch

    lake = s.lake("sync")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if not s.smoke:  # CUDA only; the smoke run counts nothing
            torch.cuda.set_sync_debug_mode("warn")
        try:
            s.extract(lake, policy="all")
        finally:
            if not s.smoke:
                torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    return {"ok": True, "synchronisations": len(syncs), "images": s.n,
            "by_line": dict(where.most_common(15)),
            "note": "informational: lines of the per-batch loop here are syncs to look at"}


# -- 3. the CPU and the GPU on the same photos ----------------------------------------------------

def _tokens(lake: Path, run: str) -> tuple[np.ndarray, np.ndarray]:
    from tokenlake.store import open_lake

    table = open_lake(lake).sql(
        f"SELECT norm, attn FROM tokens WHERE run = '{run}' ORDER BY image_id, token")
    norm = table.column("norm").to_numpy(zero_copy_only=False).astype(np.float64)
    attn = np.array([np.nan if a is None else a for a in table.column("attn").to_pylist()])
    return norm, attn


def compare(reference: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray],
            tolerance: dict) -> dict:
    """Per-token differences of `other` from `reference` (norms relative, attention absolute)
    against `tolerance`; attention is skipped where the model has none (NaN)."""
    (norm_a, attn_a), (norm_b, attn_b) = reference, other
    if norm_a.shape != norm_b.shape:
        return {"ok": False, "error": f"{norm_a.size} tokens against {norm_b.size}"}
    rel = np.abs(norm_b - norm_a) / np.maximum(np.abs(norm_a), 1e-6)
    stats = {"tokens": int(norm_a.size), "norm_rel_median": float(np.median(rel)),
             "norm_rel_p99": float(np.quantile(rel, 0.99)), "norm_rel_max": float(rel.max())}
    has_attn = ~np.isnan(attn_a) & ~np.isnan(attn_b)
    if has_attn.any():
        diff = np.abs(attn_b - attn_a)[has_attn]
        stats |= {"attn_abs_p99": float(np.quantile(diff, 0.99)), "attn_abs_max": float(diff.max())}
    over = {k: (stats[k], limit) for k, limit in tolerance.items() if stats.get(k, 0.0) > limit}
    return {"ok": not over, **stats, "tolerance": tolerance,
            "over": {k: f"{v:.3g} > {lim:.3g}" for k, (v, lim) in over.items()}}


def cpu_vs_gpu(s: Session) -> dict:
    lake = s.lake("compare")
    s.extract(lake, policy="all", device="cpu", precision="fp32", run="cpu")
    reference = _tokens(lake, "cpu")
    results = {}
    for precision in ("fp32", "bf16"):
        s.extract(lake, policy="all", precision=precision, run=f"gpu-{precision}")
        results[precision] = compare(reference, _tokens(lake, f"gpu-{precision}"),
                                     TOLERANCES[precision])
    return {"ok": all(r["ok"] for r in results.values()), "device": s.device,
            "images": s.n, **results}


# -- 4. GPU 0 with two workers --------------------------------------------------------------------

def _nvidia_smi(*query: str) -> list[list[str]] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"],
                          check=False, capture_output=True, text=True, timeout=20)
    if done.returncode:
        return None
    return [[x.strip() for x in line.split(",")] for line in done.stdout.splitlines() if line]


def gpu_contexts() -> list[tuple[int, int, int]] | None:
    """(pid, GPU index, MiB) of every compute context, from nvidia-smi; None without it."""
    gpus = _nvidia_smi("--query-gpu=index,uuid")
    apps = _nvidia_smi("--query-compute-apps=pid,gpu_uuid,used_memory")
    if gpus is None or apps is None:
        return None
    index = {uuid: int(i) for i, uuid in gpus}
    return [(int(pid), index[uuid], int(mib)) for pid, uuid, mib in apps if uuid in index]


def descendants(root: int) -> set[int]:
    """Every live process below `root`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def judge_contexts(seen: dict[int, dict[int, int]], *, workers: int, n_gpus: int) -> dict:
    """`seen`: pid -> {GPU index: most MiB seen} for the processes the extraction started. A
    process on two GPUs, or more worker contexts on GPU 0 than its share, is a stray context."""
    on_two = sorted(pid for pid, gpus in seen.items() if len(gpus) > 1)
    on_gpu0 = {pid: gpus[0] for pid, gpus in seen.items() if 0 in gpus}
    share = -(-workers // max(1, n_gpus))  # worker i runs on GPU i % n_gpus
    ok = not on_two and len(on_gpu0) <= share and len(seen) <= workers
    return {"ok": ok, "processes_with_contexts": len(seen), "workers": workers, "gpus": n_gpus,
            "gpu0_contexts": len(on_gpu0), "gpu0_share": share,
            "gpu0_mib_by_pid": {str(pid): mib for pid, mib in on_gpu0.items()},
            "on_several_gpus": on_two}


def workers_gpu0(s: Session, *, poll=gpu_contexts) -> dict:
    import torch

    lake = s.lake("workers", 4 * s.n)
    n_gpus = torch.cuda.device_count() if s.device == "cuda" else 0
    before = {(pid, gpu) for pid, gpu, _mib in poll() or []}  # this process's own, and others'
    ours: dict[int, dict[int, int]] = {}  # contexts of processes the extraction started
    new: dict[int, dict[int, int]] = {}  # contexts that appeared during the run, whoever's
    outcome: dict = {}

    def run() -> None:
        try:
            # on the GPU each worker's own DataLoader process is watched too (it must hold no
            # context); the smoke run spares the CPU those processes
            outcome["manifest"] = s.extract(lake, policy="summary", workers=2,
                                            decode_workers=0 if s.smoke else 1)
        except Exception as err:  # noqa: BLE001 - reported by the step
            outcome["error"] = f"{type(err).__name__}: {err}"

    worker = threading.Thread(target=run)
    worker.start()
    queried = False
    while worker.is_alive():
        contexts = poll()
        queried = queried or contexts is not None
        started = descendants(os.getpid())
        for pid, gpu, mib in contexts or []:
            for seen, counts in ((ours, pid in started), (new, (pid, gpu) not in before)):
                if counts:
                    seen.setdefault(pid, {})[gpu] = max(mib, seen.get(pid, {}).get(gpu, 0))
        time.sleep(0.2)
    worker.join()
    if "error" in outcome:
        return {"ok": False, "error": outcome["error"]}
    result = {"images": outcome["manifest"]["n_images"],
              "workers_in_manifest": outcome["manifest"]["workers"]}
    if not queried:
        return {"ok": None if s.smoke else False, **result,
                "note": "no GPU contexts to read (nvidia-smi absent or failing)"}
    if ours:
        return {**judge_contexts(ours, workers=2, n_gpus=n_gpus), **result}
    if new:  # nvidia-smi's PIDs are another namespace's (a container): judged by what appeared
        return {**judge_contexts(new, workers=2, n_gpus=n_gpus), **result,
                "note": "judged by the contexts that appeared during the run: nvidia-smi's PIDs "
                        "are not this process tree's (another PID namespace)"}
    return {"ok": False, **result, "note": "no context of the extraction's workers was seen: "
            "the run ended before nvidia-smi answered; raise the photo count"}


# -- 5. the GPU bench -----------------------------------------------------------------------------

def bench(s: Session) -> dict:
    budget = max(120.0, s.deadline - time.time())
    out = s.out / "bench"
    cmd = [sys.executable, str(HERE / "run.py"), "--only", "gpu", "--out", str(out),
           "--budget-s", f"{budget:.0f}"] + (["--quick"] if s.quick else [])
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True,
                              timeout=budget + 180)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"bench/run.py ran past {budget + 180:.0f} s; its rows so "
                f"far are in {out / 'results.json'}"}
    results = out / "results.json"
    if not results.is_file():
        return {"ok": False, "returncode": done.returncode, "stderr_tail": done.stderr[-4000:]}
    rows = json.loads(results.read_text())["rows"]
    s.results.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(results, s.results)
    failed = [r["name"] for r in rows if r.get("error") or str(r.get("note", "")).startswith(
        "FAILED")]
    missed = [r["name"] for r in rows if r.get("ok") is False and r["name"] not in failed]
    return {"ok": done.returncode == 0 and not failed, "returncode": done.returncode,
            "rows": len(rows), "failed": failed, "missed_targets": missed,
            "results": str(s.results), "budget_s": round(budget), "stdout_tail":
            done.stdout[-3000:]}


# -- the session ----------------------------------------------------------------------------------

def run_steps(s: Session, steps=STEPS) -> dict:
    summary: dict = {"device": s.device, "smoke": s.smoke, "quick": s.quick,
                     "photos": str(s.photos), "model": f"{s.model}@{s.px}", "steps": {}}
    path = s.out / "session.json"
    for name in steps:
        print(f"== {name}", flush=True)
        started = time.time()
        try:
            result = globals()[name](s)
        except Exception as err:  # noqa: BLE001 - one step's failure must not stop the next
            traceback.print_exc()
            result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        finally:
            shutil.rmtree(s.out / "lakes", ignore_errors=True)
        result["seconds"] = round(time.time() - started, 1)
        summary["steps"][name] = result
        print(f"   {name}: ok={result.get('ok')} in {result['seconds']} s"
              + (f" - {result['error']}" if "error" in result else ""), flush=True)
        path.write_text(json.dumps(summary, indent=1))
    summary["ok"] = all(r.get("ok") is not False for r in summary["steps"].values())
    path.write_text(json.dumps(summary, indent=1))
    print(f"summary: {path}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-out/gpu-session"))
    parser.add_argument("--results", type=Path, default=None,
                        help="where the bench's results go (default docs/bench-results-gpu.json; "
                             "with --cpu-smoke, inside --out)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, ~4 minutes")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="every step on the CPU with a tiny model (for tests)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="the whole session's seconds, default 480 (--quick 240); the bench "
                             "gets what is left")
    parser.add_argument("--steps", default=",".join(STEPS), help="a comma-separated subset")
    parser.add_argument("--child-extract", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--px", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    started = time.time()
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device on this machine: this script is for the first session with a GPU "
              "(--cpu-smoke runs its logic on the CPU)", file=sys.stderr)
        return 2
    steps = [x for x in args.steps.split(",") if x]
    if unknown := set(steps) - set(STEPS):
        parser.error(f"unknown steps {sorted(unknown)}; choose from {', '.join(STEPS)}")
    n = 8 if args.cpu_smoke else 32 if args.quick else 64  # photos per extraction
    budget = args.budget_s or (240.0 if args.quick else 480.0)
    args.out.mkdir(parents=True, exist_ok=True)
    s = Session(out=args.out.resolve(), device="cpu" if args.cpu_smoke else "cuda",
                smoke=args.cpu_smoke, quick=args.quick,
                photos=_photos(args.out, n=4 * n),  # the workers step takes 4 n
                # a small ViT (CLS attention to compare): tiny sizes on the CPU
                model=args.model or "dinov2_s_reg4", px=args.px or (56 if args.cpu_smoke else 224),
                n=n, deadline=started + budget,
                results=args.results or (args.out / "bench-results-gpu.json" if args.cpu_smoke
                                         else HERE.parent / "docs" / "bench-results-gpu.json"))
    if args.child_extract:
        print(json.dumps(child_extract(s)))
        return 0
    return 0 if run_steps(s, steps)["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
