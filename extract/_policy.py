"""Which tokens of an image get an embedding slot (norms and attention are always kept)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POLICIES = ("all", "sample", "summary")


@dataclass(frozen=True)
class TokenPolicy:
    name: str  # all | sample | summary
    threshold: float | None = None  # outlier norm threshold (sample policy, keep-if-outlier)
    normals_per_image: int = 4
    seed: int = 0

    def select(self, norm: np.ndarray, *, n_prefix: int, image_id: int) -> np.ndarray:
        """norm [T] -> sorted token indices whose embeddings are stored."""
        t = norm.shape[0]
        if self.name == "all":
            return np.arange(t)
        if self.name == "summary":
            return np.arange(0)
        patch = norm[n_prefix:]
        outlier = np.flatnonzero(patch > self.threshold) + n_prefix
        normal = np.flatnonzero(patch <= self.threshold) + n_prefix
        # seeded per image, so the choice does not depend on batch size, shard or worker
        rng = np.random.default_rng((self.seed, image_id))
        k = min(self.normals_per_image, normal.size)
        picked = rng.choice(normal, size=k, replace=False) if k else normal[:0]
        return np.sort(np.concatenate([np.arange(n_prefix), outlier, picked]))

    def has_outlier(self, norm: np.ndarray, *, n_prefix: int) -> bool:
        return bool((norm[n_prefix:] > self.threshold).any())
