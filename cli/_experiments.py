"""Experiment files (`experiments/*.toml`): the whole paper as one plan, printed or executed.

A file lists subsets, runs, analyses, probes, an optional report, and how to run on a cluster
(`[slurm]`). `plan` estimates each run's images, GPU time and disk before anything runs; `run`
executes in dependency order (cli/_steps.py), here one step after another or as SLURM jobs
(cli/_runner.py), and skips whatever the lake already holds.
"""

from __future__ import annotations

import functools
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from tokenlake import store
from tokenlake.cli._entries import check_analysis, check_probe, check_report
from tokenlake.cli._stores import StoreSpec, pixel_options, shared_stores
from tokenlake.extract import (
    default_run_name,
    find_pixel_store,
    meta_backbone,
    open_source,
    resolve_model,
    resolve_weights,
    slurm_options,
)

# Bare bf16 forward throughput on one H200 (random weights, same FLOPs as pretrained), measured
# 2026-11 (docs/MODELS.md). Other models are scaled by parameters x tokens within their family.
# A GPU bench results file replaces them for the (model, px) pairs it measured (`Rates`).
ANCHORS = {  # (alias, px): img/s
    ("dinov2_s", 518): 2347, ("dinov2_g_reg4", 518): 108, ("dinov2_g", 224): 636,
    ("deit3_m", 224): 13143, ("clip_b", 224): 8976, ("clip_h", 224): 1253,
    ("swinv2_s", 256): 2062, ("pvt_b2", 224): 5762,
}
# the results file a GPU session commits (`python bench/run.py --only gpu`, then copied here)
GPU_RESULTS = Path(__file__).resolve().parents[1] / "docs" / "bench-results-gpu.json"
# Until a 5k run says otherwise, assume half the candidates of a keep-if-outlier run are kept.
DEFAULT_KEEP_SHARE = 0.5
PARQUET_BYTES_PER_TOKEN = 24  # measured on demo lakes: ~9 columns, zstd
BLOCKS_BYTES_PER_ROW = 13  # the blocks table (--blocks all), measured on the demo lake


@dataclass
class RunSpec:
    model: str
    subset: str
    policy: str = "all"
    img_size: int | None = None
    run: str | None = None
    outlier_ref: str | None = None
    keep_if_outlier: bool = False
    n: int | None = None
    blocks: str = "none"
    normals_per_image: int = 4
    weights: str = "pretrained"
    record_mlp: bool = False  # register-neuron statistics (needs outlier_ref); then ranked
    mlp_acts: bool = False  # with record_mlp: the raw activations too (tiny subsets only)
    neurons: dict = field(default_factory=dict)  # options of that `tokenlake neurons` step
    test_time_registers: str | None = None  # "RUN:K", RUN a record_mlp run of this file
    preprocess: str = "model"  # "dinov2-eval": DINOv2's official evaluation recipe (Table 4)
    precision: str | None = None  # "fp32" | "bf16"; default bf16 on a GPU, fp32 on the CPU
    batch_size: int = 32
    shard_size: int = 256  # images per shard: a cluster task's unit of work

    def name(self) -> str:
        spec = resolve_model(self.model)
        weights = resolve_weights(self.weights)
        return self.run or default_run_name(spec, self.img_size or spec.img_size, self.subset,
                                            weights, preprocess=self.preprocess)


@dataclass
class Experiment:
    subsets: dict[str, dict]
    runs: list[RunSpec]
    analyses: list[dict] = field(default_factory=list)
    probes: list[dict] = field(default_factory=list)
    pixels: dict = field(default_factory=lambda: pixel_options({}, "defaults"))
    slurm: dict = field(default_factory=dict)  # the [slurm] table, checked (extract/_slurmopts.py)
    report: dict | None = None  # the [report] table: a report after everything else
    path: Path | None = None

    def stores(self) -> list[StoreSpec]:
        return shared_stores(self.runs, min_runs=self.pixels["min_runs"])


SECTIONS = ("subsets", "runs", "analyses", "probes", "pixels", "slurm", "report")
NEURON_KEYS = ("method", "detect_block", "highest_block", "sparsity_filter", "sparsity_frac",
               "top", "out")


def load(path: Path) -> Experiment:
    with open(path, "rb") as handle:
        raw = tomllib.load(handle)
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {sorted(unknown)}; known: "
                         f"{', '.join(SECTIONS)}")
    runs = []
    for i, entry in enumerate(raw.get("runs", [])):
        try:
            runs.append(RunSpec(**entry))
        except TypeError as err:
            raise ValueError(f"{path}: runs[{i}]: {err}") from None
        if runs[-1].subset not in raw.get("subsets", {}):
            raise ValueError(f"{path}: runs[{i}] uses subset {runs[-1].subset!r}, not defined")
        bad = sorted(set(runs[-1].neurons) - set(NEURON_KEYS))
        if bad:
            raise ValueError(f"{path}: runs[{i}]: neurons has unknown key(s) {bad}; known: "
                             f"{', '.join(NEURON_KEYS)}")
    for i, entry in enumerate(raw.get("analyses", [])):
        check_analysis(entry, f"{path}: analyses[{i}]")
    for i, entry in enumerate(raw.get("probes", [])):
        check_probe(entry, f"{path}: probes[{i}]")
    if "report" in raw:
        check_report(raw["report"], str(path))
    slurm_options(raw.get("slurm", {}), where=str(path))  # refused now, not when submitting
    return Experiment(raw.get("subsets", {}), _ordered(runs), raw.get("analyses", []),
                      raw.get("probes", []), pixel_options(raw.get("pixels", {}), str(path)),
                      slurm=raw.get("slurm", {}), report=raw.get("report"), path=Path(path))


def _ordered(runs: list[RunSpec]) -> list[RunSpec]:
    """Reference runs first (a 200k selection needs its model's 5k threshold)."""
    by_name = {r.name(): r for r in runs}
    done: list[RunSpec] = []
    seen: set[str] = set()

    def visit(run: RunSpec, stack: tuple[str, ...]) -> None:
        name = run.name()
        if name in seen:
            return
        if name in stack:
            raise ValueError(f"outlier_ref cycle: {' -> '.join(stack + (name,))}")
        for ref in (run.outlier_ref, (run.test_time_registers or "").rpartition(":")[0]):
            if ref in by_name:
                visit(by_name[ref], stack + (name,))
        seen.add(name)
        done.append(run)

    for run in runs:
        visit(run, ())
    return done


def _family(alias: str) -> str:
    return "swin" if alias.startswith("swin") else "pvt" if alias.startswith("pvt") else "vit"


@functools.cache
def _cost(alias: str, px: int) -> tuple[float, int, int, int, int]:
    """(params x tokens, tokens, embed dim, cell pixels, depth) of a model at px, from a
    weightless copy."""
    spec = resolve_model(alias)
    model = meta_backbone(spec, px)
    from tokenlake.extract import make_adapter

    adapter = make_adapter(model, img_size=px)
    adapter.close()  # the cached meta model must not keep hooks
    layout = adapter.layout
    params = sum(t.numel() for t in model.parameters())
    return params * layout.n_tokens, layout.n_tokens, layout.embed_dim, layout.cell, layout.depth


@dataclass
class Rates:
    """img/s per (alias, px) and policy: 'all' | 'sample' | 'summary' (extraction measured by the
    GPU bench, fed from the pixel store) or 'bare' (a bare forward: docs/MODELS.md's anchors, or a
    measured pair without extraction rows)."""

    anchors: dict[tuple[str, int], dict[str, float]]
    source: str  # the plan's line saying where the rates come from
    gpu: str = "one H200"
    _work: dict = field(default_factory=dict, repr=False)  # (family, policy) -> rate x cost

    @staticmethod
    def _pick(rates: dict[str, float], policy: str) -> float:
        """The run's own policy when measured, else `all` (the slowest), else the bare forward."""
        for key in (policy, "all", "bare"):
            if key in rates:
                return rates[key]
        return min(rates.values())

    def images_per_second(self, alias: str, px: int, policy: str = "all") -> float:
        if (alias, px) in self.anchors:
            return self._pick(self.anchors[alias, px], policy)
        key = (_family(alias), policy)
        if key not in self._work:
            self._work[key] = sorted(self._pick(r, policy) * _cost(a, p)[0]
                                     for (a, p), r in self.anchors.items() if _family(a) == key[0])
        work = self._work[key]
        return work[len(work) // 2] / _cost(alias, px)[0]


def _design_anchors() -> dict[tuple[str, int], dict[str, float]]:
    return {k: {"bare": float(v)} for k, v in ANCHORS.items()}


def design_rates(note: str = "") -> Rates:
    return Rates(_design_anchors(),
                 "bare bf16 forward rates on one H200 from docs/MODELS.md (not measured by this "
                 f"project's bench{note}), scaled by parameters x tokens for other models")


def load_rates(path: Path) -> Rates:
    """The measured GPU rates of a bench results file (bench/run.py's results.json): rows with
    `model`, `img_size` and `extract_img_s` (store-fed extraction, by policy) or `bare_img_s`.
    A file without any (a CPU results file, NOT RUN rows) is an error."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--rates {path}: not a readable bench results file ({err})") from None
    try:
        rows, device = list(data["rows"]), dict(data.get("device") or {})
    except (TypeError, KeyError, AttributeError, ValueError):
        raise ValueError(f"--rates {path}: not a bench results file (no 'rows' list)") from None
    measured: dict[tuple[str, int], dict[str, float]] = {}
    gpus = set()
    for row in rows:
        model, px = row.get("model"), row.get("img_size")
        where = row.get("device", device.get("gpu"))
        if not model or not px or where in (None, "cpu"):
            continue
        rates = {}
        if _rate(row.get("bare_img_s")):
            rates["bare"] = float(row["bare_img_s"])
        if _rate(row.get("extract_img_s")) and row.get("source", "pixel store") == "pixel store":
            rates[row.get("policy") or "all"] = float(row["extract_img_s"])
        if rates:
            measured.setdefault((model, int(px)), {}).update(rates)
            gpus.add(where)
    if not measured:
        raise ValueError(
            f"--rates {path}: no GPU rates in this file (no row with a finite bare_img_s or "
            f"extract_img_s measured on a GPU; device {device.get('gpu') or 'without CUDA'}, "
            f"{len(rows)} rows, e.g. NOT RUN or CPU rows). Run `python bench/run.py "
            "--only gpu` on a GPU machine and pass its results.json")
    gpu = ", ".join(sorted(gpus))
    pairs = ", ".join(f"{a}@{p} ({'/'.join(sorted(r))})" for (a, p), r in sorted(measured.items()))
    rest = [k for k in ANCHORS if k not in measured]
    anchors = {**_design_anchors(), **measured}
    source = (f"rates measured on {gpu} by the GPU bench ({path}, {data.get('when', '?')}) for "
              f"{pairs}; extraction from the pixel store by policy where measured"
              + (f"; docs/MODELS.md's H200 bare-forward anchors for {len(rest)} other pair(s)"
                 if rest else "")
              + "; other models scaled by parameters x tokens")
    return Rates(anchors, source, gpu=gpu)


def _rate(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def default_rates() -> Rates:
    """The project's committed GPU results when there are GPU rates in it, else docs/MODELS.md's."""
    if not GPU_RESULTS.is_file():
        return design_rates(f"; {GPU_RESULTS.name} not found")
    try:
        return load_rates(GPU_RESULTS)
    except ValueError:
        return design_rates(f"; {GPU_RESULTS} holds no GPU rates")


def images_per_second(alias: str, px: int, policy: str = "all", rates: Rates | None = None) -> float:
    return (rates or _default()).images_per_second(alias, px, policy)


@functools.cache
def _default() -> Rates:
    return default_rates()


def _subset_size(spec: dict) -> int:
    known = {("ILSVRC/imagenet-1k", "validation"): 50_000, ("ILSVRC/imagenet-1k", "train"): 1_281_167}
    if "n" in spec:
        return int(spec["n"])
    size = known.get((spec["data"], spec.get("split")))
    return size if size is not None else open_source(spec["data"], split=spec.get("split")).num_rows


def estimate(exp: Experiment, run: RunSpec, lake: store.Lake | None,
             rates: Rates | None = None) -> dict:
    px = run.img_size or resolve_model(run.model).img_size
    _, tokens, dim, cell, depth = _cost(run.model, px)
    n = run.n if run.keep_if_outlier else _subset_size(exp.subsets[run.subset])
    processed = n
    if run.keep_if_outlier:
        processed = math.ceil(n / _keep_share(lake, run.outlier_ref))
    stored = {"all": tokens, "summary": 0, "sample": 1 + 4 + run.normals_per_image + 0.02 * tokens}
    row_bytes = dim * 2 + cell * cell * 3
    disk = n * (stored[run.policy] * row_bytes + tokens * PARQUET_BYTES_PER_TOKEN + 3 * dim * 4)
    if run.record_mlp:
        disk += n * _mlp_bytes(run.model, px, run.mlp_acts)
    if run.record_mlp or run.blocks == "all":  # a row per (token, block)
        disk += n * depth * tokens * BLOCKS_BYTES_PER_ROW
    return {"run": run.name(), "px": px, "policy": run.policy, "images": n, "processed": processed,
            "gpu_s": processed / images_per_second(run.model, px, run.policy, rates),
            "disk": disk}


@functools.cache
def _mlp_bytes(alias: str, px: int, acts: bool) -> int:
    """Per image: a --record-mlp run's statistics (and raw activations)."""
    from tokenlake.extract import mlp_specs

    model = meta_backbone(resolve_model(alias), px)
    depth, hidden = len(model.blocks), int(model.blocks[0].mlp.fc2.in_features)
    gh, gw = model.patch_embed.grid_size
    specs = mlp_specs(depth, hidden, gh * gw, acts=acts)
    return sum(s.row_bytes for s in specs.values())


def _keep_share(lake: store.Lake | None, ref: str | None) -> float:
    if lake is None or ref is None or ref not in {r["run"] for r in lake.runs()}:
        return DEFAULT_KEEP_SHARE
    share = lake.sql("SELECT image_share FROM (" + _outlier_counts() + ") WHERE run = ?",
                     params=[ref]).column(0)[0].as_py()
    return max(share or DEFAULT_KEEP_SHARE, 1e-3)


def _outlier_counts() -> str:
    from tokenlake.sql import query_text

    return query_text("outlier_counts").strip().rstrip(";")


def print_plan(exp: Experiment, lake: store.Lake | None, rates: Rates | None = None) -> float:
    rates = rates or default_rates()
    rows = [estimate(exp, r, lake, rates) for r in exp.runs]
    done = {r["run"] for r in lake.runs()} if lake else set()
    width = max(len(r["run"]) for r in rows)
    print(f"{'run':<{width}} {'px':>4} {'policy':<8} {'images':>9} {'GPU min':>8} {'disk GB':>8}")
    for r in rows:
        mark = "  (in the lake)" if r["run"] in done else ""
        print(f"{r['run']:<{width}} {r['px']:>4} {r['policy']:<8} {r['processed']:>9,} "
              f"{r['gpu_s'] / 60:>8.1f} {r['disk'] / 1e9:>8.2f}{mark}")
    todo = [r for r in rows if r["run"] not in done]
    hours = sum(r["gpu_s"] for r in todo) / 3600
    print(f"\n{len(rows)} runs ({len(todo)} to do): {hours:.2f} GPU-hours on {rates.gpu}, "
          f"{sum(r['disk'] for r in todo) / 1e12:.2f} TB to write")
    print(f"GPU rates: {rates.source}")
    fp32 = [r.name() for r in exp.runs if r.precision == "fp32"]
    if fp32:  # every rate above is a bf16 one: fp32 was never measured on the GPU
        print(f"{len(fp32)} runs ask for --precision fp32 and are estimated at bf16 rates: on a "
              "GPU their blocks run without bf16 tensor cores, several times slower")
    _print_stores(exp, lake)
    print(f"{len(exp.analyses)} analyses and {len(exp.probes)} probes follow on the lake (CPU or GPU).")
    return hours


def _print_stores(exp: Experiment, lake: store.Lake | None) -> None:
    stores = exp.stores()
    if not stores:
        return
    decoder = exp.pixels["decoder"]
    print(f"\n{len(stores)} pixel stores, each decoded once ({decoder}) and read by the runs "
          "that share its subset and resize recipe:")
    for s in stores:
        n = _subset_size(exp.subsets[s.subset])
        built = lake is not None and find_pixel_store(lake.path, s.subset, s.cfg, decoder=decoder)
        print(f"  {s.subset:<10} {s.cfg.img_size:>4} px {s.cfg.interpolation:<8} crop "
              f"{s.cfg.crop_pct:<5} {n:>9,} images {n * s.cfg.img_size ** 2 * 3 / 1e9:>7.1f} GB  "
              f"{len(s.runs)} runs{'  (in the lake)' if built else ''}")


def execute(exp: Experiment, *, lake: Path, device: str | None, quiet: bool, log=print) -> int:
    """Every step of the file in this process, one after another (`tokenlake run`)."""
    from tokenlake.cli._runner import run_serial

    return run_serial(exp, lake=Path(lake), device=device, quiet=quiet, log=log)
