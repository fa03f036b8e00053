"""Fashion-MNIST and MNIST from their original IDX files: find, download, parse, validate.

The IDX format: a big-endian header ``0x00 0x00 <type> <ndims>`` followed by ``ndims``
big-endian uint32 sizes, then the data. Type 0x08 is unsigned byte; images have 3 dims
(magic 0x00000803), labels 1 dim (magic 0x00000801).

Where the files are looked for, in order (the first folder holding all four wins):
``--data-dir`` (when given, the ONLY place, and the download target), ``$CAPSNET_DATA``
(the folder itself or its ``<dataset>/`` sub-folder), the Debian package's folder
``/usr/share/datasets/<dataset>/`` and the per-user cache ``~/.cache/capsnet/<dataset>/``
(``$XDG_CACHE_HOME`` respected), where downloads go.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CapsnetError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    classes: tuple[str, ...]
    mirrors: tuple[str, ...]
    md5: dict  # file name (.gz) -> md5 of the official download
    debian_dir: str
    debian_package: str | None
    hflip_ok: bool  # horizontal flips keep the class (clothing: yes, digits: no)


DATASETS = {
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot"),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                 "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
        md5={"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
             "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
             "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
             "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
        debian_dir="/usr/share/datasets/fashion-mnist",
        debian_package="dataset-fashion-mnist",
        hflip_ok=True,
    ),
    "mnist": DatasetInfo(
        name="mnist",
        classes=tuple(str(d) for d in range(10)),
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        md5={"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
             "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
             "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
             "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
        debian_dir="/usr/share/datasets/mnist",
        debian_package=None,
        hflip_ok=False,
    ),
}


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise CapsnetError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}") from None


# --------------------------------------------------------------------------- IDX parsing

def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise CapsnetError(f"{path}: cannot read ({e})") from None


def read_idx(path: str | Path, ndim: int) -> Tensor:
    """Parse an unsigned-byte IDX file (gzipped or raw) with ``ndim`` dimensions.

    Returns a uint8 tensor of the stored shape; raises :class:`CapsnetError` naming the file
    on a wrong magic number, wrong number of dimensions, or a size that does not match.
    """
    path = Path(path)
    data = _read_bytes(path)
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
    if labels.numel() and int(labels.max()) >= num_classes:
        raise CapsnetError(f"{labels_path}: label {int(labels.max())} out of range "
                           f"0..{num_classes - 1}")
    return images.unsqueeze(1), labels.long()


# --------------------------------------------------------------------------- finding files

def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def files_in(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in ``folder`` (``.gz`` preferred), or None if any is missing."""
    found = {key: _find_file(folder, stem) for key, stem in FILES.items()}
    return None if None in found.values() else found


def cache_dir(name: str) -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "capsnet" / name


def candidate_dirs(info: DatasetInfo, data_dir: str | Path | None) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir)]
    dirs = []
    env = os.environ.get("CAPSNET_DATA")
    if env:
        dirs += [Path(env), Path(env) / info.name]
    return dirs + [Path(info.debian_dir), cache_dir(info.name)]


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(info: DatasetInfo, target: Path, timeout: float = 30.0) -> dict[str, Path]:
    """Fetch the four ``.gz`` files from the official mirrors into ``target``, md5-checked.

    Each file is written to a temporary name and renamed only once its checksum matches.
    Raises :class:`CapsnetError` if no mirror delivers a file; a folder this call created is
    removed again then, so a mistyped ``--data-dir`` leaves nothing behind.
    """
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    try:
        _fetch_all(info, target, timeout)
    except BaseException:
        if created:
            shutil.rmtree(target, ignore_errors=True)
        raise
    found = files_in(target)
    assert found is not None
    return found


def _fetch_all(info: DatasetInfo, target: Path, timeout: float) -> None:
    for stem in FILES.values():
        name = stem + ".gz"
        dest = target / name
        if dest.is_file() and _md5(dest) == info.md5[name]:
            continue
        errors = []
        for mirror in info.mirrors:
            fd, tmp = tempfile.mkstemp(dir=target, prefix=name + ".", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(mirror + name,
                                                                        timeout=timeout) as r:
                    shutil.copyfileobj(r, out)
                if _md5(Path(tmp)) != info.md5[name]:
                    errors.append(f"{mirror}: checksum mismatch")
                    continue
                os.replace(tmp, dest)
                break
            except OSError as e:
                errors.append(f"{mirror}: {getattr(e, 'reason', e)}")
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            raise CapsnetError(f"could not download {name}: " + "; ".join(errors))


def locate(name: str = "fashion-mnist", data_dir: str | Path | None = None,
           allow_download: bool = True) -> dict[str, Path]:
    """Find the dataset's four files (see the module docstring), downloading them if needed."""
    info = dataset_info(name)
    dirs = candidate_dirs(info, data_dir)
    for folder in dirs:
        found = files_in(folder)
        if found:
            return found
    target = dirs[0] if data_dir is not None else cache_dir(info.name)
    if allow_download:
        try:
            return download(info, target)
        except CapsnetError as e:
            reason = str(e)
    else:
        reason = "download disabled"
    apt = (f"`apt-get install {info.debian_package}` (Debian) or "
           if info.debian_package else "")
    raise CapsnetError(
        f"{info.name} not found in {', '.join(map(str, dirs))} and the download failed "
        f"({reason}); get it with {apt}by placing the four IDX files "
        f"({', '.join(s + '.gz' for s in FILES.values())}) in --data-dir or $CAPSNET_DATA")


@dataclass
class ImageDataset:
    """A whole split in memory: ``images`` ``[N, C, H, W]`` uint8, ``labels`` ``[N]`` int64."""

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])


def load_dataset(name: str = "fashion-mnist", data_dir: str | Path | None = None,
                 allow_download: bool = True) -> tuple[ImageDataset, ImageDataset]:
    """``(train, test)`` of a dataset, found, validated and held in memory as uint8."""
    info = dataset_info(name)
    files = locate(name, data_dir, allow_download)
    n = len(info.classes)
    train = load_split(files["train_images"], files["train_labels"], n)
    test = load_split(files["test_images"], files["test_labels"], n)
    if train[0].shape[1:] != test[0].shape[1:]:
        raise CapsnetError(f"{files['test_images']}: image size {tuple(test[0].shape[2:])} "
                           f"differs from the training images' {tuple(train[0].shape[2:])}")
    return ImageDataset(*train, info.classes), ImageDataset(*test, info.classes)
