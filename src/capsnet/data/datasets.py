"""In-memory splits (:class:`ImageDataset`), shared helpers, and the IDX format of
Fashion-MNIST and MNIST.

The dataset registry, the search for files and :func:`load_dataset` live in
:mod:`capsnet.data.registry`; the names ``DATASETS``, ``DatasetSpec``, ``dataset_info``,
``load_dataset``, ``cache_dir``, ``candidate_dirs``, ``describe_datasets`` and
``cmd_datasets`` are importable from here too (re-exported on first use).

The IDX format: a big-endian header ``0x00 0x00 <type> <ndims>`` followed by ``ndims``
big-endian uint32 sizes, then the data. Type 0x08 is unsigned byte; images have 3 dims
(magic 0x00000803), labels 1 dim (magic 0x00000801). Files may be gzipped (``.gz``).
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..errors import CapsnetError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
TEST_FILES = ("test_images", "test_labels")  # what evaluating on the test set reads

_REEXPORTED = ("DATASETS", "DatasetSpec", "dataset_info", "load_dataset", "cache_dir",
               "candidate_dirs", "describe_datasets", "cmd_datasets", "locate_folder")


def __getattr__(name: str):
    """``DATASETS``, ``dataset_info``, ``load_dataset``, ... from :mod:`.registry` (imported
    lazily: the registry imports this module)."""
    if name in _REEXPORTED:
        from . import registry
        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- splits in memory

@dataclass
class ImageDataset:
    """A whole split in memory.

    ``images`` ``[N, C, H, W]`` uint8; ``labels`` ``[N]`` int64 (single-label) or ``[N, K]``
    uint8 k-hot (multi-label, ``K = len(classes)``); ``classes`` the class names.
    """

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])

    @property
    def multi_label(self) -> bool:
        """True when ``labels`` is ``[N, K]`` k-hot."""
        return self.labels.dim() == 2


def center_crop(images: Tensor, size: int) -> Tensor:
    """The central ``size x size`` patch: ``[..., H, W]`` -> ``[..., size, size]`` (a view).

    When ``H - size`` is odd the extra row (column) is left at the bottom (right).
    """
    h, w = images.shape[-2:]
    if size > h or size > w:
        raise CapsnetError(f"cannot centre-crop {h}x{w} images to {size}x{size}")
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top:top + size, left:left + size]


def stratified_split(labels: Tensor, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` indices drawn per class in proportion to its share (seeded), and the rest.

    Shapes: ``labels`` ``[N]`` -> ``(held [n], rest [N - n])``, both sorted ascending. Each
    class gets ``floor(n * share)`` items and the remainder goes one by one to the classes
    with the largest fractional parts, so the held-out split has the class mix of the whole.
    """
    g = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    want = counts.double() * n / labels.numel()
    take = want.floor().long()
    extra = n - int(take.sum())
    take[(want - take).argsort(descending=True, stable=True)[:extra]] += 1  # ties: by class
    held = [torch.zeros(0, dtype=torch.long)]
    for c, k in zip(classes.tolist(), take.tolist()):
        idx = (labels == c).nonzero().flatten()
        held.append(idx[torch.randperm(idx.numel(), generator=g)[:k]])
    held = torch.cat(held).sort().values
    mask = torch.ones(labels.numel(), dtype=torch.bool)
    mask[held] = False
    return held, mask.nonzero().flatten()


def split_fingerprint(labels: Tensor) -> str:
    """``"N:digest"``: the number of images a validation split is carved from and a digest of
    their labels in order (``[N]`` classes or ``[N, K]`` multi-label rows).

    The carve (:func:`stratified_split`) picks positions, so it gives the same images again
    only from the same list: a folder that gained or lost images since a run would give other
    validation images, some of them trained on. The run records this; ``evaluate --split
    val`` and ``--resume`` refuse a different one. (Images swapped for others with the same
    labels in the same places are not detected.)
    """
    import hashlib
    data = labels.to(torch.int64).contiguous().numpy().tobytes()
    return f"{labels.shape[0]}:{hashlib.sha256(data).hexdigest()[:16]}"


def refuse_changed_pool(was: str | None, now: str | None, where, consequence: str) -> None:
    """One-line error naming ``where`` when two :func:`split_fingerprint` values (the run's,
    the data's now) differ; nothing when either is unknown (runs before 2026-12-05)."""
    if not was or not now or was == now:
        return
    n_was, n_now = (int(f.split(":")[0]) for f in (was, now))
    what = (f"{n_was:,} images then, {n_now:,} now" if n_was != n_now
            else f"{n_now:,} images then and now, with other labels or in another order")
    raise CapsnetError(f"{where}: the dataset's training images have changed since the run "
                       f"({what}); {consequence}")


def read_bytes(path: Path) -> bytes:
    """A file's bytes, gunzipped when its name ends in ``.gz``; one-line error otherwise."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:  # zlib: a damaged body
        raise CapsnetError(f"{path}: cannot read ({e})") from None


def find_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem.gz`` or ``folder/stem``, whichever exists (``.gz`` preferred)."""
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def check_labels(labels: Tensor, num_classes: int, path: Path, low: int = 0) -> None:
    """One-line error naming ``path`` if a label is outside ``low .. low + num_classes - 1``."""
    if labels.numel() and (int(labels.min()) < low or int(labels.max()) >= low + num_classes):
        bad = int(labels.max()) if int(labels.max()) >= low + num_classes else int(labels.min())
        raise CapsnetError(f"{path}: label {bad} out of range {low}..{low + num_classes - 1}")


# --------------------------------------------------------------------------- IDX parsing

def read_idx(path: str | Path, ndim: int) -> Tensor:
    """Parse an unsigned-byte IDX file (gzipped or raw) with ``ndim`` dimensions.

    Returns a uint8 tensor of the stored shape; raises :class:`CapsnetError` naming the file
    on a wrong magic number, wrong number of dimensions, or a size that does not match.
    """
    path = Path(path)
    data = read_bytes(path)
    if len(data) < 4:
        raise CapsnetError(f"{path}: not an IDX file (only {len(data)} bytes)")
    zero, dtype, nd = struct.unpack(">HBB", data[:4])
    magic = int.from_bytes(data[:4], "big")
    if zero != 0 or dtype != 0x08 or nd != ndim:
        raise CapsnetError(f"{path}: bad IDX magic number 0x{magic:08x} "
                           f"(expected 0x{0x0800 + ndim:08x})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CapsnetError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = 1
    for d in dims:
        expected *= d
    got = len(data) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise CapsnetError(f"{path}: {what}: header says {'x'.join(map(str, dims))} = "
                           f"{expected} bytes of data, file holds {got}")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).view(*dims)


def load_split(images_path: Path, labels_path: Path, num_classes: int) -> tuple[Tensor, Tensor]:
    """Images ``[N, 1, H, W]`` uint8 and labels ``[N]`` int64 from two IDX files, validated."""
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise CapsnetError(f"{images_path} holds {images.shape[0]} images but {labels_path} "
                           f"holds {labels.shape[0]} labels")
    check_labels(labels, num_classes, labels_path)
    return images.unsqueeze(1), labels.long()


def files_in(folder: Path, keys: Sequence[str] = tuple(FILES)) -> dict[str, Path] | None:
    """The IDX files ``keys`` (default: all four) in ``folder`` (``.gz`` preferred), or None
    if any is missing."""
    found = {key: find_file(Path(folder), FILES[key]) for key in keys}
    return None if None in found.values() else found


def check_idx_length(path: Path, ndim: int) -> None:
    """One-line error if ``path`` cannot be a whole IDX file of ``ndim`` dimensions, judged
    without reading it all: its header's sizes give the length, which a raw file's size and
    a gzip's last 4 bytes (the uncompressed length mod 2^32) must match. A file that
    disagrees, or whose start cannot be read, is then read in full (:func:`read_idx` names
    what is wrong), so a gzip of several members is not refused for its last 4 bytes. A
    header that is not such a file's is left to the reader."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            if f.read(4) != struct.pack(">I", 0x0800 + ndim):
                return
            dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        length = 4 + 4 * ndim + math.prod(dims)
        if path.suffix == ".gz":
            with open(path, "rb") as f:
                f.seek(-4, 2)
                if int.from_bytes(f.read(4), "little") == length % 2**32:
                    return
        elif path.stat().st_size == length:
            return
    except (OSError, EOFError, struct.error, zlib.error):
        pass
    read_idx(path, ndim)


def find_idx(folder: Path, keys: Sequence[str] = tuple(FILES)) -> Path | None:
    """``folder`` if it holds the IDX files ``keys`` (default: all four), else None (a
    partial set is completed by the download); one-line error if one of them is damaged
    (:func:`check_idx_length`)."""
    files = files_in(folder, keys)
    if files is None:
        return None
    for key, path in files.items():
        check_idx_length(path, 3 if key.endswith("images") else 1)
    return Path(folder)


def read_idx_dataset(folder: Path, classes: Sequence[str]) -> tuple[ImageDataset, ImageDataset]:
    """``(train, test)`` from the four IDX files in ``folder``: images ``[N, 1, H, W]`` uint8,
    labels ``[N]`` int64 in ``0 .. len(classes) - 1``."""
    files = files_in(folder)
    if files is None:
        raise CapsnetError(f"{folder}: the four IDX files ({', '.join(FILES.values())}) "
                           "are not all there")
    classes = tuple(classes)
    train = load_split(files["train_images"], files["train_labels"], len(classes))
    test = load_split(files["test_images"], files["test_labels"], len(classes))
    if train[0].shape[1:] != test[0].shape[1:]:
        raise CapsnetError(f"{files['test_images']}: image size {tuple(test[0].shape[2:])} "
                           f"differs from the training images' {tuple(train[0].shape[2:])}")
    return ImageDataset(*train, classes), ImageDataset(*test, classes)


def find_idx_test(folder: Path) -> Path | None:
    """``folder`` if it holds the two test IDX files (all that evaluation needs), else None."""
    return find_idx(folder, TEST_FILES)


def read_idx_test(folder: Path, classes: Sequence[str]) -> ImageDataset:
    """The test split alone from the two t10k IDX files in ``folder`` (as
    :func:`read_idx_dataset`'s second half), for evaluating without the training files."""
    files = files_in(folder, TEST_FILES)
    if files is None:
        raise CapsnetError(f"{folder}: the two test IDX files "
                           f"({', '.join(FILES[k] for k in TEST_FILES)}) are not both there")
    return ImageDataset(*load_split(files["test_images"], files["test_labels"], len(classes)),
                        tuple(classes))


def download_idx(target: Path, timeout: float, *, mirrors: Sequence[str],
                 md5: dict[str, str]) -> None:
    """Fetch the four ``.gz`` IDX files into ``target`` from the first mirror delivering each
    (md5-checked, atomic; see :func:`capsnet.data.download.fetch`); a file already there
    (gzipped or not) is kept, so a partial set is completed and a failure names what is
    missing."""
    from .download import fetch
    for stem in FILES.values():
        if find_file(Path(target), stem) is not None:
            continue
        name = stem + ".gz"
        fetch([m + name for m in mirrors], Path(target) / name, md5[name], timeout)


def idx_reader(classes: Sequence[str]):
    """``read(folder, **options)`` for an IDX dataset with these classes."""
    return partial(read_idx_dataset, classes=tuple(classes))


def idx_test_reader(classes: Sequence[str]):
    """``read_test(folder)`` for an IDX dataset with these classes."""
    return partial(read_idx_test, classes=tuple(classes))


def locate(name: str = "fashion-mnist", data_dir: str | Path | None = None,
           allow_download: bool = True) -> dict[str, Path]:
    """The four IDX files of ``fashion-mnist`` or ``mnist`` (searched, downloaded if needed:
    :func:`capsnet.data.registry.locate_folder`), keyed as :data:`FILES`."""
    from .registry import dataset_info, locate_folder
    folder = locate_folder(dataset_info(name), data_dir, allow_download)
    found = files_in(folder)
    if found is None:
        raise CapsnetError(f"{name} is not an IDX dataset")
    return found
