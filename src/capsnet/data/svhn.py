"""SVHN (Street View House Numbers), the cropped-digits format: ``train_32x32.mat``,
``test_32x32.mat`` and optionally ``extra_32x32.mat`` (MATLAB v5 files, read with
``scipy.io.loadmat``).

Each file holds ``X``: ``[32, 32, 3, N]`` uint8 (row, column, RGB channel, image) and ``y``:
``[N, 1]`` with the digits 1..9 as themselves and the digit 0 as label 10. Served as images
``[N, 3, 32, 32]`` uint8 and labels ``[N]`` int64 0..9 (10 -> 0).

The ``extra`` images (531,131 easier ones, 1.3 GB) are used only by the registered dataset
``svhn-extra``, whose training split is ``train`` + ``extra`` (same test split, same folder).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CapsnetError
from .datasets import ImageDataset

URL = "http://ufldl.stanford.edu/housenumbers/"
MD5 = {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
       "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
       "extra_32x32.mat": "a93ce644f1a588dc4d68dda5feec44a7"}
CLASSES = tuple(str(d) for d in range(10))


def split_files(extra: bool) -> tuple[str, ...]:
    return ("train_32x32.mat", "test_32x32.mat") + (("extra_32x32.mat",) if extra else ())


def find_svhn(folder: Path, extra: bool = False) -> Path | None:
    """``folder`` if it holds the ``.mat`` files (``extra_32x32.mat`` too when ``extra``)."""
    folder = Path(folder)
    return folder if all((folder / n).is_file() for n in split_files(extra)) else None


def find_svhn_test(folder: Path) -> Path | None:
    """``folder`` if it holds ``test_32x32.mat`` (all that evaluation needs), else None."""
    return Path(folder) if (Path(folder) / "test_32x32.mat").is_file() else None


def read_svhn_test(folder: Path) -> ImageDataset:
    """The test split alone (``svhn`` and ``svhn-extra`` share it): evaluating needs neither
    the training file nor the 1.3 GB extra one."""
    path = Path(folder) / "test_32x32.mat"
    if not path.is_file():
        raise CapsnetError(f"{path}: missing")
    return ImageDataset(*read_mat(path), CLASSES)


def read_mat(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One SVHN ``.mat`` file: images ``[N, 3, 32, 32]`` uint8, labels ``[N]`` int64 0..9.

    Raises :class:`CapsnetError` naming the file for a MATLAB v7.3 (HDF5) or unreadable
    file, missing ``X``/``y``, wrong shapes or dtype, a count mismatch or a label outside
    1..10.
    """
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, variable_names=("X", "y"))
    except NotImplementedError:  # scipy's answer to v7.3 files
        raise CapsnetError(f"{path}: a MATLAB v7.3 (HDF5) file; SVHN's published files are "
                           f"v5 ({URL})") from None
    except Exception as e:  # scipy raises many types for damaged files; all mean "unreadable"
        raise CapsnetError(f"{path}: cannot read the .mat file "
                           f"({type(e).__name__}: {e})".replace("\n", " ")) from None
    for key in ("X", "y"):
        if key not in mat:
            raise CapsnetError(f"{path}: no variable {key!r} (an SVHN file holds X and y)")
    x, y = mat["X"], mat["y"]
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise CapsnetError(f"{path}: X is {x.dtype} {list(x.shape)}, expected uint8 "
                           "[32, 32, 3, N]")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer)
                           or np.issubdtype(y.dtype, np.floating)):
        raise CapsnetError(f"{path}: y is {y.dtype} {list(mat['y'].shape)}, expected [N, 1] "
                           "numbers")
    n = x.shape[3]
    if y.shape[0] != n:
        raise CapsnetError(f"{path}: X holds {n} images but y holds {y.shape[0]} labels")
    bad = np.flatnonzero((y < 1) | (y > 10) | (y != np.round(y)))
    if bad.size:
        raise CapsnetError(f"{path}: label {y[bad[0]]} (image {int(bad[0])}) out of range "
                           "1..10")
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))
    labels = torch.from_numpy(y.astype(np.int64) % 10)
    return images, labels


def read_svhn(folder: Path, extra: bool = False, **_) -> tuple[ImageDataset, ImageDataset]:
    """``(train, test)`` from ``folder``: images ``[N, 3, 32, 32]`` uint8, labels ``[N]``
    int64 (73,257 + 26,032 images in the published files; with ``extra`` the 531,131 extra
    images are appended to the training split)."""
    folder = Path(folder)
    missing = [n for n in split_files(extra) if not (folder / n).is_file()]
    if missing:
        raise CapsnetError(f"{folder / missing[0]}: missing")
    train = [read_mat(folder / n) for n in split_files(extra) if n != "test_32x32.mat"]
    images = torch.cat([t[0] for t in train]) if extra else train[0][0]
    labels = torch.cat([t[1] for t in train]) if extra else train[0][1]
    return (ImageDataset(images, labels, CLASSES),
            ImageDataset(*read_mat(folder / "test_32x32.mat"), CLASSES))


def download_svhn(target: Path, timeout: float, extra: bool = False) -> None:
    """Fetch the ``.mat`` files into ``target`` (md5-checked, atomic)."""
    from .download import fetch
    for name in split_files(extra):
        fetch(URL + name, Path(target) / name, MD5[name], timeout)
