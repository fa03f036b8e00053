"""smallNORB (LeCun, Huang & Bottou 2004): 5 toy categories, stereo 96x96 grey pairs.

Files (as published, optionally gzipped ``.gz``)::

    smallnorb-5x46789x9x18x6x2x96x96-training-{dat,cat,info}.mat   (24,300 pairs)
    smallnorb-5x01235x9x18x6x2x96x96-testing-{dat,cat,info}.mat    (24,300 pairs)

Despite ``.mat`` these are NOT MATLAB files but the NORB "binary matrix" format, all
little-endian int32s: a magic number giving the element type (``0x1E3D4C55`` uint8,
``0x1E3D4C54`` int32; others exist but smallNORB does not use them), the number of dimensions
``ndim``, then ``max(3, ndim)`` sizes (those beyond ``ndim`` are 1 and ignored), then the
elements, row-major. ``dat`` is ``[N, 2, 96, 96]`` uint8 (the left and right camera images),
``cat`` ``[N]`` int32 categories 0..4 (animal, human, airplane, truck, car), ``info`` ``[N, 4]``
int32 (instance, elevation, azimuth, lighting; validated for ``N``, otherwise unused).

Served as the CapsNet paper did (except its per-image standardization and its random
brightness and contrast in training, not implemented): the stereo pair as 2 channels,
downsampled 96 -> 48 by area averaging (the mean of each 2x2 block, rounded half up: exact
for a factor of 2, no aliasing), i.e. images ``[N, 2, 48, 48]`` uint8, labels ``[N]``
int64. Training takes random 32x32 crops (done by the trainer);
:func:`capsnet.data.registry.load_dataset` centre-crops the test split to 32x32 (the spec's
``crop``).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import CapsnetError
from .datasets import ImageDataset, check_labels, find_file, read_bytes

MAGIC_UINT8 = 0x1E3D4C55
MAGIC_INT32 = 0x1E3D4C54
_KNOWN = {0x1E3D4C51: "float32", 0x1E3D4C52: "packed", 0x1E3D4C53: "float64",
          MAGIC_INT32: "int32", MAGIC_UINT8: "uint8", 0x1E3D4C56: "int16"}
_DTYPES = {MAGIC_UINT8: np.dtype("u1"), MAGIC_INT32: np.dtype("<i4")}

CLASSES = ("animal", "human", "airplane", "truck", "car")
SERVED = 48  # the side of the served pairs (96 / 2)
STEMS = {"train": "smallnorb-5x46789x9x18x6x2x96x96-training-{}.mat",
         "test": "smallnorb-5x01235x9x18x6x2x96x96-testing-{}.mat"}
URL = "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/"
# sha256 of the published .gz files, as recorded by tensorflow_datasets
# (tensorflow_datasets/datasets/smallnorb/checksums.tsv)
SHA256 = {
    "smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat.gz":
        "5ffd6272a07d32695ee1082a26a41a93a37aab8c28da047f8c34ed348d214873",
    "smallnorb-5x46789x9x18x6x2x96x96-training-cat.mat.gz":
        "2784e542c1922060691090952b6cd6278879a216c90f81476f0f00256d42cdaa",
    "smallnorb-5x46789x9x18x6x2x96x96-training-info.mat.gz":
        "de7eb932ebe7a4ee16217fead60660d0eb3d23632c2f4d1c51f88c501c17bf32",
    "smallnorb-5x01235x9x18x6x2x96x96-testing-dat.mat.gz":
        "cf7104eed3e51174d2f65b66d1e5878b9da233b886f161b0d88f4510ba2c7474",
    "smallnorb-5x01235x9x18x6x2x96x96-testing-cat.mat.gz":
        "ecaf6d5bb8c3bc5eab9cf0258f6d2198dd474e016e374836fc097f2e5ff509ff",
    "smallnorb-5x01235x9x18x6x2x96x96-testing-info.mat.gz":
        "16adf314226327ee006d1a44db8cfef52773c06c829951d5653a9f6f310248a2",
}
KINDS = {"dat": (MAGIC_UINT8, (None, 2, 96, 96)), "cat": (MAGIC_INT32, (None,)),
         "info": (MAGIC_INT32, (None, 4))}


def read_matrix(path: Path, magic: int, shape: tuple[int | None, ...]) -> np.ndarray:
    """A NORB binary matrix file (gzipped or raw), checked against the expected element
    type (``magic``) and ``shape`` (``None``: any size). Returns a read-only array."""
    path = Path(path)
    data = read_bytes(path)
    if len(data) < 8:
        raise CapsnetError(f"{path}: not a NORB binary matrix (only {len(data)} bytes)")
    found, ndim = struct.unpack("<II", data[:8])
    if found != magic:
        what = f"a {_KNOWN[found]} matrix" if found in _KNOWN else "unknown"
        raise CapsnetError(f"{path}: magic number 0x{found:08X} ({what}), expected "
                           f"0x{magic:08X} ({_KNOWN[magic]} matrix)")
    if ndim != len(shape):
        raise CapsnetError(f"{path}: {ndim} dimensions, expected {len(shape)}")
    header = 8 + 4 * max(3, ndim)
    if len(data) < header:
        raise CapsnetError(f"{path}: truncated header")
    dims = struct.unpack(f"<{ndim}i", data[8:8 + 4 * ndim])
    if any(d < 0 for d in dims) or any(w is not None and d != w for d, w in zip(dims, shape)):
        want = "x".join("N" if w is None else str(w) for w in shape)
        raise CapsnetError(f"{path}: dimensions {'x'.join(map(str, dims))}, expected {want}")
    dtype = _DTYPES[magic]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise CapsnetError(f"{path}: {what}: the header says {'x'.join(map(str, dims))} = "
                           f"{expected} bytes of data, the file holds {got}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def downsample2(pairs: np.ndarray, chunk: int = 2048) -> torch.Tensor:
    """Halve height and width by averaging 2x2 blocks (rounded half up):
    ``[N, C, H, W]`` uint8 -> ``[N, C, H/2, W/2]`` uint8, in chunks to bound memory."""
    n, c, h, w = pairs.shape
    out = torch.empty(n, c, h // 2, w // 2, dtype=torch.uint8)
    for i in range(0, n, chunk):
        x = torch.from_numpy(pairs[i:i + chunk].astype(np.int16))
        s = x.view(-1, c, h // 2, 2, w // 2, 2).sum((3, 5), dtype=torch.int16)
        out[i:i + chunk] = torch.div(s + 2, 4, rounding_mode="floor").to(torch.uint8)
    return out


def _files(folder: Path, split: str) -> dict[str, Path | None]:
    return {k: find_file(Path(folder), STEMS[split].format(k)) for k in KINDS}


def find_smallnorb(folder: Path) -> Path | None:
    """``folder`` if it holds all six files (raw or ``.gz``), else None (a partial set is
    completed by the download)."""
    ok = all(p is not None for s in STEMS for p in _files(folder, s).values())
    return Path(folder) if ok else None


def read_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``split`` ("train" or "test"): images ``[N, 2, 48, 48]`` uint8, labels ``[N]``
    int64 0..4, validated (types, dimensions, sizes, the same ``N`` in all three files)."""
    files = _files(folder, split)
    for kind, p in files.items():
        if p is None:
            raise CapsnetError(f"{Path(folder) / STEMS[split].format(kind)}: missing")
    arrays = {k: read_matrix(files[k], *KINDS[k]) for k in KINDS}
    n = arrays["dat"].shape[0]
    for k in ("cat", "info"):
        if arrays[k].shape[0] != n:
            raise CapsnetError(f"{files['dat']} holds {n} image pairs but {files[k]} holds "
                               f"{arrays[k].shape[0]} rows")
    labels = torch.from_numpy(arrays["cat"].astype(np.int64))
    check_labels(labels, len(CLASSES), files["cat"])
    return downsample2(arrays["dat"]), labels


def read_smallnorb(folder: Path, **_) -> tuple[ImageDataset, ImageDataset]:
    """``(train, test)``, both ``[N, 2, 48, 48]`` uint8 (24,300 pairs each in the published
    files); :func:`capsnet.data.registry.load_dataset` then centre-crops the test split."""
    return (ImageDataset(*read_split(folder, "train"), CLASSES),
            ImageDataset(*read_split(folder, "test"), CLASSES))


def download_smallnorb(target: Path, timeout: float) -> None:
    """Fetch the six ``.gz`` files into ``target`` (sha256-checked, atomic)."""
    from .download import fetch
    for name, digest in SHA256.items():
        fetch(URL + name, Path(target) / name, timeout=timeout, sha256=digest)
