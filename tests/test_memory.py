"""The in-memory data set of a training in the driver's process: every row once an epoch, in a seeded order."""
from __future__ import annotations

import numpy as np
import torch

from vitray.data.memory import MemoryShard


def _shard(n: int = 10) -> MemoryShard:
    return MemoryShard({"image": np.arange(n * 4, dtype=np.uint8).reshape(n, 2, 2, 1),
                        "label": np.arange(n, dtype=np.int64)})


def _labels(batches) -> list[list[int]]:
    return [b["label"].tolist() for b in batches]


def test_batches_cover_every_row_once_in_order_unless_shuffled():
    shard = _shard()
    assert _labels(shard.iter_torch_batches(batch_size=4)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    first = sum(_labels(shard.iter_torch_batches(batch_size=4, local_shuffle_buffer_size=8, local_shuffle_seed=1)), [])
    again = sum(_labels(shard.iter_torch_batches(batch_size=4, local_shuffle_buffer_size=8, local_shuffle_seed=1)), [])
    other = sum(_labels(shard.iter_torch_batches(batch_size=4, local_shuffle_buffer_size=8, local_shuffle_seed=2)), [])
    assert sorted(first) == list(range(10)) and first == again and other != first


def test_rows_stay_together_and_a_collate_function_makes_the_tensors():
    shard = _shard()
    batch = next(shard.iter_torch_batches(batch_size=3, local_shuffle_buffer_size=8, local_shuffle_seed=3,
                                          dtypes={"image": torch.float32}))
    assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.int64
    assert all(int(img.flatten()[0]) == 4 * int(label) for img, label in zip(batch["image"], batch["label"]))
    doubled = next(shard.iter_torch_batches(batch_size=2, collate_fn=lambda b: {"label": torch.from_numpy(b["label"] * 2)}))
    assert doubled["label"].tolist() == [0, 2]
