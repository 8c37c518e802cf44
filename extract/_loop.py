"""The extraction loop of one process: decode -> backbone -> per-token results -> shard files.

Decoding runs in DataLoader workers, the backbone and the per-token post-processing on the
device in the main thread, and a writer thread turns finished shards into files, so the three
overlap.
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import torch
from tqdm.auto import tqdm

from tokenlake import store
from tokenlake.extract._adapters import Adapter, make_adapter
from tokenlake.extract._loader import Batch, InputRow, batches, default_workers
from tokenlake.extract._models import create_backbone
from tokenlake.extract._pixelstore import find_pixel_store
from tokenlake.extract._plan import Plan, adapter_options, array_specs, meta_layout
from tokenlake.extract._policy import TokenPolicy
from tokenlake.extract._preprocess import data_config, normalise, token_cells
from tokenlake.extract._shardbuf import ImageResult, ShardBuffer


def open_writer(p: Plan) -> store.RunWriter:
    """The run's writer; refuses a run made with another configuration."""
    layout = meta_layout(p)
    return store.RunWriter(p.request.lake, p.run, config=p.config,
                           shard_size=p.request.shard_size, n_shards=p.n_shards,
                           tokens_per_image=layout.n_tokens, arrays=array_specs(layout))


def work(p: Plan, shards: list[int] | None = None, *, log=print) -> dict:
    """Extract the given shards (default: every shard not yet committed) in this process."""
    req = p.request
    writer = open_writer(p)
    done = writer.committed()
    wanted = set(range(p.n_shards)) if shards is None else set(shards)
    rows = [r for r in p.rows if (s := r.image_id // req.shard_size) in wanted and s not in done]
    kept = _kept_in(store.open_lake(req.lake), p.run, done) if req.keep_if_outlier else 0
    if not rows or (req.keep_if_outlier and kept >= req.n):
        return {"last_shard": max(done, default=-1)}
    model = create_backbone(p.spec, weights=p.weights, img_size=p.img_size).to(p.device)
    adapter = make_adapter(model, img_size=p.img_size, blocks=req.blocks, **adapter_options(p))
    policy = TokenPolicy(req.policy, threshold=p.threshold,
                         normals_per_image=req.normals_per_image, seed=req.seed)
    try:
        return _run_shards(p, rows, adapter, policy, data_config(model, img_size=p.img_size),
                           writer, kept, log)
    finally:
        adapter.close()


class _Extractor:
    """Runs the backbone on batches and turns device outputs into per-image host results."""

    def __init__(self, plan_: Plan, adapter: Adapter, policy: TokenPolicy, cfg) -> None:
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
        # the summary policy stores no token, so its batches skip the cell copy altogether
        cells = token_cells(batch.pixels.numpy(), grid=lay.grid, cell=lay.cell,
                            offset=lay.pixel_offset) if emb.shape[0] else None  # [B, Np, P, P, 3]
        start = 0
        for i, tokens in zip(keep, stored):
            n = tokens.size
            cell = np.zeros((n, lay.cell, lay.cell, 3), np.uint8)
            is_patch = tokens >= lay.n_prefix
            if is_patch.any():
                cell[is_patch] = cells[i, tokens[is_patch] - lay.n_prefix]
            buffer.images.append(ImageResult(
                row=batch.rows[i], width=batch.sizes[i][0], height=batch.sizes[i][1],
                norm=host["norm"][i], attn=host["attn"][i], nbr_cos=host["nbr_cos"][i],
                stored=tokens, embeddings=emb[start:start + n], cells=cell,
                per_image={k: host[k][i] for k in ("cls_post", "patch_mean_post", "registers_post",
                                                   "mlp_acts") if k in host},
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


def _pixel_store(p: Plan, cfg) -> tuple[str, str] | None:
    """Read the subset's decoded pixels from the lake when a matching pixel store was built."""
    found = find_pixel_store(p.request.lake, p.request.subset, cfg)
    return (p.request.lake, found.name) if found else None


def _kept_in(lake: store.Lake, run: str, shards: set[int]) -> int:
    markers = lake.markers(run)
    return sum(markers[s]["n_images"] for s in shards)


def _run_shards(p: Plan, rows: list[InputRow], adapter, policy, cfg, writer, kept: int,
                log) -> dict:
    req = p.request
    last = max(writer.committed(), default=-1)
    extractor = _Extractor(p, adapter, policy, cfg)
    image_arrays = {k: s.shape for k, s in writer.specs.items() if s.kind == "image"}
    out = _ShardWriterThread(writer, image_arrays)
    loader = batches(data=p.subset_meta["source"], split=p.subset_meta["split"], rows=rows, cfg=cfg,
                     shard_size=req.shard_size, batch_size=req.batch_size,
                     workers=req.decode_workers if req.decode_workers is not None
                     else default_workers(),
                     pin=p.device.type == "cuda", pixel_store=_pixel_store(p, cfg))
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
