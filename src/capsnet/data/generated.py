"""The datasets generated from Fashion-MNIST for the paper's two robustness claims, as the
registry (:mod:`capsnet.data.registry`) serves them, and their cache.

- ``multi-fashion-mnist`` (1x36x36): training split = the 28x28 garments, made into pairs
  per batch (:func:`capsnet.data.multi.make_pairs`); validation and test = fixed pairs, one
  per garment, packed as :mod:`capsnet.data.multi` describes.
- ``fashion-mnist-expanded`` (1x40x40): training split = the 28x28 garments, each placed at a
  random position on the 40x40 canvas per batch (:func:`capsnet.data.affine.random_placement`);
  validation and test = each garment at a fixed random position.
- ``fashion-mnist-affine`` (1x40x40): evaluation only (``capsnet train`` refuses it); test =
  each test garment under a fixed random affine map in affNIST's ranges.

The generated test sets are fixed: drawn with :data:`TEST_SEED` (validation sets with
:data:`VAL_SEED`) by torch's seeded CPU generator, and cached under the per-user cache
(:func:`~capsnet.data.registry.cache_dir` of the dataset's name) as ``test-v1.npz`` (the
uint8 images, labels and every drawn parameter: partners, shifts, affine maps) beside
``test-v1.json`` (the parameters, a SHA-256 of the source test split and of the arrays, and
for the pairs their measured bounding-box overlap). Both are written atomically; a cache
whose parameters, source or checksum do not match is rebuilt; nothing is pickled.

Why one partner per test garment (10,000 test pairs; the paper made 1,000 per digit, 10
million pairs): evaluation then runs on 10,000 images, as on the plain test set, which on
this CPU a per-epoch evaluation can afford, and the pair accuracy's standard error is still
about 0.3 points at 90%. Validation pairs are made the same way from the validation
garments (one partner each, other classes of the validation split).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..errors import CapsnetError
from . import affine, multi
from .augment import AUGMENT_FLAGS
from .datasets import ImageDataset, read_idx_dataset

TEST_SEED = 171009829  # arXiv 1710.09829, the paper
VAL_SEED = TEST_SEED + 1
TEST_PARTNERS = 1  # pairs per test garment (see the module docstring)
VAL_PARTNERS = 1
CACHE_KEY = "test-v1"

MULTI, EXPANDED, AFFINE = "multi", "expanded", "affine"


def digest(*tensors: Tensor) -> str:
    """SHA-256 of tensors' dtypes, shapes and bytes (in order)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _arrays_digest(arrays: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode() + b"|" + digest(arrays[k]).encode())
    return h.hexdigest()


def cached_arrays(name: str, key: str, params: dict,
                  build: Callable[[], tuple[dict[str, Tensor], dict]],
                  folder: Path | None = None) -> tuple[dict[str, Tensor], dict]:
    """``(arrays, info)`` from ``folder/key.npz`` + ``key.json`` when their parameters equal
    ``params`` and the arrays their recorded SHA-256; else ``build()`` (which returns both),
    saved atomically there (an unwritable cache is skipped). ``folder`` defaults to
    :func:`~capsnet.data.registry.cache_dir` ``(name)``."""
    from ..checkpoints import atomic_write
    from .registry import cache_dir
    folder = Path(folder) if folder is not None else cache_dir(name)
    meta_path, data_path = folder / f"{key}.json", folder / f"{key}.npz"
    params = json.loads(json.dumps(params))  # tuples -> lists, as they come back from JSON
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("params") == params:
            with np.load(data_path, allow_pickle=False) as z:
                arrays = {k: torch.from_numpy(z[k].copy()) for k in z.files}
            if _arrays_digest(arrays) == meta.get("sha256"):
                return arrays, meta.get("info", {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError,
            zipfile.BadZipFile, zlib.error):
        pass  # missing or damaged (a cut or altered .npz too): rebuilt below
    arrays, info = build()
    meta = {"name": name, "key": key, "params": params, "sha256": _arrays_digest(arrays),
            "info": info, "arrays": {k: [str(v.dtype), list(v.shape)] for k, v in arrays.items()}}
    try:
        atomic_write(data_path, lambda f: np.savez_compressed(
            f, **{k: v.cpu().numpy() for k, v in arrays.items()}))
        atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    except OSError:
        pass  # a read-only cache: the set is simply built again next time
    return arrays, info


# --------------------------------------------------------------------------- the splits

def build_test(protocol: str, test: ImageDataset) -> tuple[dict[str, Tensor], dict]:
    """The generated test set's arrays (``images``, ``labels`` and the drawn parameters) and
    its info, built from Fashion-MNIST's ``test`` split (no cache)."""
    if protocol == MULTI:
        table = multi.pair_table(test.labels, TEST_PARTNERS, TEST_SEED)
        images, labels = multi.compose_pairs(test.images, test.labels, table)
        return ({"images": images, "labels": labels, **table},
                multi.pair_overlap(images))
    if protocol == EXPANDED:
        images, shifts = affine.fixed_placement(test.images, TEST_SEED)
        return {"images": images, "labels": test.labels, "shifts": shifts}, {}
    if protocol == AFFINE:
        images, params = affine.affine_set(test.images, TEST_SEED, affine.AFFNIST)
        return {"images": images, "labels": test.labels, **params}, {}
    raise ValueError(f"unknown protocol {protocol!r}")


def test_params(protocol: str, test: ImageDataset) -> dict:
    """Everything the generated test set depends on (compared with the cache's record)."""
    params = {"protocol": protocol, "version": 1, "seed": TEST_SEED,
              "source": digest(test.images, test.labels)}
    if protocol == MULTI:
        params.update(partners=TEST_PARTNERS, max_shift=multi.MAX_SHIFT, canvas=multi.CANVAS)
    else:
        params["canvas"] = affine.EXPANDED
    if protocol == AFFINE:
        params["ranges"] = affine.AFFNIST.to_dict()
    return params


def test_split(name: str, protocol: str, test: ImageDataset,
               folder: Path | None = None) -> tuple[ImageDataset, dict]:
    """The generated test split (cached, see the module docstring) and its info."""
    arrays, info = cached_arrays(name, CACHE_KEY, test_params(protocol, test),
                                 lambda: build_test(protocol, test), folder)
    return ImageDataset(arrays["images"], arrays["labels"], test.classes), info


def read_generated(folder: Path, *, name: str, protocol: str, classes
                   ) -> tuple[ImageDataset, ImageDataset]:
    """The registry's reader: Fashion-MNIST's four IDX files in ``folder`` -> ``(the
    training garments [N, 1, 28, 28], the generated test split)``."""
    train, test = read_idx_dataset(folder, classes)
    return train, test_split(name, protocol, test)[0]


def val_split(protocol: str | None, val: ImageDataset) -> ImageDataset:
    """The fixed validation set of a protocol from the validation garments (seeded with
    :data:`VAL_SEED`): pairs (one per garment) or fixed random positions on 40x40; other
    datasets' validation splits are returned unchanged."""
    if protocol == MULTI:
        if len(val.labels.unique()) < 2:
            raise CapsnetError(f"--val-size {len(val)}: validation pairs need garments of "
                               "two classes at least")
        table = multi.pair_table(val.labels, VAL_PARTNERS, VAL_SEED)
        return ImageDataset(*multi.compose_pairs(val.images, val.labels, table), val.classes)
    if protocol == EXPANDED:
        return ImageDataset(affine.fixed_placement(val.images, VAL_SEED)[0], val.labels,
                            val.classes)
    return val


def check_training(s: dict) -> None:
    """One-line errors for a training run a generated dataset cannot take: training on the
    affine test set, augmentation flags the protocol replaces, a softmax baseline on pairs
    or on multi-label data."""
    from ..models import objective
    from ..settings import DEFAULTS
    from .registry import dataset_info
    spec = dataset_info(s["dataset"])
    if spec.protocol == AFFINE:
        raise CapsnetError(f"{spec.name} is a test set only (Fashion-MNIST's test garments "
                           "under random affine maps); train on fashion-mnist-expanded and "
                           f"evaluate with `capsnet evaluate MODEL --dataset {spec.name}`")
    if spec.protocol in (MULTI, EXPANDED):
        how = ("each garment is shifted by up to 4 pixels when pairs are made" if
               spec.protocol == MULTI else "its garments are placed at random on the 40x40 "
               "canvas (shifts of up to 6 pixels)")
        for key in AUGMENT_FLAGS:  # replaced by the protocol's own placement
            if s.get(key, DEFAULTS[key]) != DEFAULTS[key]:
                raise CapsnetError(f"--{key} does not apply to {spec.name}: {how}")
    kind = objective(s["arch"])
    if kind == "cross_entropy" and (spec.protocol == MULTI or spec.multi_label):
        what = "two garments per image" if spec.protocol == MULTI else "several labels"
        raise CapsnetError(f"--arch {s['arch']} has one softmax over the classes and "
                           f"{spec.name} has {what}; use --arch baseline-cnn-multi")
