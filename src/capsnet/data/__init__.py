"""Data: dataset files (:mod:`.datasets`), batches (:mod:`.batches`), augmentation
(:mod:`.augment`) and the Lightning DataModule (:mod:`.datamodule`, imported on its own so that
inference does not load Lightning)."""

from .augment import AugmentConfig
from .batches import batch_loader, to_unit
from .datasets import DATASETS, ImageDataset, load_dataset

__all__ = ["AugmentConfig", "batch_loader", "to_unit", "DATASETS", "ImageDataset",
           "load_dataset"]
