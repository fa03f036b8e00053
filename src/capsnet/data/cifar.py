"""CIFAR-10 and CIFAR-100, the BINARY versions only (the "python versions" are pickles, which
capsnet never unpickles: loading a pickle can run arbitrary code).

Layout (as in the published archives; ``data_dir`` may be the folder itself or hold it):

* CIFAR-10 ``cifar-10-batches-bin/``: ``data_batch_1.bin`` .. ``data_batch_5.bin`` (training),
  ``test_batch.bin``, ``batches.meta.txt``. A record is 1 label byte (0..9) + 3072 pixel bytes.
* CIFAR-100 ``cifar-100-binary/``: ``train.bin``, ``test.bin``, ``coarse_label_names.txt``,
  ``fine_label_names.txt``. A record is 1 coarse-label byte (0..19), 1 fine-label byte (0..99)
  + 3072 pixel bytes. The fine labels (100 classes) are used.

The 3072 pixel bytes of a record are the red plane, then green, then blue, each 32x32
row-major, so a record's pixels reshape directly to ``[3, 32, 32]`` (channels first). The class
names are the published ones (the ``.txt`` files are not needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CapsnetError
from .datasets import ImageDataset, read_bytes

PIXELS = 3 * 32 * 32

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR100_CLASSES = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab
crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard
lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom
oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine
possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor
train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split())
assert len(CIFAR100_CLASSES) == 100


@dataclass(frozen=True)
class CifarFormat:
    """One binary CIFAR variant: where its files are and how a record is laid out."""

    name: str
    folder: str  # the sub-folder the archive extracts to
    train_files: tuple[str, ...]
    test_file: str
    extra_files: tuple[str, ...]  # extracted along, not needed for reading
    label_bytes: int  # 1 (CIFAR-10) or 2 (CIFAR-100: coarse, fine)
    label_ranges: tuple[int, ...]  # number of values of each label byte
    url: str
    md5: str
    python_folder: str  # the python (pickle) version's folder ...
    python_files: tuple[str, ...]  # ... and the files that betray it in a folder

    @property
    def record(self) -> int:
        return self.label_bytes + PIXELS

    @property
    def archive(self) -> str:
        return self.url.rsplit("/", 1)[1]


CIFAR10 = CifarFormat(
    name="cifar10", folder="cifar-10-batches-bin",
    train_files=tuple(f"data_batch_{i}.bin" for i in range(1, 6)), test_file="test_batch.bin",
    extra_files=("batches.meta.txt",), label_bytes=1, label_ranges=(10,),
    url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    md5="c32a1d4ab5d03f1284b67883e8d87530",
    python_folder="cifar-10-batches-py", python_files=("data_batch_1",))
CIFAR100 = CifarFormat(
    name="cifar100", folder="cifar-100-binary", train_files=("train.bin",),
    test_file="test.bin", extra_files=("coarse_label_names.txt", "fine_label_names.txt"),
    label_bytes=2, label_ranges=(20, 100),
    url="https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    md5="03b5dce01913d631647c71ecec9e9cb8",
    python_folder="cifar-100-python", python_files=("train", "meta"))


def find_cifar(folder: Path, fmt: CifarFormat) -> Path | None:
    """The folder holding the binary files: ``folder`` itself or ``folder/<fmt.folder>``.

    None when neither holds any of them. Raises :class:`CapsnetError` when a batch is
    missing (naming it) or when only the python (pickle) version is there.
    """
    folder = Path(folder)
    needed = (*fmt.train_files, fmt.test_file)
    for place in (folder, folder / fmt.folder):
        present = [n for n in needed if (place / n).is_file()]
        if len(present) == len(needed):
            return place
        if present:
            missing = next(n for n in needed if n not in present)
            raise CapsnetError(f"{place / missing}: missing (the {fmt.name} binary version "
                               f"needs {', '.join(needed)})")
    marker = None
    if (folder / fmt.python_folder).is_dir():
        marker = folder / fmt.python_folder
    elif all((folder / n).is_file() for n in fmt.python_files):
        marker = folder / fmt.python_files[0]
    if marker is not None:
        raise CapsnetError(
            f"{marker}: this is the {fmt.name} python version (pickles, which capsnet never "
            f"loads); get the binary version {fmt.url} and extract it in {folder}")
    return None


def read_records(path: Path, fmt: CifarFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """One binary batch file: images ``[N, 3, 32, 32]`` uint8 (R, G, B planes) and labels
    ``[N]`` int64 (the last label byte: CIFAR-10's class, CIFAR-100's fine class)."""
    data = read_bytes(path)
    if not data or len(data) % fmt.record:
        raise CapsnetError(f"{path}: {len(data)} bytes is not a whole number of "
                           f"{fmt.record}-byte records")
    rec = np.frombuffer(data, dtype=np.uint8).reshape(-1, fmt.record)
    for i, n in enumerate(fmt.label_ranges):
        bad = np.flatnonzero(rec[:, i] >= n)
        if bad.size:
            which = ("coarse " if fmt.label_bytes == 2 and i == 0 else
                     "fine " if fmt.label_bytes == 2 else "")
            raise CapsnetError(f"{path}: record {int(bad[0])}: {which}label "
                               f"{int(rec[bad[0], i])} out of range 0..{n - 1}")
    images = torch.from_numpy(rec[:, fmt.label_bytes:].reshape(-1, 3, 32, 32).copy())
    labels = torch.from_numpy(rec[:, fmt.label_bytes - 1].astype(np.int64))
    return images, labels


def read_cifar(folder: Path, fmt: CifarFormat, classes: tuple[str, ...],
               **_) -> tuple[ImageDataset, ImageDataset]:
    """``(train, test)``: images ``[N, 3, 32, 32]`` uint8, labels ``[N]`` int64 (50,000 and
    10,000 images in the published files). ``folder`` as for :func:`find_cifar`."""
    place = find_cifar(folder, fmt)
    if place is None:
        raise CapsnetError(f"{folder}: no {fmt.name} binary files ({fmt.folder}/)")
    parts = [read_records(place / n, fmt) for n in fmt.train_files]
    train = ImageDataset(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                         classes)
    test = ImageDataset(*read_records(place / fmt.test_file, fmt), classes)
    return train, test


def download_cifar(target: Path, timeout: float, fmt: CifarFormat) -> None:
    """Fetch the binary archive into ``target`` (md5-checked), extract only the expected
    files into ``target/<fmt.folder>/`` and delete the archive."""
    from .download import extract_members, fetch
    archive = fetch(fmt.url, Path(target) / fmt.archive, fmt.md5, timeout)
    members = [f"{fmt.folder}/{n}" for n in (*fmt.train_files, fmt.test_file,
                                             *fmt.extra_files)]
    extract_members(archive, target, members)
    archive.unlink()
