"""Data: the dataset registry and loading (:mod:`.registry`), one reader module per format
(:mod:`.datasets` IDX and in-memory splits, :mod:`.cifar`, :mod:`.svhn`, :mod:`.smallnorb`,
:mod:`.folder` image folders and multi-label CSVs), downloads (:mod:`.download`), batches
(:mod:`.batches`), augmentation (:mod:`.augment`) and the Lightning DataModule
(:mod:`.datamodule`, imported on its own so that inference does not load Lightning)."""

from .augment import AugmentConfig
from .batches import batch_loader, to_unit
from .datasets import ImageDataset, center_crop
from .registry import (DATASETS, DatasetSpec, cmd_datasets, dataset_info, describe_datasets,
                       load_dataset)

__all__ = ["AugmentConfig", "batch_loader", "to_unit", "DATASETS", "DatasetSpec",
           "ImageDataset", "center_crop", "cmd_datasets", "dataset_info",
           "describe_datasets", "load_dataset"]
