"""Greedy coreset subsampling of patch features, and a bank that stays within a row budget.

`greedy_coreset` is PatchCore's k-centre greedy selection (each pick the feature farthest from
those picked so far), on a seeded random projection so that its cost does not grow with the
feature width. `CappedBank` merges the coresets that feature workers send, reducing the union
to its budget whenever it reaches twice that: its memory is bounded whatever the number of good
images, and each merge costs the same, so the fit's time grows linearly with the images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

PROJECTION_DIM = 64


def greedy_coreset(features: Any, k: int, seed: int = 0, projection_dim: int = PROJECTION_DIM) -> Any:
    """Indices (torch int64, length min(k, N)) of a greedy k-centre coreset of `features` (N, D)."""
    import torch

    n = len(features)
    if k >= n:
        return torch.arange(n)
    if k < 1:
        return torch.zeros(0, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    z = features.float()
    if z.shape[1] > projection_dim:  # Johnson-Lindenstrauss: distances kept up to a small factor
        proj = torch.randn(z.shape[1], projection_dim, generator=gen) / math.sqrt(projection_dim)
        z = z @ proj.to(z.device)
    sq = (z * z).sum(dim=1)
    first = int(torch.randint(n, (1,), generator=gen))
    # Thousands of small memory-bound steps: one thread. Two OpenMP threads meet at a barrier per
    # step, and on a busy machine each barrier waits for a descheduled thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _greedy(z, sq, first, k)
    finally:
        torch.set_num_threads(threads)


def _greedy(z: Any, sq: Any, first: int, k: int) -> Any:
    import torch

    n = len(z)
    nearest = torch.full((n,), float("inf"))
    step = torch.empty(n)
    picks = torch.empty(k, dtype=torch.int64)
    i = first
    for j in range(k):
        picks[j] = i
        # |z - z_i|^2 = |z|^2 - 2 z.z_i + |z_i|^2, one fused matrix-vector product per pick
        torch.addmv(sq, z, z[i], alpha=-2.0, out=step)
        torch.minimum(nearest, step.add_(sq[i]), out=nearest)
        i = int(torch.argmax(nearest))
    return picks


def coreset_size(n: int, fraction: float) -> int:
    """Rows a coreset of `fraction` keeps of `n` (at least one of a non-empty set)."""
    return 0 if n == 0 else max(1, math.ceil(n * fraction))


@dataclass
class CappedBank:
    """Rows added in parts, kept at most `2 * max_rows` at any time and `max_rows` at the end."""

    max_rows: int
    seed: int = 0
    parts: list[Any] = field(default_factory=list)
    rows: int = 0
    merges: int = 0
    seen: int = 0

    def add(self, features: Any) -> None:
        import torch

        if len(features) == 0:
            return
        self.parts.append(torch.as_tensor(features).float())
        self.rows += len(features)
        self.seen += len(features)
        if self.rows >= 2 * self.max_rows:
            self._reduce()

    def _reduce(self) -> None:
        import torch

        union = torch.cat(self.parts)
        keep = greedy_coreset(union, self.max_rows, seed=self.seed + self.merges)
        self.parts = [union[keep].clone()]
        self.rows = len(self.parts[0])
        self.merges += 1

    def finish(self) -> Any:
        """The bank: (rows, D) float32, at most `max_rows` rows."""
        import torch

        if self.rows > self.max_rows:
            self._reduce()
        return torch.cat(self.parts) if self.parts else torch.zeros((0, 0))
