"""Checking and resolving an extraction request before any model is built."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch

from tokenlake import store
from tokenlake.extract._adapters import TokenLayout
from tokenlake.extract._api import library_versions
from tokenlake.extract._finalnorm import check_final_norm_module
from tokenlake.extract._loader import InputRow
from tokenlake.extract._models import (
    ModelRequestError,
    ModelSpec,
    Weights,
    meta_backbone,
    resolve_model,
    resolve_weights,
)
from tokenlake.extract._neuronstats import (
    ACTS,
    SPARSITY_ACTIVATION,
    STATS,
    MlpRecord,
    check_pinned_memory,
    host_memory_bytes,
    mlp_specs,
)
from tokenlake.extract._policy import POLICIES
from tokenlake.extract._preprocess import PREPROCESS
from tokenlake.extract._registry import make_adapter, supported_family
from tokenlake.extract._tvdecode import check_decoder

# --precision: the dtype the backbone's blocks run in (bf16 = torch.autocast), the config's
# compute_dtype. Table 4 compares heads within 0.4-0.7 points, so its runs ask for fp32.
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}
# config keys a run begun by an older tokenlake lacks: it keeps its own config (_adopt_begun)
NUMERICS_KEYS = ("device_type", "numerics")


def numerics(compute_dtype: str) -> str:
    """The config's plain-words account of where the run rounds (store/SCHEMA.md, "bf16 blocks,
    fp32 reductions"; extract/_adapters.py fp32_exact)."""
    if compute_dtype == "bfloat16":
        blocks = "bf16 blocks, fp32 reductions: blocks in bfloat16 (torch.autocast)"
    else:
        blocks = "fp32 blocks, fp32 reductions: blocks in float32 with TF32 off"
    return (f"{blocks}; stored norms, attention (recomputed from the blocks' activations), "
            "cosines and pooled tokens computed in float32 from upcast activations with autocast "
            "and TF32 off; tokens stored as float16")


@dataclass(frozen=True)
class ExtractRequest:
    lake: str
    model: str
    subset: str
    policy: str = "all"
    weights: str = "pretrained"
    img_size: int | None = None
    run: str | None = None
    outlier_ref: str | None = None
    normals_per_image: int = 4
    keep_if_outlier: bool = False
    n: int | None = None  # with keep_if_outlier: how many images to keep
    blocks: bool = False
    batch_size: int = 32
    shard_size: int = 256
    device: str | None = None
    decode_workers: int | None = None  # decoding processes per extraction process
    workers: int = 1  # extraction processes, each owning whole shards
    executor: str = "local"  # local | slurm (submitit)
    slurm: dict = field(default_factory=dict)  # partition, gpus, time_min, array_parallelism
    quiet: bool = False
    seed: int = 0
    record_mlp: bool = False  # ViTs: register-neuron statistics per image (needs outlier_ref)
    mlp_acts: bool = False  # with record_mlp: also the raw MLP activations (tiny subsets only)
    test_time_registers: str | None = None  # "RUN:K": move RUN's top-K register neurons
    decoder: str = "pil"  # "torchvision": read the subset's torchvision pixel store (built first)
    preprocess: str = "model"  # input recipe: "model" (timm's) | "dinov2-eval" (_preprocess.py)
    precision: str | None = None  # "fp32" | "bf16"; None: bf16 autocast on CUDA, fp32 on the CPU
    # resume a run begun with other torch/timm/tokenlake versions (refused otherwise); recorded
    allow_version_change: bool = False


@dataclass
class Plan:
    request: ExtractRequest
    spec: ModelSpec
    weights: Weights
    img_size: int
    run: str
    rows: list[InputRow]
    subset_meta: dict
    threshold: float | None
    device: torch.device
    config: dict = field(default_factory=dict)
    ttreg: list[tuple[int, int]] | None = None  # (block, neuron) moved to the test-time register
    pixel_store: str | None = None  # the pixel store the run reads (its name); None: decode
    # resuming with other library versions, accepted (allow_version_change): {"from", "to", ...}
    version_change: dict | None = None

    @property
    def n_shards(self) -> int:
        return -(-len(self.rows) // self.request.shard_size)


_PATCH = re.compile(r"patch(\d+)")


def _check_resolution(spec: ModelSpec, img_size: int) -> None:
    match = _PATCH.search(spec.timm_name)
    if match is None:
        return
    patch = int(match.group(1))
    if img_size % patch:
        lo, hi = img_size // patch * patch, (img_size // patch + 1) * patch
        raise ModelRequestError(
            f"--img-size {img_size} is not a multiple of {spec.alias}'s patch size {patch}: "
            f"use {lo} or {hi}"
        )


def default_run_name(spec: ModelSpec, img_size: int, subset: str, weights: Weights, *,
                     preprocess: str = "model") -> str:
    """MODEL-PX-SUBSET, then -dinov2eval for that input recipe and -random for random weights."""
    name = f"{spec.alias}-{img_size}-{subset}"
    if preprocess != "model":
        name += "-" + preprocess.replace("-", "")
    return name + "-random" if weights.is_random else name


def plan(request: ExtractRequest) -> Plan:
    """Every check that can fail, before any model is built."""
    if request.policy not in POLICIES:
        raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, not {request.policy!r}")
    if request.preprocess not in PREPROCESS:
        raise ValueError(f"--preprocess must be one of {', '.join(PREPROCESS)}, not "
                         f"{request.preprocess!r}")
    if request.mlp_acts and not request.record_mlp:
        raise ValueError("--mlp-acts goes with --record-mlp")
    if request.record_mlp and not request.blocks:  # its outliers are decided at every block
        request = replace(request, blocks=True)
    spec = resolve_model(request.model)
    weights = resolve_weights(request.weights)
    img_size = request.img_size or spec.img_size
    _check_resolution(spec, img_size)
    lake = store.open_lake(request.lake)
    subset = store.read_subset(request.lake, request.subset)
    if request.record_mlp and not request.outlier_ref:
        raise ValueError(
            "--record-mlp needs --outlier-ref RUN: the run (usually the model's val5k run) whose "
            "98th-percentile patch norm is the outlier threshold at every block")
    # SLURM tasks run on GPU nodes even when this (login) node has none
    gpu = torch.cuda.is_available() or request.executor == "slurm"
    device = torch.device(request.device or ("cuda" if gpu else "cpu"))
    if request.precision not in (None, *PRECISIONS):
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, not "
                         f"{request.precision!r}")
    precision = request.precision or ("bf16" if device.type == "cuda" else "fp32")
    needs_threshold = request.policy == "sample" or request.keep_if_outlier or request.record_mlp
    threshold = None
    if needs_threshold:
        if not request.outlier_ref:
            raise ValueError(
                "--policy sample and --keep-if-outlier need --outlier-ref RUN: the run (usually the "
                "model's val5k run with --policy all) whose 98th-percentile patch norm defines outliers"
            )
        threshold = reference_threshold(lake, request.outlier_ref)
        check_reference_numerics(lake, request.outlier_ref, compute_dtype=PRECISIONS[precision],
                                 device_type=device.type)
    if request.keep_if_outlier and not request.n:
        raise ValueError("--keep-if-outlier needs --n: how many images to keep")
    if request.keep_if_outlier and request.workers > 1:
        raise ValueError("--keep-if-outlier walks the subset in order until --n images are kept: "
                         "run it with --workers 1")
    if request.executor not in ("local", "slurm"):
        raise ValueError(f"--executor must be 'local' or 'slurm', not {request.executor!r}")
    if request.workers < 1:
        raise ValueError("--workers must be at least 1")
    check_decoder(request.decoder)
    rows = [
        InputRow(image_id=i, source_index=int(s), source_id=str(sid),
                 label=None if lab is None else int(lab))
        for i, (s, sid, lab) in enumerate(zip(subset.column("source_index").to_pylist(),
                                              subset.column("source_id").to_pylist(),
                                              subset.column("label").to_pylist()))
    ]
    if not rows:
        raise ValueError(f"subset {request.subset!r} is empty")
    sources = set(subset.column("source").to_pylist())
    splits = set(subset.column("split").to_pylist())
    subset_meta = {"name": request.subset, "source": sources.pop(), "split": splits.pop(),
                   "n": len(rows), "checksum": store.subset_checksum(request.lake, request.subset)}
    run = request.run or default_run_name(spec, img_size, request.subset, weights,
                                          preprocess=request.preprocess)
    config = {
        "model": spec.timm_name, "alias": spec.alias, "weights": weights.kind,
        "weights_sha256": weights.sha256, "img_size": img_size, "subset": subset_meta,
        "policy": request.policy, "normals_per_image": request.normals_per_image,
        "outlier_ref": request.outlier_ref, "threshold": threshold,
        "keep_if_outlier": request.keep_if_outlier, "n": request.n, "blocks": request.blocks,
        "shard_size": request.shard_size, "seed": request.seed,
        "compute_dtype": PRECISIONS[precision], "device_type": device.type,
        "numerics": numerics(PRECISIONS[precision]),
    }
    config["versions"] = library_versions()  # a resume with others is refused unless allowed
    if request.preprocess != "model":  # config keys only when set: existing runs are unchanged
        config["preprocess"] = request.preprocess
    if request.policy == "sample":  # the draw is part of what a resumed run must repeat
        config["sample_draw"] = "k normal patches with the smallest splitmix64(seed, image_id, token)"
    pixel_store = _find_pixels(request, spec, img_size)
    if request.decoder != "pil":  # config keys only when set: PIL runs are unchanged
        config["decoder"] = request.decoder
    ttreg = None
    supported_family(meta_backbone(spec, img_size), blocks=request.blocks,
                     record_mlp=request.record_mlp,
                     ttreg=request.test_time_registers is not None)  # before anything runs
    if request.record_mlp:  # config keys only when set: runs without the options are unchanged
        config["record_mlp"] = _mlp_config(request)
    if request.test_time_registers is not None:
        ttreg, config["test_time_registers"] = _ttreg_neurons(lake, request, spec, weights)
    _adopt_begun(lake.run_config(run), config)
    version_change = _resume_versions(lake, run, config, request)
    plan_ = Plan(request, spec, weights, img_size, run, rows, subset_meta, threshold, device,
                 config, ttreg, pixel_store, version_change)
    if request.record_mlp and device.type == "cuda":
        _check_mlp_memory(plan_)
    return plan_


def _adopt_begun(begun: dict | None, config: dict) -> None:
    """A run begun before tokenlake recorded NUMERICS_KEYS keeps its config without them, so it
    can still be found complete, or resumed where _resume_versions allows (a resume by other
    library versions is refused unless --allow-version-change)."""
    for key in NUMERICS_KEYS:
        if begun is not None and key not in begun:
            del config[key]


def _check_mlp_memory(plan_: Plan) -> None:
    """Refuse a --record-mlp batch size whose pinned host buffers would not fit this machine
    (extract/_neuronstats.py check_pinned_memory); local workers share its memory. A SLURM
    submission from a machine without a GPU is checked by each task on its own node, where the
    task plans again (extract/_job.py) before extracting."""
    request = plan_.request
    if request.executor == "slurm" and not torch.cuda.is_available():
        return
    layout = meta_layout(plan_)
    check_pinned_memory(depth=layout.depth, hidden=layout.mlp_hidden, n_patches=layout.n_patches,
                        acts=layout.mlp_acts, batch_size=request.batch_size,
                        host_bytes=host_memory_bytes(),
                        processes=request.workers if request.executor == "local" else 1)


def _resume_versions(lake: store.Lake, run: str, config: dict,
                     request: ExtractRequest) -> dict | None:
    """Compare the versions in `config` (this process's) with those the run was begun with.

    A new run keeps this process's. A run begun with others (or before tokenlake recorded them)
    keeps its own record in `config`, so the writer compares the rest; then a complete run is
    only reported, and resuming a partial one is refused naming the versions that differ, unless
    `request.allow_version_change`: the change is returned, for the manifest."""
    begun = lake.run_config(run)
    now = config["versions"]
    before = None if begun is None else begun.get("versions")
    if begun is None or before == now:
        return None
    if before is None:
        del config["versions"]
    else:
        config["versions"] = before
    if run in {r["run"] for r in lake.runs()}:  # complete: nothing will be computed
        return None
    old = before or {}
    differ = [f"{k} {old.get(k, 'unrecorded')} -> {now.get(k, 'absent')}"
              for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)]
    if not request.allow_version_change:
        begun_with = ("with other versions" if before is not None
                      else "by a tokenlake that did not record versions")
        raise store.RunConfigMismatch(
            f"run {run!r} was begun {begun_with}: {', '.join(differ)}. Resuming would mix shards "
            "computed by both: rerun with --allow-version-change to accept (the run's manifest "
            "records it), or use --run NEW_NAME")
    return {"from": before, "to": now, "differ": differ,
            "shards_committed_before": len(lake.markers(run)),
            "accepted_by": "allow_version_change (--allow-version-change)"}


def _find_pixels(request: ExtractRequest, spec: ModelSpec, img_size: int) -> str | None:
    """The name of the subset's complete pixel store for this recipe and decoder, read instead of
    decoding. A non-PIL decoder exists only through its store: without one the run is refused
    (decoding on the fly would silently give PIL's pixels)."""
    from tokenlake.extract._pixelstore import find_pixel_store
    from tokenlake.extract._preprocess import data_config

    cfg = data_config(meta_backbone(spec, img_size), img_size=img_size,
                      preprocess=request.preprocess)
    found = find_pixel_store(request.lake, request.subset, cfg, decoder=request.decoder)
    if found is None and request.decoder != "pil":
        raise ValueError(
            f"--decoder {request.decoder}: subset {request.subset!r} has no complete "
            f"{request.decoder} pixel store for {spec.alias} at {img_size} px. Build it first: "
            f"tokenlake pixels --lake {request.lake} --subset {request.subset} --model "
            f"{request.model} --img-size {img_size} --decoder {request.decoder}")
    return found.name if found else None


def _ttreg_neurons(lake: store.Lake, request: ExtractRequest, spec: ModelSpec,
                   weights: Weights) -> tuple[list[tuple[int, int]], dict]:
    """The top-K (block, neuron) of the source run's ranking, checked against this model."""
    from tokenlake.extract._ttreg import parse_ttreg

    source, k = parse_ttreg(request.test_time_registers)
    neurons: list[tuple[int, int]] = []
    scores: list[float] = []
    ranking: dict = {}
    if k:
        man = lake.manifest(source)  # UnknownRun if it is not a complete run
        if (man.get("timm_name"), man.get("weights_sha256")) != (spec.timm_name, weights.sha256) or (
                bool(man.get("random_weights")) != weights.is_random):
            raise ValueError(f"--test-time-registers {source}:{k}: that run used "
                             f"{man.get('timm_name')} with other weights; neurons are only "
                             "meaningful for the very same network")
        found = store.read_neurons(request.lake, source)
        if found is None:
            raise ValueError(f"run {source!r} has no neuron ranking: run `tokenlake neurons --lake "
                             f"{request.lake} --run {source}` first (on a --record-mlp run)")
        table, meta = found
        ranked = table.filter(table.column("rank").is_valid())  # NULL: above --highest-block
        if ranked.num_rows < k:
            raise ValueError(f"run {source!r} ranks {ranked.num_rows} neurons, fewer than K = {k}")
        top = ranked.sort_by("rank").slice(0, k)
        # the ranking file is replaced by the next `tokenlake neurons`: keep what chose these
        ranking = meta
        neurons = list(zip(top.column("block").to_pylist(), top.column("neuron").to_pylist()))
        scores = top.column("score").to_pylist()
    config = {"source_run": source, "k": k, "neurons": [list(n) for n in neurons],
              "scores": scores, "ranking": ranking, "token": "ttreg",
              "init": "zeros, no position embedding",
              "move": "ttreg act = max over patch tokens; patch acts = 0 (blocks[b].mlp.fc2 input)"}
    return neurons, config


def _mlp_config(request: ExtractRequest) -> dict:
    return {"arrays": list(STATS) + ([ACTS] if request.mlp_acts else []),
            "hook": "blocks[b].mlp.fc2 input", "tokens": "patch",
            "outliers": "patch tokens whose block-d output norm > threshold, for every block d",
            "sparsity_activation_threshold": SPARSITY_ACTIVATION, "reduced_in": "float64"}


def adapter_options(plan_: Plan) -> dict:
    """make_adapter's keyword options for this plan (none for a plain run)."""
    opts: dict = {}
    if plan_.request.record_mlp:
        opts["record_mlp"] = MlpRecord(threshold=plan_.threshold, acts=plan_.request.mlp_acts)
    if plan_.ttreg is not None:
        opts["ttreg"] = plan_.ttreg
    return opts


def reference_threshold(lake: store.Lake, run: str, percentile: float = 0.98) -> float:
    """The outlier threshold a reference run defines (outliers are a query: sql/views)."""
    known = {r["run"] for r in lake.runs()}
    if run not in known:
        raise store.UnknownRun(run, known, detail=f"--outlier-ref names no complete run of "
                                                  f"{lake.path}")
    table = lake.sql(
        "SELECT threshold FROM thresholds_at(?) WHERE run = ?", params=[percentile, run])
    return float(table.column("threshold")[0].as_py())


def reference_numerics(lake: store.Lake, run: str) -> tuple[str | None, str | None]:
    """(compute_dtype, device type) a complete run was extracted with; None where it recorded
    neither in its config nor in its manifest (config.device_type is new; the manifest's
    ``device``, e.g. "cuda:0", has always been written by extraction)."""
    manifest = lake.manifest(run)
    config = manifest.get("config") or {}
    dtype = config.get("compute_dtype") or manifest.get("compute_dtype")
    device_type = config.get("device_type")
    if device_type is None and manifest.get("device"):
        device_type = torch.device(manifest["device"]).type
    return dtype, device_type


def check_reference_numerics(lake: store.Lake, run: str, *, compute_dtype: str,
                             device_type: str) -> None:
    """Refuse a threshold (--outlier-ref) from a run whose blocks ran in another dtype or on
    another device type: bf16 rounding (or another device's kernels) moves the norms, so its
    98th percentile would not mark this run's outliers."""
    ref_dtype, ref_device = reference_numerics(lake, run)
    if (ref_dtype, ref_device) == (compute_dtype, device_type):
        return
    precision = {v: k for k, v in PRECISIONS.items()}.get(compute_dtype, compute_dtype)
    fix = (f"extract the reference with the same --precision {precision} --device {device_type} "
           "(under another --run name) and pass that run, or run this extraction with the "
           "reference's --precision/--device")
    if ref_dtype is None or ref_device is None:
        missing = " and ".join(k for k, v in (("compute_dtype", ref_dtype),
                                              ("device", ref_device)) if v is None)
        raise ValueError(f"--outlier-ref {run}: that run records no {missing}, so its threshold "
                         f"cannot be checked against this run ({compute_dtype} blocks on "
                         f"{device_type}): {fix}")
    raise ValueError(f"--outlier-ref {run} was extracted with {ref_dtype} blocks on {ref_device}; "
                     f"this run computes {compute_dtype} blocks on {device_type}, whose norms "
                     f"that threshold does not describe: {fix}")


def array_specs(layout: TokenLayout, image_arrays: dict[str, tuple[tuple[int, ...], str]] | None = None
                ) -> dict[str, store.ArraySpec]:
    """Every array a run stores: tokenlake's own, then the per-image arrays the family's adapter
    declares (`Adapter.image_arrays()`: name -> (row shape, dtype)), which may not reuse a name."""
    d = layout.embed_dim
    specs = {
        "tokens": store.ArraySpec(shape=(d,), dtype="float16", kind="token"),
        "pixels": store.ArraySpec(shape=(layout.cell, layout.cell, 3), dtype="uint8", kind="token"),
        "cls_post": store.ArraySpec(shape=(d,), dtype="float32", kind="image"),
        "patch_mean_post": store.ArraySpec(shape=(d,), dtype="float32", kind="image"),
    }
    if layout.n_reg:
        specs["registers_post"] = store.ArraySpec(shape=(layout.n_reg, d), dtype="float32",
                                                  kind="image")
    if layout.mlp_hidden:  # --record-mlp
        specs.update(mlp_specs(layout.depth, layout.mlp_hidden, layout.n_patches,
                               acts=layout.mlp_acts))
    for name, (shape, dtype) in (image_arrays or {}).items():
        if name in specs:
            raise ValueError(f"the {layout.family} adapter declares an image array {name!r}, a name "
                             "tokenlake's own arrays use")
        specs[name] = store.ArraySpec(shape=tuple(shape), dtype=dtype, kind="image")
    return specs


def meta_adapter_info(plan_: Plan) -> tuple[TokenLayout, dict[str, tuple[tuple[int, ...], str]]]:
    """The token layout and the family's own image arrays (`Adapter.image_arrays()`), from a
    weightless model on the meta device (instant even for ViT-G)."""
    model = meta_backbone(plan_.spec, plan_.img_size)  # the adapter's close() restores it
    adapter = make_adapter(model, img_size=plan_.img_size, blocks=plan_.request.blocks,
                           **adapter_options(plan_))
    adapter.close()
    check_final_norm_module(adapter)  # refused before anything runs, not after the first batch
    return adapter.layout, adapter.image_arrays()


def meta_layout(plan_: Plan) -> TokenLayout:
    """The token layout from a weightless model on the meta device (instant even for ViT-G)."""
    return meta_adapter_info(plan_)[0]
