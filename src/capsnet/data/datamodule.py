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
from .datasets import ImageDataset, center_crop, split_fingerprint, stratified_split
from .generated import val_split
from .registry import dataset_info, load_dataset


class ImageDataModule(L.LightningDataModule):
    """A registered dataset (:mod:`capsnet.data.registry`) in memory.

    ``train_size`` keeps only the first N training images; ``val_size`` carves N images
    (class-stratified, seeded: :func:`stratified_split`; a seeded random draw for multi-label
    data) out of the training set for validation, before ``train_size`` applies;
    ``test_size`` evaluates on the first N test images only (quick runs; the default is all
    of them). ``val_size_origin``: what an error calls ``val_size`` (the flag, or where a
    run recorded it). ``options`` (``image_size``, ``test_fraction``) go to
    :func:`~capsnet.data.registry.load_dataset`. ``shape`` is what the model sees: for a
    dataset served larger than that (smallNORB, ``info.crop``), validation and test images
    are centre crops and training takes random crops (:mod:`capsnet.data.augment`). For the
    sets generated from Fashion-MNIST (``info.protocol``, :mod:`capsnet.data.generated`) the
    training split is the 28x28 garments (the LightningModule makes pairs or random
    placements per batch) and the validation split is turned into its fixed pairs or
    positions (:func:`~capsnet.data.generated.val_split`).
    """

    def __init__(self, dataset: str = "fashion-mnist", data_dir: str | Path | None = None,
                 batch_size: int = 128, eval_batch_size: int = 512,
                 train_size: int | None = None, val_size: int = 5000,
                 test_size: int | None = None, split_seed: int = 0, seed: int = 0,
                 options: dict | None = None, val_size_origin: str = "--val-size"):
        super().__init__()
        self.dataset, self.data_dir = dataset, data_dir
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.train_size, self.val_size, self.test_size = train_size, val_size, test_size
        self.split_seed, self.seed = split_seed, seed
        self.options = {k: v for k, v in (options or {}).items() if v is not None}
        self.val_size_origin = val_size_origin  # what errors call val_size: the flag, or a record
        self.train: ImageDataset | None = None
        self.train_targets: torch.Tensor | None = None  # a teacher's [N, O] (capsnet.distill)
        self.info = dataset_info(dataset)

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        train, test = load_dataset(self.dataset, self.data_dir, **self.options)
        self.classes = train.classes
        self.shape = test.shape  # the model's input (test images are centre-cropped)
        if self.info.protocol:  # generated from Fashion-MNIST: 28x28 garments in training
            self.shape = self.info.image_shape  # (and packed pairs carry three images)
        self.multi_label = self.info.multi_label
        self.val = None
        self.train_index = self.val_index = None  # into the dataset's training split
        self.pool = None  # split_fingerprint of the images val is carved from
        if self.val_size:  # carved out of all training images first, so --train-size keeps it
            if self.val_size >= len(train):
                raise CapsnetError(f"{self.val_size_origin} {self.val_size} leaves no "
                                   f"training images (the training set has {len(train):,})")
            if self.multi_label:  # no single class to stratify by
                g = torch.Generator().manual_seed(self.split_seed)
                order = torch.randperm(len(train), generator=g)
                val_idx = order[:self.val_size].sort().values
                train_idx = order[self.val_size:].sort().values
            else:
                val_idx, train_idx = stratified_split(train.labels, self.val_size,
                                                      self.split_seed)
            self.val_index, self.train_index = val_idx, train_idx
            self.pool = split_fingerprint(train.labels)
            val_images = train.images[val_idx]
            if self.info.crop:
                val_images = center_crop(val_images, self.info.crop).contiguous()
            self.val = ImageDataset(val_images, train.labels[val_idx], train.classes)
            self.val = val_split(self.info.protocol, self.val)  # fixed pairs or positions
            train = ImageDataset(train.images[train_idx], train.labels[train_idx], train.classes)
        if self.train_size:
            train = ImageDataset(train.images[:self.train_size], train.labels[:self.train_size],
                                 train.classes)
        if self.test_size:
            test = ImageDataset(test.images[:self.test_size], test.labels[:self.test_size],
                                test.classes)
        self.train, self.test = train, test

    def _shard(self) -> dict:
        """This process's place among the data-parallel processes, and whether batches go to
        a GPU (nothing outside a Trainer)."""
        t = getattr(self, "trainer", None)
        if t is None:
            return {}
        pin = {"pin_memory": t.strategy.root_device.type == "cuda"}
        if t.world_size == 1:
            return pin
        return {"rank": t.global_rank, "world": t.world_size, "seed": self.seed, **pin}

    def train_dataloader(self) -> DataLoader:
        return batch_loader(self.train.images, self.train.labels, self.batch_size, True,
                            targets=self.train_targets, **self._shard())

    def eval_splits(self) -> dict[str, ImageDataset]:
        """The splits evaluated after every epoch, in order: ``val`` (if any), then ``test``."""
        return {**({"val": self.val} if self.val is not None else {}), "test": self.test}

    def val_dataloader(self) -> list[DataLoader]:
        return [batch_loader(s.images, s.labels, self.eval_batch_size, False, **self._shard())
                for s in self.eval_splits().values()]

