"""Whole splits as uint8 tensors, served as index batches; the one uint8 -> float conversion."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler


def to_unit(images: Tensor) -> Tensor:
    """uint8 pixels ``[B, C, H, W]`` -> float32 in [0, 1] (the models' input)."""
    return images.float().div_(255)


class _Batches(torch.utils.data.Dataset):
    """Indexed by a list of indices, returns the whole batch at once."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, idx):
        idx = torch.as_tensor(idx)
        return self.images[idx], self.labels[idx]


def batch_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 shuffle: bool) -> DataLoader:
    """A DataLoader that yields whole batches by tensor indexing (no per-image collation)."""
    ds = _Batches(images, labels)
    order = RandomSampler(ds) if shuffle else SequentialSampler(ds)
    return DataLoader(ds, sampler=BatchSampler(order, batch_size, drop_last=False),
                      batch_size=None)
