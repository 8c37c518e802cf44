"""The extraction loop's CUDA streams and events, behind one small interface, and a CPU fake of it.

The loop's GPU branch orders work across four streams (compute, upload, copy, gather); mistakes
in that ordering never raise, they read memory before a copy into it has happened. `FakeStreams`
runs the same branch on the CPU and makes those mistakes visible: every non-blocking copy is held
back, its destination filled with a poison value, until an event recorded after it is
synchronised or waited on; pinned sets are poisoned when the loop gives them back; every stream
wait is logged with its event's label. Tests select it with TOKENLAKE_FAKE_CUDA=1 (inherited by
worker processes) or by monkeypatching `streams_for`.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

FAKE_ENV = "TOKENLAKE_FAKE_CUDA"
STREAMS = ("upload", "copy", "gather")  # besides the compute stream (the device's current one)


class BatchTooLarge(torch.OutOfMemoryError):
    """The first batch did not fit in the GPU's memory; the message names a --batch-size to try."""


def batch_too_large(batch_size: int) -> BatchTooLarge:
    if batch_size > 1:
        return BatchTooLarge(f"out of GPU memory on the first batch at --batch-size {batch_size}: "
                             f"rerun with --batch-size {batch_size // 2}")
    return BatchTooLarge("out of GPU memory on the first batch at --batch-size 1: use a smaller "
                         "--img-size, --precision bf16 or a GPU with more memory")


def streams_for(device: torch.device) -> Streams | None:
    """The streams of the loop's GPU branch: real on a CUDA device; on the CPU none (plain
    synchronous copies), or the fake where TOKENLAKE_FAKE_CUDA=1 asks for it (tests)."""
    fake = os.environ.get(FAKE_ENV, "") not in ("", "0")
    if device.type == "cuda":
        if fake:
            raise ValueError(f"{FAKE_ENV}=1 runs the GPU branch on the CPU for tests; it cannot "
                             "run on a CUDA device: unset it or pass --device cpu")
        return Streams(device)
    return FakeStreams(device) if fake else None


@dataclass
class Event:
    """A recorded event and what it marks, e.g. ("computed", 3): batch 3's forward pass."""

    raw: object
    label: tuple

    def synchronize(self) -> None:
        self.raw.synchronize()


class Streams:
    """The CUDA streams of one device. The primitives (`to_device`, `to_host`, `record`, `wait`,
    `record_stream`, `use`, `pinned_empty`, `synchronize`) are what the fake replaces; the
    composites (`upload`, `take_pinned`, `release`) are shared, so the fake runs them too."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.compute = torch.cuda.current_stream(device)
        self._named = {n: torch.cuda.Stream(device) for n in STREAMS}
        self._free: list[dict[str, torch.Tensor]] = []  # pinned sets a finished batch gave back

    def stream(self, name: str):
        return self._named[name]

    # -- primitives ------------------------------------------------------------------------------

    def to_device(self, host: torch.Tensor, *, stream) -> torch.Tensor:
        """A non-blocking host -> device copy queued on `stream` (blocking unless host is pinned)."""
        with torch.cuda.stream(stream):
            return host.to(self.device, non_blocking=True)

    def to_host(self, dst: torch.Tensor, src: torch.Tensor, *, stream) -> torch.Tensor:
        """A non-blocking device -> pinned host copy queued on `stream`; dst is valid once an
        event recorded after it has been synchronised."""
        with torch.cuda.stream(stream):
            return dst.copy_(src, non_blocking=True)

    def record(self, stream, *, label: tuple) -> Event:
        # blocking: a host waiting on it sleeps instead of spinning a core
        raw = torch.cuda.Event(blocking=True)
        raw.record(stream)
        return Event(raw, label)

    def wait(self, stream, event: Event) -> None:
        """Work queued on `stream` from now on starts after `event`."""
        stream.wait_event(event.raw)

    def record_stream(self, tensor: torch.Tensor, stream) -> None:
        """`tensor` (allocated on another stream) is used on `stream`: the caching allocator must
        not hand its memory out again before that use is done."""
        tensor.record_stream(stream)

    def use(self, stream) -> contextlib.AbstractContextManager:
        """Kernels launched inside run on `stream`."""
        return torch.cuda.stream(stream)

    def pinned_empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def synchronize(self) -> None:
        """Wait for everything queued on every stream (a run that stops early: no pinned buffer
        may be freed or reused while a copy into it is pending)."""
        for s in (self.compute, *self._named.values()):
            s.synchronize()

    # -- composites ------------------------------------------------------------------------------

    def upload(self, host: torch.Tensor, *, label: tuple) -> torch.Tensor:
        """host -> device on the upload stream, so it overlaps the compute stream's work; the
        compute stream waits for it."""
        up = self.stream("upload")
        dev = self.to_device(host, stream=up)
        self.wait(self.compute, self.record(up, label=label))
        self.record_stream(dev, self.compute)
        return dev

    def take_pinned(self) -> dict[str, torch.Tensor]:
        """A set of pinned buffers (name -> tensor) that a finished batch gave back, or a new one."""
        return self._free.pop() if self._free else {}

    def release(self, pinned: dict[str, torch.Tensor]) -> None:
        """Give a set back: every copy into it has completed and nothing reads it any more."""
        self._free.append(pinned)


# -- the CPU fake ------------------------------------------------------------------------------------


def poison_value(dtype: torch.dtype) -> float | int | bool:
    """What an unfinished copy's destination holds in the fake: NaN for floats, bytes 0xA5 else."""
    if dtype.is_floating_point or dtype.is_complex:
        return float("nan")
    if dtype == torch.bool:
        return True
    as_numpy = torch.empty((), dtype=dtype).numpy().dtype
    return np.frombuffer(b"\xa5" * as_numpy.itemsize, dtype=as_numpy).item()


def poison(t: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():  # the loop's buffers are inference tensors; callers may not be
        return t.fill_(poison_value(t.dtype))


@dataclass
class FakeStream:
    name: str
    queued: list[tuple[int, torch.Tensor, Callable[[], None]]] = field(default_factory=list)
    n_ops: int = 0  # ops ever queued: an event marks a position in this count

    def __repr__(self) -> str:
        return f"FakeStream({self.name!r})"


@dataclass
class FakeEvent:
    stream: FakeStream
    position: int
    owner: FakeStreams

    def synchronize(self) -> None:
        self.owner._complete(self.stream, self.position)


class FakeStreams(Streams):
    """`Streams` on the CPU, holding every non-blocking copy back until the loop proves it waited.

    Kernels run eagerly here, so a copy must have happened by the time work that depends on it
    runs: a copy into device memory queued on the stream in use runs at once (later kernels on a
    stream are ordered after it); any other copy runs when an event recorded after it on its stream
    is synchronised, when a stream waits on such an event, or when its stream is synchronised.
    Until then its destination holds `poison_value`. Logs: `waits` (waiting stream, event label),
    `pageable` (streams of non-blocking copies from or to memory that is not pinned: these block
    on a GPU), `recorded_streams`."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cpu":
            raise ValueError(f"FakeStreams runs on the CPU, not on {device}")
        # not Streams.__init__, which makes CUDA streams: the same attributes, fake
        self.device = device
        self.compute = FakeStream("compute")
        self._named = {n: FakeStream(n) for n in STREAMS}
        self._free = []
        self._current = self.compute
        self._pinned: dict[int, weakref.ref] = {}  # storage address -> its tensor, while alive
        self.waits: list[tuple[str, tuple]] = []
        self.pageable: list[str] = []
        self.recorded_streams: list[str] = []

    def to_device(self, host: torch.Tensor, *, stream: FakeStream) -> torch.Tensor:
        self._check_pinned(host, stream)
        dst = poison(torch.empty_like(host))
        self._queue(stream, dst, lambda: dst.copy_(host))
        if stream is self._current:
            self._complete(stream, stream.n_ops)
        return dst

    def to_host(self, dst: torch.Tensor, src: torch.Tensor, *, stream: FakeStream) -> torch.Tensor:
        self._check_pinned(dst, stream)
        poison(dst)
        self._queue(stream, dst, lambda: dst.copy_(src))
        return dst

    def record(self, stream: FakeStream, *, label: tuple) -> Event:
        return Event(FakeEvent(stream, stream.n_ops, self), label)

    def wait(self, stream: FakeStream, event: Event) -> None:
        self.waits.append((stream.name, event.label))
        event.synchronize()  # kernels run eagerly: what follows must see the copies done

    def record_stream(self, tensor: torch.Tensor, stream: FakeStream) -> None:
        self.recorded_streams.append(stream.name)

    @contextlib.contextmanager
    def use(self, stream: FakeStream) -> Iterator[None]:
        before, self._current = self._current, stream
        try:
            yield
        finally:
            self._current = before

    def pinned_empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        t = poison(torch.empty(shape, dtype=dtype))  # fresh pinned memory is uninitialised
        self._pinned[_address(t)] = weakref.ref(t)
        return t

    def synchronize(self) -> None:
        for s in (self.compute, *self._named.values()):
            self._complete(s, s.n_ops)

    def release(self, pinned: dict[str, torch.Tensor]) -> None:
        mine = {_address(t) for t in pinned.values()}
        for s in (self.compute, *self._named.values()):
            if any(_address(dst) in mine for _, dst, _ in s.queued):
                raise RuntimeError(f"a pinned set was released while a copy into it is still "
                                   f"queued on the {s.name} stream: synchronise its event first")
        for t in pinned.values():
            poison(t)
        super().release(pinned)

    def pending(self) -> int:
        """Copies queued and not yet done, on every stream."""
        return sum(len(s.queued) for s in (self.compute, *self._named.values()))

    def _queue(self, stream: FakeStream, dst: torch.Tensor, run: Callable[[], None]) -> None:
        stream.n_ops += 1
        stream.queued.append((stream.n_ops, dst, run))

    def _complete(self, stream: FakeStream, position: int) -> None:
        with torch.inference_mode():  # as for poison: a drain runs outside the loop's mode
            while stream.queued and stream.queued[0][0] <= position:
                stream.queued.pop(0)[2]()

    def _check_pinned(self, host: torch.Tensor, stream: FakeStream) -> None:
        ref = self._pinned.get(_address(host))
        if ref is None or ref() is None:
            self.pageable.append(stream.name)


def _address(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()
