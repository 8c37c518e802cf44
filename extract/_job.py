"""One extraction run: a backbone over a subset, shard by shard, into the lake. Resumable.

Pipeline: worker processes decode and resize (uint8) -> the main thread runs the backbone and the
per-token post-processing on the device -> a writer thread turns finished shards into files.
"""

from __future__ import annotations

import math
import queue
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version

import numpy as np
import timm
import torch
from tqdm.auto import tqdm

from tokenlake import store
from tokenlake.extract._adapters import Adapter, TokenLayout, make_adapter
from tokenlake.extract._loader import Batch, InputRow, batches, default_workers
from tokenlake.extract._models import (
    ModelRequestError,
    ModelSpec,
    Weights,
    create_backbone,
    resolve_model,
    resolve_weights,
)
from tokenlake.extract._policy import POLICIES, TokenPolicy
from tokenlake.extract._preprocess import data_config, normalise, token_cells
from tokenlake.extract._shardbuf import ImageResult, ShardBuffer


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
    workers: int | None = None
    quiet: bool = False
    seed: int = 0


@dataclass
class _Plan:
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


def default_run_name(spec: ModelSpec, img_size: int, subset: str, weights: Weights) -> str:
    name = f"{spec.alias}-{img_size}-{subset}"
    return name + "-random" if weights.is_random else name


def plan(request: ExtractRequest) -> _Plan:
    """Every check that can fail, before any model is built."""
    if request.policy not in POLICIES:
        raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, not {request.policy!r}")
    spec = resolve_model(request.model)
    weights = resolve_weights(request.weights)
    img_size = request.img_size or spec.img_size
    _check_resolution(spec, img_size)
    lake = store.open_lake(request.lake)
    subset = store.read_subset(request.lake, request.subset)
    needs_threshold = request.policy == "sample" or request.keep_if_outlier
    threshold = None
    if needs_threshold:
        if not request.outlier_ref:
            raise ValueError(
                "--policy sample and --keep-if-outlier need --outlier-ref RUN: the run (usually the "
                "model's val5k run with --policy all) whose 98th-percentile patch norm defines outliers"
            )
        threshold = reference_threshold(lake, request.outlier_ref)
    if request.keep_if_outlier and not request.n:
        raise ValueError("--keep-if-outlier needs --n: how many images to keep")
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
    device = torch.device(request.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = request.run or default_run_name(spec, img_size, request.subset, weights)
    config = {
        "model": spec.timm_name, "alias": spec.alias, "weights": weights.kind,
        "weights_sha256": weights.sha256, "img_size": img_size, "subset": subset_meta,
        "policy": request.policy, "normals_per_image": request.normals_per_image,
        "outlier_ref": request.outlier_ref, "threshold": threshold,
        "keep_if_outlier": request.keep_if_outlier, "n": request.n, "blocks": request.blocks,
        "shard_size": request.shard_size, "seed": request.seed,
        "compute_dtype": "bfloat16" if device.type == "cuda" else "float32",
    }
    return _Plan(request, spec, weights, img_size, run, rows, subset_meta, threshold, device, config)


def reference_threshold(lake: store.Lake, run: str, percentile: float = 0.98) -> float:
    """The outlier threshold a reference run defines (DESIGN: outliers are a query)."""
    known = {r["run"] for r in lake.runs()}
    if run not in known:
        raise store.UnknownRun(f"--outlier-ref {run!r} is not a complete run in {lake.path}")
    table = lake.sql(
        "SELECT threshold FROM thresholds_at(?) WHERE run = ?", params=[percentile, run])
    return float(table.column("threshold")[0].as_py())


def _array_specs(layout: TokenLayout) -> dict[str, store.ArraySpec]:
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
    return specs


def _meta_layout(plan_: _Plan) -> TokenLayout:
    """The token layout from a weightless model on the meta device (instant even for ViT-G)."""
    with torch.device("meta"):
        model = create_backbone(plan_.spec, weights=Weights(kind="random"), img_size=plan_.img_size)
    adapter = make_adapter(model, img_size=plan_.img_size, blocks=plan_.request.blocks)
    adapter.close()
    return adapter.layout


class _Extractor:
    """Runs the backbone on batches and turns device outputs into per-image host results."""

    def __init__(self, plan_: _Plan, adapter: Adapter, policy: TokenPolicy, cfg) -> None:
        self.plan, self.adapter, self.policy, self.cfg = plan_, adapter, policy, cfg
        self.layout = adapter.layout

    @torch.inference_mode()
    def __call__(self, batch: Batch, buffer: ShardBuffer) -> None:
        buffer.errors.extend(batch.errors)
        if not batch.rows:
            return
        lay, dev = self.layout, self.plan.device
        x = normalise(batch.pixels.to(dev, non_blocking=True), self.cfg)  # [B, 3, H, W]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = self.adapter(x)
        host = {k: v.float().cpu().numpy() for k, v in out.items() if k != "tokens"}
        self._ids = [r.image_id for r in batch.rows]
        keep = self._keep(host["norm"], buffer)
        stored = [self.policy.select(host["norm"][i], n_prefix=lay.n_prefix,
                                     image_id=batch.rows[i].image_id) for i in keep]
        b_idx = torch.tensor(np.repeat(keep, [s.size for s in stored]), dtype=torch.long)
        t_idx = torch.from_numpy(np.concatenate(stored) if stored else np.zeros(0, np.int64))
        emb = out["tokens"][b_idx.to(dev), t_idx.to(dev)].to(torch.float16).cpu().numpy()  # [S, D]
        cells = token_cells(batch.pixels.numpy(), grid=lay.grid, cell=lay.cell,
                            offset=lay.pixel_offset)  # [B, Np, P, P, 3]
        start = 0
        for i, tokens in zip(keep, stored):
            n = tokens.size
            cell = np.zeros((n, lay.cell, lay.cell, 3), np.uint8)
            is_patch = tokens >= lay.n_prefix
            cell[is_patch] = cells[i, tokens[is_patch] - lay.n_prefix]
            buffer.images.append(ImageResult(
                row=batch.rows[i], width=batch.sizes[i][0], height=batch.sizes[i][1],
                norm=host["norm"][i], attn=host["attn"][i], nbr_cos=host["nbr_cos"][i],
                stored=tokens, embeddings=emb[start:start + n], cells=cell,
                per_image={k: host[k][i] for k in ("cls_post", "patch_mean_post", "registers_post")
                           if k in host},
                block_norm=host["block_norm"][i] if "block_norm" in host else None,
                qkv_norm=host["qkv_norm"][i] if "qkv_norm" in host else None,
            ))
            start += n

    def _keep(self, norm: np.ndarray, buffer: ShardBuffer) -> list[int]:
        if not self.plan.request.keep_if_outlier:
            return list(range(norm.shape[0]))
        keep = [i for i in range(norm.shape[0])
                if self.policy.has_outlier(norm[i], n_prefix=self.layout.n_prefix)]
        buffer.rejected.extend(self._ids[i] for i in range(norm.shape[0]) if i not in keep)
        return keep


class _ShardWriterThread:
    """Writes finished shards off the main thread; errors surface on the next call or at close."""

    def __init__(self, writer: store.RunWriter, image_arrays: dict[str, tuple[int, ...]]) -> None:
        self.writer, self.image_arrays = writer, image_arrays
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                if self.error is None:
                    self._write(item)
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                self.error = err

    def _write(self, buffer: ShardBuffer) -> None:
        tables = buffer.tables()
        with self.writer.claim(buffer.shard) as mine:
            if mine:
                self.writer.write_shard(buffer.shard, arrays=buffer.arrays(self.image_arrays),
                                        n_rejected=len(buffer.rejected), **tables)

    def put(self, buffer: ShardBuffer) -> None:
        if self.error:
            raise self.error
        self.queue.put(buffer)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error:
            raise self.error


def extract(request: ExtractRequest, *, log=print) -> dict:
    """Run (or resume) an extraction; returns the run's manifest."""
    started = time.time()
    p = plan(request)
    layout = _meta_layout(p)
    specs = _array_specs(layout)
    n_shards = math.ceil(len(p.rows) / request.shard_size)
    writer = store.RunWriter(request.lake, p.run, config=p.config, shard_size=request.shard_size,
                             n_shards=n_shards, tokens_per_image=layout.n_tokens, arrays=specs)
    if writer.manifest_path.exists():
        log(f"run {p.run} is already complete in {request.lake}")
        return store.open_lake(request.lake).manifest(p.run)
    done = writer.committed()
    if p.weights.is_random:
        log("NOTE: RANDOM WEIGHTS - this run's numbers describe an untrained network, not "
            f"{p.spec.timm_name}")
    model = create_backbone(p.spec, weights=p.weights, img_size=p.img_size).to(p.device)
    adapter = make_adapter(model, img_size=p.img_size, blocks=request.blocks)
    cfg = data_config(model, img_size=p.img_size)
    policy = TokenPolicy(request.policy, threshold=p.threshold,
                         normals_per_image=request.normals_per_image, seed=request.seed)
    image_arrays = {k: s.shape for k, s in specs.items() if s.kind == "image"}
    kept_before = _kept_in(store.open_lake(request.lake), p.run, done) if request.keep_if_outlier else 0
    todo = [r for r in p.rows if r.image_id // request.shard_size not in done]
    stats = _run_shards(p, todo, adapter, policy, cfg, writer, image_arrays, kept_before, log)
    adapter.close()
    shards_used = stats["last_shard"] + 1 if request.keep_if_outlier else n_shards
    manifest = {
        "run": p.run, "config": p.config, "model": p.spec.alias, "timm_name": p.spec.timm_name,
        "img_size": p.img_size, "subset": request.subset, "weights": p.weights.kind,
        "weights_path": str(p.weights.path) if p.weights.path else None,
        "weights_sha256": p.weights.sha256, "random_weights": p.weights.is_random,
        "params": sum(t.numel() for t in model.parameters()),
        "token_layout": asdict(layout), "data_config": cfg.to_dict(), "subset_info": p.subset_meta,
        "policy": request.policy, "outlier_ref": request.outlier_ref, "threshold": p.threshold,
        "threshold_source": f"98th percentile of patch norms in {request.outlier_ref}"
        if request.outlier_ref else "this run (98th percentile of its patch norms)",
        "versions": {"timm": timm.__version__, "torch": torch.__version__,
                     "tokenlake": version("tokenlake")},
        "device": str(p.device), "compute_dtype": p.config["compute_dtype"],
        "embedding_dtype": "float16", "wall_time_s": round(time.time() - started, 3),
    }
    writer.commit(manifest, n_shards=shards_used)
    return store.open_lake(request.lake).manifest(p.run)


def _kept_in(lake: store.Lake, run: str, shards: set[int]) -> int:
    markers = lake.markers(run)
    return sum(markers[s]["n_images"] for s in shards)


def _run_shards(p: _Plan, rows: list[InputRow], adapter, policy, cfg, writer, image_arrays,
                kept: int, log) -> dict:
    req = p.request
    last = max(writer.committed(), default=-1)
    if req.keep_if_outlier and kept >= req.n:
        return {"last_shard": last}
    extractor = _Extractor(p, adapter, policy, cfg)
    out = _ShardWriterThread(writer, image_arrays)
    loader = batches(data=p.subset_meta["source"], split=p.subset_meta["split"], rows=rows, cfg=cfg,
                     shard_size=req.shard_size, batch_size=req.batch_size,
                     workers=default_workers() if req.workers is None else req.workers,
                     pin=p.device.type == "cuda")
    bar = tqdm(total=len(rows), unit="img", disable=req.quiet, desc=p.run, smoothing=0.1)
    buffer: ShardBuffer | None = None
    try:
        for batch in loader:
            if buffer is not None and batch.shard != buffer.shard:
                kept += len(buffer.images)
                out.put(buffer)
                last, buffer = buffer.shard, None
            if buffer is None:
                buffer = ShardBuffer(shard=batch.shard, shard_size=req.shard_size,
                                     layout=adapter.layout)
            extractor(batch, buffer)
            bar.update(len(batch.rows) + len(batch.errors))
            bar.set_postfix(errors=len(buffer.errors), refresh=False)
            if req.keep_if_outlier and kept + len(buffer.images) >= req.n:
                buffer.truncate(req.n - kept)
                break
        if buffer is not None:
            kept += len(buffer.images)
            out.put(buffer)
            last = buffer.shard
    finally:
        bar.close()
        out.close()
    if req.keep_if_outlier and kept < req.n:
        log(f"warning: only {kept} images of the subset have an outlier token; --n asked for {req.n}")
    return {"last_shard": last}
