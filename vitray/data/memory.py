"""A small data set held in this process: what a training in the driver's process reads instead of Ray Data.

Ray Train's local mode (`ScalingConfig(num_workers=0)`) hands `ray.train.get_dataset_shard`
whatever the trainer's datasets are; `MemoryShard` answers the one call the training loop
makes on a shard, `iter_torch_batches`, with the same batches a Ray Data shard gives.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np


class MemoryShard:
    """Columns of equal length (`image`, `label`, optionally `bbox`) as numpy arrays."""

    def __init__(self, columns: dict[str, np.ndarray]) -> None:
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"columns of different lengths: { {k: len(v) for k, v in columns.items()} }")
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), ()))

    def iter_torch_batches(self, *, batch_size: int = 256, collate_fn: Any = None, dtypes: Any = None,
                           device: Any = None, local_shuffle_buffer_size: int | None = None,
                           local_shuffle_seed: int | None = None) -> Iterator[dict[str, Any]]:
        """Batches of `batch_size` rows (the last one shorter) as torch tensors on `device`.

        With `local_shuffle_buffer_size` the rows come in an order drawn from
        `local_shuffle_seed` (all of them: the set is in memory, no buffer is needed); a
        `collate_fn` takes the numpy batch and returns the tensors, as Ray Data's does.
        """
        import torch

        order = np.arange(len(self))
        if local_shuffle_buffer_size:
            order = np.random.default_rng(local_shuffle_seed).permutation(len(self))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = {k: v[rows] for k, v in self.columns.items()}
            if collate_fn is not None:
                tensors = collate_fn(batch)
            else:
                tensors = {k: torch.as_tensor(v, dtype=(dtypes or {}).get(k)) for k, v in batch.items()}
            yield {k: v.to(device) if device is not None else v for k, v in tensors.items()}
