"""The Lightning DataModule: whole splits held as uint8 tensors, served in index batches.

Batches are ``(images [B, C, H, W] uint8, labels [B] int64)``; the LightningModule turns them
into floats in [0, 1] and augments training batches on the device, so no per-image Python
work happens on the training path.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from .datasets import ImageDataset, load_dataset


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


class ImageDataModule(L.LightningDataModule):
    """Fashion-MNIST (or MNIST) in memory.

    ``train_size`` keeps only the first N training images; ``val_size`` carves N images
    (a fixed, seeded random choice) out of the training set for validation; ``test_size``
    evaluates on the first N test images only (quick runs; the default is all of them).
    """

    def __init__(self, dataset: str = "fashion-mnist", data_dir: str | Path | None = None,
                 batch_size: int = 128, eval_batch_size: int = 512,
                 train_size: int | None = None, val_size: int = 0,
                 test_size: int | None = None, split_seed: int = 0):
        super().__init__()
        self.dataset, self.data_dir = dataset, data_dir
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.train_size, self.val_size, self.test_size = train_size, val_size, test_size
        self.split_seed = split_seed
        self.train: ImageDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        train, test = load_dataset(self.dataset, self.data_dir)
        self.classes = train.classes
        self.shape = train.shape
        if self.train_size:
            train = ImageDataset(train.images[:self.train_size], train.labels[:self.train_size],
                                 train.classes)
        self.val = None
        if self.val_size:
            if self.val_size >= len(train):
                from .errors import CapsnetError
                raise CapsnetError(f"--val-size {self.val_size} leaves no training images")
            perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(
                self.split_seed))
            val_idx, train_idx = perm[:self.val_size], perm[self.val_size:].sort().values
            self.val = ImageDataset(train.images[val_idx], train.labels[val_idx], train.classes)
            train = ImageDataset(train.images[train_idx], train.labels[train_idx], train.classes)
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

    def test_dataloader(self) -> DataLoader:
        return batch_loader(self.test.images, self.test.labels, self.eval_batch_size, False)
