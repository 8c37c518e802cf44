"""The disk's sequential write bandwidth, measured the way the lake's writer writes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np


def disk_bandwidth(folder: Path, *, total: int, block: int = 64 << 20,
                   max_s: float = 8.0) -> tuple[float, int]:
    """(bytes/s, bytes written) of large blocks written into `folder`, each fsync'd as the writer
    syncs every chunk file; stops early past `max_s` on a slow disk. The file is deleted."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "disk-bandwidth.tmp"
    data = np.random.default_rng(0).integers(0, 255, min(block, total), dtype=np.uint8).tobytes()
    os.sync()  # earlier dirty pages (generated images, lakes) are not this measurement's to flush
    written = 0
    start = time.perf_counter()
    try:
        with open(path, "wb", buffering=0) as f:
            while written < total:
                f.write(data)
                os.fsync(f.fileno())
                written += len(data)
                if written >= 4 * len(data) and time.perf_counter() - start > max_s:
                    break
        elapsed = time.perf_counter() - start
    finally:
        path.unlink(missing_ok=True)
    return written / elapsed, written
