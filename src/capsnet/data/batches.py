"""Whole splits as uint8 tensors, served as index batches; the one uint8 -> float conversion."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler


def to_unit(images: Tensor) -> Tensor:
    """uint8 pixels ``[B, C, H, W]`` -> float32 in [0, 1] (the models' input)."""
    return images.float().div_(255)


class _Batches(torch.utils.data.Dataset):
    """Indexed by a list of indices, returns the whole batch at once: ``(images, labels)``,
    or ``(images, labels, targets)`` with per-image ``targets`` (a teacher's, ``[N, O]``)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 targets: torch.Tensor | None = None):
        self.images, self.labels, self.targets = images, labels, targets

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, idx):
        idx = torch.as_tensor(idx)
        if self.targets is None:
            return self.images[idx], self.labels[idx]
        return self.images[idx], self.labels[idx], self.targets[idx]


class ShardedBatches:
    """Index batches of one process's share of the data, for data-parallel training.

    Every epoch all ``world`` processes draw the same seeded permutation (``seed + epoch``;
    Lightning calls :meth:`set_epoch`); process ``rank`` takes every ``world``-th image of it
    (``perm[rank::world]``), so each image is seen exactly once per epoch across processes,
    without the padding of ``DistributedSampler``. The share is cut into the same number of
    batches on every process (as even as possible, so sizes differ by at most one image),
    because DDP needs every process to take the same number of steps. ``shuffle=False``
    shards ``0..n-1`` in order (evaluation).
    """

    def __init__(self, n: int, batch_size: int, rank: int, world: int, shuffle: bool,
                 seed: int = 0):
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        largest = -(-n // world)  # the biggest share, ceil(n / world)
        # ... but never more batches than the smallest share has images: an empty batch
        # would average over none (then a batch may exceed batch_size by an image or so)
        self.num_batches = max(1, min(-(-largest // batch_size), n // world))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        share = order[self.rank::self.world]
        for batch in torch.tensor_split(share, self.num_batches):
            yield batch.tolist()


def batch_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 shuffle: bool, rank: int = 0, world: int = 1, seed: int = 0,
                 pin_memory: bool = False, targets: torch.Tensor | None = None) -> DataLoader:
    """A DataLoader that yields whole batches by tensor indexing (no per-image collation);
    with ``targets`` (``[N, ...]``) each batch carries its rows as a third item.

    With ``world > 1`` the batches are process ``rank``'s share (:class:`ShardedBatches`).
    ``pin_memory`` (for a GPU) puts each batch in page-locked memory, so that its copy to
    the GPU can run asynchronously (Lightning then transfers it with ``non_blocking``).
    """
    ds = _Batches(images, labels, targets)
    if world > 1:
        batches = ShardedBatches(len(ds), batch_size, rank, world, shuffle, seed)
    else:
        order = RandomSampler(ds) if shuffle else SequentialSampler(ds)
        batches = BatchSampler(order, batch_size, drop_last=False)
    return DataLoader(ds, sampler=batches, batch_size=None, pin_memory=pin_memory)
