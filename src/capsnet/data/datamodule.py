"""The Lightning DataModule: whole splits held as uint8 tensors, served in index batches.

Batches are ``(images [B, C, H, W] uint8, labels [B] int64)``; the LightningModule turns them
into floats in [0, 1] and augments training batches on the device, so no per-image Python
work happens on the training path.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from ..errors import CapsnetError
from .batches import batch_loader
from .datasets import ImageDataset, dataset_info, load_dataset


def stratified_split(labels: torch.Tensor, n: int, seed: int = 0) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
    """``n`` indices drawn per class in proportion to its share (seeded), and the rest.

    Shapes: ``labels`` ``[N]`` -> ``(held [n], rest [N - n])``, both sorted ascending. Each
    class gets ``floor(n * share)`` images, and the remainder goes one by one to the classes
    with the largest fractional parts, so the held-out split has the class mix of the whole.
    """
    g = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    want = counts.double() * n / labels.numel()
    take = want.floor().long()
    extra = n - int(take.sum())
    take[(want - take).argsort(descending=True)[:extra]] += 1
    held = []
    for c, k in zip(classes.tolist(), take.tolist()):
        idx = (labels == c).nonzero().flatten()
        held.append(idx[torch.randperm(idx.numel(), generator=g)[:k]])
    held = torch.cat(held).sort().values
    mask = torch.ones(labels.numel(), dtype=torch.bool)
    mask[held] = False
    return held, mask.nonzero().flatten()


class ImageDataModule(L.LightningDataModule):
    """Fashion-MNIST (or MNIST) in memory.

    ``train_size`` keeps only the first N training images; ``val_size`` carves N images
    (class-stratified, seeded: :func:`stratified_split`) out of the training set for
    validation, before ``train_size`` applies; ``test_size``
    evaluates on the first N test images only (quick runs; the default is all of them).
    """

    def __init__(self, dataset: str = "fashion-mnist", data_dir: str | Path | None = None,
                 batch_size: int = 128, eval_batch_size: int = 512,
                 train_size: int | None = None, val_size: int = 5000,
                 test_size: int | None = None, split_seed: int = 0):
        super().__init__()
        self.dataset, self.data_dir = dataset, data_dir
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.train_size, self.val_size, self.test_size = train_size, val_size, test_size
        self.split_seed = split_seed
        self.train: ImageDataset | None = None
        self.info = dataset_info(dataset)

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        train, test = load_dataset(self.dataset, self.data_dir)
        self.classes = train.classes
        self.shape = train.shape
        self.val = None
        self.train_index = self.val_index = None  # into the dataset's training split
        if self.val_size:  # carved out of all training images first, so --train-size keeps it
            if self.val_size >= len(train):
                raise CapsnetError(f"--val-size {self.val_size} leaves no training images "
                                   f"(the training set has {len(train):,})")
            val_idx, train_idx = stratified_split(train.labels, self.val_size, self.split_seed)
            self.val_index, self.train_index = val_idx, train_idx
            self.val = ImageDataset(train.images[val_idx], train.labels[val_idx], train.classes)
            train = ImageDataset(train.images[train_idx], train.labels[train_idx], train.classes)
        if self.train_size:
            train = ImageDataset(train.images[:self.train_size], train.labels[:self.train_size],
                                 train.classes)
        if self.test_size:
            test = ImageDataset(test.images[:self.test_size], test.labels[:self.test_size],
                                test.classes)
        self.train, self.test = train, test

    def train_dataloader(self) -> DataLoader:
        return batch_loader(self.train.images, self.train.labels, self.batch_size, True)

    def eval_splits(self) -> dict[str, ImageDataset]:
        """The splits evaluated after every epoch, in order: ``val`` (if any), then ``test``."""
        return {**({"val": self.val} if self.val is not None else {}), "test": self.test}

    def val_dataloader(self) -> list[DataLoader]:
        return [batch_loader(s.images, s.labels, self.eval_batch_size, False)
                for s in self.eval_splits().values()]

