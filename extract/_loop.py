"""The extraction loop of one process: decode -> backbone -> per-token results -> shard files.

Decoding runs in DataLoader workers, the backbone and the per-token post-processing on the
device in the main thread, and a writer thread turns finished shards into files, so the three
overlap.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from tokenlake import store
from tokenlake.extract import _cuda
from tokenlake.extract._adapters import Adapter, fp32_exact
from tokenlake.extract._finalnorm import final_norm_params
from tokenlake.extract._loader import Batch, InputRow, batches, default_workers
from tokenlake.extract._models import create_backbone
from tokenlake.extract._plan import Plan, adapter_options, array_specs, meta_adapter_info
from tokenlake.extract._policy import TokenPolicy
from tokenlake.extract._preprocess import cells_at, channel_stats, data_config, normalise
from tokenlake.extract._registry import make_adapter
from tokenlake.extract._shardbuf import BatchResult, RowPool, ShardBuffer, copy_rows


def pixel_source(p: Plan) -> tuple[str, str] | None:
    """(lake, name) of the pixel store the plan found for the run; None: decode the images."""
    return (p.request.lake, p.pixel_store) if p.pixel_store else None


def open_writer(p: Plan) -> store.RunWriter:
    """The run's writer; refuses a run made with another configuration."""
    layout, family_arrays = meta_adapter_info(p)
    return store.RunWriter(p.request.lake, p.run, config=p.config,
                           shard_size=p.request.shard_size, n_shards=p.n_shards,
                           tokens_per_image=layout.n_tokens,
                           arrays=array_specs(layout, family_arrays))


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
    writer.write_final_norm(final_norm_params(adapter))  # output tokens = this norm of the stored
    policy = TokenPolicy(req.policy, threshold=p.threshold,
                         normals_per_image=req.normals_per_image, seed=req.seed)
    try:
        cfg = data_config(model, img_size=p.img_size, preprocess=req.preprocess)
        return _run_shards(p, rows, adapter, policy, cfg,
                           writer, kept, log)
    finally:
        adapter.close()


@dataclass
class _InFlight:
    """A batch whose forward pass and copies to the host are queued, not necessarily done."""

    index: int  # launch order: labels the batch's events
    batch: Batch
    out: dict[str, torch.Tensor]  # device outputs, kept alive until the copies are done
    host: dict[str, torch.Tensor]  # host copies (pinned buffers on a GPU)
    pinned: dict[str, torch.Tensor] | None  # the pinned set `host` lives in, released by finish
    computed: _cuda.Event | None = None  # on the compute stream, after the forward pass
    ready: _cuda.Event | None = None  # on the copy stream, after the last copy


class _Extractor:
    """Runs the backbone on batches and turns device outputs into host arrays.

    `launch` queues the input upload, the forward pass and the copies to the host; `finish` waits
    for them and does the host work. The loop launches batch i+1 before finishing batch i, so on a
    GPU batch i+1's upload (its own stream), batch i's copies (another, into reused pinned
    buffers), its sample gather (a third) and the host work all overlap the next forward pass.
    """

    def __init__(self, plan_: Plan, adapter: Adapter, policy: TokenPolicy, cfg) -> None:
        self.plan, self.adapter, self.policy, self.cfg = plan_, adapter, policy, cfg
        self.layout = adapter.layout
        self.device = plan_.device
        self.streams = _cuda.streams_for(self.device)  # None: the CPU, plain synchronous copies
        self.launched = self.finished = 0
        self.stats = channel_stats(cfg, self.device)
        # every per-image array the run declares reaches the host in its declared dtype
        self.image_dtypes = {k: getattr(torch, s.dtype) for k, s in
                             array_specs(self.layout, adapter.image_arrays()).items()
                             if s.kind == "image"}
        self.bf16 = plan_.config["compute_dtype"] == "bfloat16"  # --precision

    @torch.inference_mode()
    def launch(self, batch: Batch) -> _InFlight:
        index, self.launched = self.launched, self.launched + 1
        if not batch.rows:
            return _InFlight(index, batch, {}, {}, None)
        try:
            return self._launch(index, batch)
        except torch.OutOfMemoryError as err:
            # before any batch is done: batches 0 and 1 are both alive at the peak
            if self.finished:
                raise
            raise _cuda.batch_too_large(self.plan.request.batch_size) from err

    def _launch(self, index: int, batch: Batch) -> _InFlight:
        s = self.streams
        if s is None:
            pixels = batch.pixels.to(self.device)
        else:  # the loader pinned it: the upload overlaps the previous batch's forward pass
            pixels = s.upload(batch.pixels, label=("uploaded", index))
        x = normalise(pixels, self.cfg, self.stats)  # [B, 3, H, W]
        # bf16: the blocks under autocast; fp32: true fp32, also where cuDNN convolutions (patch
        # embeddings) would use TF32 by torch's default
        with (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16
              else fp32_exact(self.device.type)):
            out = self.adapter(x)
        wanted = {k: v for k, v in out.items() if k != "tokens" or self.policy.name == "all"}
        if s is None:
            return _InFlight(index, batch, out,
                             {k: v.to(self._host_dtype(k)) for k, v in wanted.items()}, None)
        computed = s.record(s.compute, label=("computed", index))
        pinned = s.take_pinned()
        host, ready = self._copy_out(wanted, pinned, computed, index)
        return _InFlight(index, batch, out, host, pinned, computed, ready)

    def _copy_out(self, tensors: dict[str, torch.Tensor], pinned: dict[str, torch.Tensor],
                  computed: _cuda.Event, index: int) -> tuple[dict[str, torch.Tensor], _cuda.Event]:
        """Queue device -> pinned host copies on the copy stream, after the forward pass."""
        s = self.streams
        copy = s.stream("copy")
        host = {}
        s.wait(copy, computed)
        with s.use(copy):
            for k, v in tensors.items():
                v = v.to(self._host_dtype(k))  # the cast runs on the copy stream too
                host[k] = s.to_host(_pinned_view(s, pinned, k, v.shape, v.dtype), v, stream=copy)
            ready = s.record(copy, label=("copied", index))
        return host, ready

    def drain(self) -> None:
        """Wait for every queued copy: a run stopping early must not free or reuse a pinned
        buffer while a copy into it is pending."""
        if self.streams is not None:
            self.streams.synchronize()

    @torch.inference_mode()
    def finish(self, flight: _InFlight, buffer: ShardBuffer) -> None:
        batch = flight.batch
        buffer.errors.extend(batch.errors)
        if not batch.rows:
            return
        if flight.ready is not None:
            flight.ready.synchronize()
        lay = self.layout
        host = {k: v.numpy() for k, v in flight.host.items()}
        ids = np.array([r.image_id for r in batch.rows], dtype=np.int64)
        keep = self._keep(host["norm"], ids, buffer)  # [K] batch positions
        norm = host["norm"][keep]  # [K, T]
        stored = self.policy.mask(norm, n_prefix=lay.n_prefix, image_ids=ids[keep])  # [K, T]
        image, token = np.nonzero(stored)  # [S] each, in (image, token) order
        if "tokens" in host:  # policy all: every token of every kept image, already on the host
            every = flight.host["tokens"]  # [B, T, D] tensor
            kept = every if keep.size == len(batch.rows) else every[torch.from_numpy(keep)]
            emb = kept.reshape(-1, lay.embed_dim)  # [S, D]
        else:
            emb = self._gather(flight, keep[image], token)  # [S, D]
        rows = [batch.rows[i] for i in keep]
        # indexing with an array copies: the results no longer point into the reused buffers
        copy = {k: v[keep] for k, v in host.items() if k != "tokens"}
        result = BatchResult(
            rows=rows, sizes=[batch.sizes[i] for i in keep], norm=copy["norm"],
            attn=copy["attn"], nbr_cos=copy["nbr_cos"], stored=stored,
            per_image={k: v for k, v in copy.items() if k in self.image_dtypes},
            block_norm=copy.get("block_norm"), qkv_norm=copy.get("qkv_norm"))
        self._fill_cells(buffer.add(result, emb), batch.pixels, keep, image, token)
        if flight.pinned is not None:
            self.streams.release(flight.pinned)  # everything was copied out of it
        self.finished += 1

    def _fill_cells(self, cells: np.ndarray, pixels: torch.Tensor, keep: np.ndarray,
                    image: np.ndarray, token: np.ndarray) -> None:
        """cells [S, P, P, 3]: the pixels under each stored patch token; zeros for prefix tokens.

        pixels: the batch's uint8 [B, H, W, 3]."""
        lay = self.layout
        if cells.shape[0] == keep.size * lay.n_tokens and lay.pixel_offset == 0 and (
                tuple(pixels.shape[1:3]) == (lay.grid[0] * lay.cell, lay.grid[1] * lay.cell)):
            # every token of every kept image (policy all): one strided copy, no index arrays
            gh, gw, c = *lay.grid, lay.cell
            per_image = cells.reshape(keep.size, lay.n_tokens, c, c, 3)
            per_image[:, :lay.n_prefix] = 0
            mine = pixels if keep.size == pixels.shape[0] else pixels[torch.from_numpy(keep)]
            tiles = mine.reshape(keep.size, gh, c, gw, c, 3).permute(0, 1, 3, 2, 4, 5)
            patches = per_image[:, lay.n_prefix:]
            patches.shape = (keep.size, gh, gw, c, c, 3)  # raises rather than copy: a view
            copy_rows(patches, tiles)
            return
        is_patch = token >= lay.n_prefix
        cells[~is_patch] = 0
        if is_patch.any():
            cells[is_patch] = cells_at(pixels.numpy(), keep[image[is_patch]],
                                       token[is_patch] - lay.n_prefix, grid=lay.grid,
                                       cell=lay.cell, offset=lay.pixel_offset)

    def _gather(self, flight: _InFlight, image: np.ndarray, token: np.ndarray) -> np.ndarray:
        """The stored tokens' embeddings [S, D] fp16, gathered on the device (policy sample)."""
        if image.size == 0:
            return np.zeros((0, self.layout.embed_dim), np.float16)
        tokens = flight.out["tokens"]  # [B, T, D] on the device
        b, t = torch.from_numpy(image), torch.from_numpy(token)  # [S] each
        s = self.streams
        if s is None:
            return tokens[b, t].to(torch.float16).numpy()
        # a stream of its own that waits for this batch's forward pass only: the compute stream
        # (and the copy stream, which waits for it) is busy with the next batch's
        gather, pinned = s.stream("gather"), flight.pinned
        s.wait(gather, flight.computed)
        with s.use(gather):
            b_dev = s.to_device(_pinned_view(s, pinned, "gather_image", b.shape, b.dtype).copy_(b),
                                stream=gather)
            t_dev = s.to_device(_pinned_view(s, pinned, "gather_token", t.shape, t.dtype).copy_(t),
                                stream=gather)
            emb = tokens[b_dev, t_dev].to(torch.float16)  # [S, D]
            host = s.to_host(_pinned_view(s, pinned, "gather_emb", emb.shape, emb.dtype), emb,
                             stream=gather)
            gathered = s.record(gather, label=("gathered", flight.index))
        gathered.synchronize()
        return host.numpy()

    def _keep(self, norm: np.ndarray, ids: np.ndarray, buffer: ShardBuffer) -> np.ndarray:
        if not self.plan.request.keep_if_outlier:
            return np.arange(norm.shape[0])
        has = self.policy.has_outlier(norm, n_prefix=self.layout.n_prefix)  # [B]
        buffer.rejected.extend(ids[~has].tolist())
        return np.flatnonzero(has)

    def _host_dtype(self, name: str) -> torch.dtype:
        if name in self.image_dtypes:
            return self.image_dtypes[name]
        return torch.float16 if name == "tokens" else torch.float32


def _pinned_view(streams: _cuda.Streams, pinned: dict[str, torch.Tensor], name: str, shape,
                 dtype) -> torch.Tensor:
    """A pinned host buffer for `name`, reused across batches (the last batch may be smaller)."""
    buf = pinned.get(name)
    if buf is None or buf.dtype != dtype or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0]:
        buf = pinned[name] = streams.pinned_empty(shape, dtype)
    return buf[:shape[0]]


class _ShardWriterThread:
    """Writes finished shards off the main thread, on `threads` threads: shards are independent
    files, and Parquet encoding, hashing and file writes release the GIL. On the 2-core
    development machine 2 threads wrote 2.5-3x the bytes/s of one, and 4 a little more (fsync
    latency overlaps). At most threads + 2 shards are in memory (one queued, one filling): 6 x 1.3
    GB for ViT-G at 518 px with policy all. Errors surface on the next call or at close."""

    def __init__(self, writer: store.RunWriter, image_arrays: dict[str, store.ArraySpec],
                 threads: int = 4) -> None:
        self.writer, self.image_arrays = writer, image_arrays
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._loop, daemon=True, name=f"shard-writer-{i}")
                        for i in range(threads)]
        for t in self.threads:
            t.start()

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
        buffer.release()

    def put(self, buffer: ShardBuffer) -> None:
        if self.error:
            raise self.error
        self.queue.put(buffer)

    def close(self) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join()
        if self.error:
            raise self.error


def _kept_in(lake: store.Lake, run: str, shards: set[int]) -> int:
    markers = lake.markers(run)
    return sum(markers[s]["n_images"] for s in shards)


class _Shards:
    """Routes finished batches into their shard's buffer and hands complete shards to the writer."""

    def __init__(self, p: Plan, layout, out: _ShardWriterThread, kept: int, last: int) -> None:
        self.p, self.layout, self.out, self.kept, self.last = p, layout, out, kept, last
        self.buffer: ShardBuffer | None = None
        self.pool = RowPool()  # shard buffers the writer is done with, reused
        req = p.request
        per_image = {"all": layout.n_tokens, "summary": 0,  # the sample policy's is a first guess
                     "sample": layout.n_prefix + req.normals_per_image + layout.n_patches // 20}
        self.tokens_per_image = per_image[req.policy]

    def buffer_for(self, shard: int) -> ShardBuffer:
        if self.buffer is not None and self.buffer.shard != shard:
            self.flush()
        if self.buffer is None:
            self.buffer = ShardBuffer(shard=shard, shard_size=self.p.request.shard_size,
                                      layout=self.layout, tokens_per_image=self.tokens_per_image,
                                      pool=self.pool)
        return self.buffer

    def flush(self) -> None:
        if self.buffer is not None:
            self.kept += self.buffer.n_images
            self.out.put(self.buffer)
            self.last, self.buffer = self.buffer.shard, None

    def quota_reached(self) -> bool:
        """keep-if-outlier: cut the current shard at the n-th kept image; True once there."""
        req = self.p.request
        if not req.keep_if_outlier or self.kept + self.buffer.n_images < req.n:
            return False
        self.buffer.truncate(req.n - self.kept)
        return True


def _run_shards(p: Plan, rows: list[InputRow], adapter, policy, cfg, writer, kept: int,
                log) -> dict:
    """Extract `rows`; returns the last shard written and how fast the loop itself ran."""
    req = p.request
    extractor = _Extractor(p, adapter, policy, cfg)
    image_arrays = {k: s for k, s in writer.specs.items() if s.kind == "image"}
    out = _ShardWriterThread(writer, image_arrays)
    shards = _Shards(p, adapter.layout, out, kept, max(writer.committed(), default=-1))
    loader = batches(data=p.subset_meta["source"], split=p.subset_meta["split"], rows=rows, cfg=cfg,
                     shard_size=req.shard_size, batch_size=req.batch_size,
                     workers=req.decode_workers if req.decode_workers is not None
                     else default_workers(),
                     pin=p.device.type == "cuda", pixel_store=pixel_source(p))
    bar = tqdm(total=len(rows), unit="img", disable=req.quiet, desc=p.run, smoothing=0.1)
    # timed from the end of the first batch, which pays the warm-up (kernel selection, first
    # allocations), as a bare-forward benchmark excludes its warm-up iterations; a run of one
    # batch is timed whole
    opened, started, seen, first = time.perf_counter(), None, 0, 0

    def finish(flight: _InFlight) -> bool:
        nonlocal seen, started, first
        buffer = shards.buffer_for(flight.batch.shard)
        extractor.finish(flight, buffer)
        n = len(flight.batch.rows) + len(flight.batch.errors)
        if started is None:
            started, first = time.perf_counter(), n
        else:
            seen += n
        bar.update(n)
        bar.set_postfix(errors=len(buffer.errors), refresh=False)
        return shards.quota_reached()

    try:
        pending, stopped = None, False
        for batch in loader:
            flight = extractor.launch(batch)  # queued before the previous batch's host work
            if pending is not None and (stopped := finish(pending)):
                break
            pending = flight
        if pending is not None and not stopped:
            finish(pending)
        shards.flush()
    finally:
        try:
            extractor.drain()  # a run that stopped early still has the next batch's copies queued
        finally:
            bar.close()
            out.close()
    if req.keep_if_outlier and shards.kept < req.n:
        log(f"warning: only {shards.kept} images of the subset have an outlier token; "
            f"--n asked for {req.n}")
    if not seen:
        started, seen = opened, first
    return {"last_shard": shards.last, "loop_images": seen,
            "loop_time_s": time.perf_counter() - started}
