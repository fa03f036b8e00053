"""Your own images: a folder of class sub-folders (``folder``) or a multi-label CSV in the
layout of Planet's "Understanding the Amazon from Space" (``multilabel``). Never downloads,
never creates a folder.

Every image, whatever its size and mode, becomes ``image_size x image_size`` uint8:

* mode: greyscale modes (1-bit, 8-bit ``L``, 16-bit ``I;16``/``I``, float ``F``) stay one
  channel; 16-bit values are scaled to 8 bits (divided by 257), ``F`` values clipped to
  0..255. Palette images become RGB(A) (so count as colour); CMYK, YCbCr, ... become RGB.
  An alpha channel (``RGBA``, ``LA``, palette transparency) is composited on black (each
  colour times alpha / 255) and dropped.
* orientation: turned upright as the file's EXIF orientation says (as photo viewers do).
* shape: non-square images are centre-cropped to a square (side = the shorter side), which
  keeps the aspect ratio, then resized with Pillow's bilinear filter (antialiased when
  shrinking: its support widens with the factor).
* channels: 1 if every image of the dataset (both splits) is greyscale, else 3 (greyscale
  images repeated to R = G = B).
* size: an image of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (Pillow's decompression
  bomb guard, left in force) is a one-line error naming the file.

Image files are the ones ending in one of :data:`IMAGE_SUFFIXES` (any case); names starting
with ``.`` are ignored, as are other files.
"""

from __future__ import annotations

import csv
import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import CapsnetError
from .datasets import ImageDataset

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                            ".pgm", ".ppm", ".pbm", ".pnm"})
DEFAULT_IMAGE_SIZE = 32
_FALLBACK_MAX_PIXELS = 89_478_485  # Pillow's default, used if someone set the limit to None


# --------------------------------------------------------------------------- one image

def _composite(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``colour * alpha / 255`` rounded, uint8 (colour ``[H, W]`` or ``[H, W, C]``)."""
    if colour.ndim == 3:
        alpha = alpha[..., None]
    return ((colour.astype(np.uint32) * alpha + 127) // 255).astype(np.uint8)


def _to_array(im) -> tuple[np.ndarray, bool]:
    """A PIL image as uint8 ``[H, W]`` (greyscale, True) or ``[H, W, 3]`` (colour, False)."""
    mode = im.mode
    if mode in ("P", "PA"):
        im, mode = im.convert("RGBA"), "RGBA"
    if mode == "1":
        im, mode = im.convert("L"), "L"
    if mode == "F" or mode.startswith("I"):
        a = np.asarray(im).astype(np.float64)
        if mode != "F":
            a = a / 257.0  # 16-bit range -> 8-bit
        return np.clip(np.rint(a), 0, 255).astype(np.uint8), True
    if mode == "L":
        return np.asarray(im), True
    if mode in ("LA", "La"):
        la = np.asarray(im.convert("LA"))
        return _composite(la[..., 0], la[..., 1]), True
    if mode in ("RGBA", "RGBa"):
        rgba = np.asarray(im.convert("RGBA"))
        return _composite(rgba[..., :3], rgba[..., 3]), False
    return np.asarray(im.convert("RGB")), False


def _square(a: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop ``[H, W(, 3)]`` to a square, then resize to ``[size, size(, 3)]``."""
    from PIL import Image
    h, w = a.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    a = np.ascontiguousarray(a[top:top + s, left:left + s])
    if s != size:
        a = np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BILINEAR))
    return a


def load_image(path: Path, size: int) -> tuple[np.ndarray, bool]:
    """One image file as uint8 ``[size, size]`` (greyscale: True) or ``[size, size, 3]``
    (colour: False); see the module docstring. One-line :class:`CapsnetError` naming the
    file if it is unreadable or too large. ``capsnet predict`` reads a picture for a model
    trained on these datasets with this same function."""
    from PIL import Image, ImageOps
    limit = Image.MAX_IMAGE_PIXELS or _FALLBACK_MAX_PIXELS
    too_large = f"{path}: image too large (the limit is {limit:,} pixels, " \
                "PIL.Image.MAX_IMAGE_PIXELS)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > limit:
                    raise CapsnetError(f"{path}: image too large ({w}x{h} = {w * h:,} "
                                       f"pixels; the limit is {limit:,}, "
                                       "PIL.Image.MAX_IMAGE_PIXELS)")
                # A JPEG is decoded at 1/2, 1/4 or 1/8 of its size (the DCT's own scaling)
                # while that leaves at least twice ``size`` on each side: a 12-megapixel
                # photo then costs 0.2, not 36 MB, and the bilinear resize below still
                # averages over several pixels. Other formats: a no-op.
                im.draft(None, (2 * size, 2 * size))
                a, grey = _to_array(ImageOps.exif_transpose(im))  # upright, as viewers show it
    except CapsnetError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise CapsnetError(too_large) from None
    except Exception as e:  # Pillow raises many types for damaged files
        raise CapsnetError(f"{path}: cannot read the image ({type(e).__name__}: "
                           f"{e})".replace("\n", " ")) from None
    if a.ndim < 2 or min(a.shape[:2]) == 0:
        raise CapsnetError(f"{path}: empty image")
    return _square(a, size), grey


def load_images(paths: list[Path], size: int) -> torch.Tensor:
    """Images ``[N, C, size, size]`` uint8, ``C`` 1 if all are greyscale else 3.

    Filled in place, one image at a time: grey into ``[N, 1, S, S]`` until the first colour
    image, then into ``[N, 3, S, S]`` (the grey ones so far copied over, R = G = B), so the
    peak memory is about the dataset's own size, not several copies of it."""
    out = np.empty((len(paths), 1, size, size), dtype=np.uint8)
    for i, p in enumerate(paths):
        a, grey = load_image(p, size)
        if not grey and out.shape[1] == 1:
            colour = np.empty((len(paths), 3, size, size), dtype=np.uint8)
            colour[:i] = out[:i]  # broadcast over the 3 channels
            out = colour
        out[i] = a if grey else a.transpose(2, 0, 1)  # grey [S, S] broadcast over C
    return torch.from_numpy(out)


def _check_options(image_size: int | None, test_fraction: float) -> int:
    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    if size < 1:
        raise CapsnetError(f"--image-size {image_size}: must be a positive number of pixels")
    if not 0 < test_fraction < 1:
        raise CapsnetError(f"--test-fraction {test_fraction}: must be between 0 and 1")
    return size


def held_out(names: list[str], test_fraction: float, split_seed: int = 0) -> torch.Tensor:
    """Which images are test images: ``[N]`` bool, one draw per image *name*.

    Each name (a file name inside its class folder, or a CSV's ``image_name``) is hashed
    with ``split_seed`` (SHA-256) to a number in [0, 1); the image is a test image when that
    number is below ``test_fraction``. So an image's split depends on its own name only:
    adding, removing or relabelling other images never moves it between train and test (a
    seeded shuffle would reshuffle the whole split, and a model trained before the folder
    grew would then be scored on images it was trained on). The price: the test share is
    ``test_fraction`` only on average (binomial, per class as well as overall).
    """
    return _draws(names, split_seed) < test_fraction


def _draws(names: list[str], split_seed: int) -> torch.Tensor:
    """``[N]`` float64 in [0, 1): each name's SHA-256 (with the seed) as a number."""
    def draw(name: str) -> float:
        digest = hashlib.sha256(f"{split_seed}/{name}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2 ** 64
    return torch.tensor([draw(n) for n in names], dtype=torch.float64)


def _hashed_order(names: list[str], split_seed: int) -> torch.Tensor:
    """A permutation of ``names`` by their :func:`_draws`: the classes mixed (a folder lists
    them one after another, so the first N images of a split, ``--train-size N``, would
    otherwise be a class or two), and an image's place depends on its own name only."""
    return _draws(names, split_seed).argsort(stable=True)


def _split_indices(test: torch.Tensor, where: Path, test_fraction: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(test indices, train indices)`` of a :func:`held_out` mask; one-line error if
    either side is empty."""
    if test.all() or not test.any():
        raise CapsnetError(f"{where}: a test fraction of {test_fraction} of {test.numel()} "
                           f"images leaves an empty split (the split is drawn per image "
                           f"name; with so few images use train/ and test/ folders)")
    return test.nonzero().flatten(), (~test).nonzero().flatten()


def _load_split(paths: list[Path], labels: torch.Tensor, names: list[str],
                train_idx: torch.Tensor, test_idx: torch.Tensor, size: int, classes: tuple,
                split_seed: int, test_only: bool = False
                ) -> tuple[ImageDataset | None, ImageDataset]:
    """Both splits, each in :func:`_hashed_order`, read into one tensor (training images
    first) of which the splits are views: no copy of the images beside them. ``test_only``:
    ``(None, test)``, no training image read (``C`` is then decided by the test images
    alone: 1 where a full read gives 3 with every test image grey, R = G = B)."""
    if test_only:
        train_idx = train_idx[:0]
    parts = [idx[_hashed_order([names[i] for i in idx.tolist()], split_seed)]
             for idx in (train_idx, test_idx)]
    order = torch.cat(parts)
    images = load_images([paths[i] for i in order.tolist()], size)
    n = len(parts[0])
    test = ImageDataset(images[n:], labels[parts[1]], classes)
    return (None if test_only else ImageDataset(images[:n], labels[parts[0]], classes)), test


# --------------------------------------------------------------------------- class folders

def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_folder(folder: Path) -> Path | None:
    """``folder`` if it looks like an image folder (``train/`` or ``test/``, or a sub-folder
    holding an image file), else None. Only looks; reading validates."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (folder / "train").is_dir() or (folder / "test").is_dir():
        return folder
    try:
        for sub in _subdirs(folder):
            if any(_is_image(p) for p in sub.iterdir()):
                return folder
    except OSError:
        return None
    return None


def class_files(root: Path) -> dict[str, list[Path]]:
    """``{class name: sorted image files}`` for the sub-folders of ``root`` (sorted by
    name; images directly inside each, nested folders ignored)."""
    subs = _subdirs(root)
    if not subs:
        raise CapsnetError(f"{root}: no class sub-folders (put the images in one sub-folder "
                           "per class)")
    found = {}
    for sub in subs:
        files = sorted(p for p in sub.iterdir() if _is_image(p))
        if not files:
            raise CapsnetError(f"{sub}: empty class folder (no image files: "
                               f"{', '.join(sorted(IMAGE_SUFFIXES))})")
        found[sub.name] = files
    if len(found) < 2:
        raise CapsnetError(f"{root}: only one class folder ({subs[0].name}); a classifier "
                           "needs at least two")
    return found


def _flatten(files: dict[str, list[Path]], classes: list[str]) -> tuple[list[Path], torch.Tensor]:
    paths, labels = [], []
    for i, c in enumerate(classes):
        paths += files[c]
        labels += [i] * len(files[c])
    return paths, torch.tensor(labels, dtype=torch.long)


def read_folder(folder: Path, image_size: int | None = None, test_fraction: float = 0.2,
                split_seed: int = 0, test_only: bool = False, **_
                ) -> tuple[ImageDataset | None, ImageDataset]:
    """``(train, test)`` from class sub-folders: images ``[N, C, S, S]`` uint8 (``S =
    image_size``, default 32; ``C`` 1 or 3), labels ``[N]`` int64 indexing the sorted
    sub-folder names.

    Either ``folder/train/<class>/*`` and ``folder/test/<class>/*`` (the same class names in
    both; other sub-folders such as ``val/`` are then ignored), or ``folder/<class>/*``,
    split into about ``test_fraction`` test images per class by a hash of each file name
    and ``split_seed`` (:func:`held_out`: stable when the folder grows). ``test_only``: see
    :func:`_load_split`.
    """
    folder = Path(folder)
    size = _check_options(image_size, test_fraction)
    if not folder.is_dir():
        raise CapsnetError(f"{folder}: no such folder")
    if (folder / "train").is_dir() or (folder / "test").is_dir():
        for part in ("train", "test"):
            if not (folder / part).is_dir():
                raise CapsnetError(f"{folder / part}: missing (a folder with train/ needs "
                                   "test/ too, each with the same class sub-folders)")
        train_files, test_files = class_files(folder / "train"), class_files(folder / "test")
        if set(train_files) != set(test_files):
            only_train = sorted(set(train_files) - set(test_files))
            only_test = sorted(set(test_files) - set(train_files))
            raise CapsnetError(
                f"{folder / 'test'}: its classes differ from {folder / 'train'}'s (only in "
                f"train: {', '.join(only_train) or '-'}; only in test: "
                f"{', '.join(only_test) or '-'})")
        classes = sorted(train_files)
        train_paths, train_labels = _flatten(train_files, classes)
        test_paths, test_labels = _flatten(test_files, classes)
        n = len(train_paths)
        return _load_split(train_paths + test_paths, torch.cat([train_labels, test_labels]),
                           [p.name for p in train_paths + test_paths], torch.arange(n),
                           torch.arange(n, n + len(test_paths)), size, tuple(classes),
                           split_seed, test_only)
    files = class_files(folder)
    classes = sorted(files)
    paths, labels = _flatten(files, classes)
    names = [p.name for p in paths]
    test = held_out(names, test_fraction, split_seed)
    for i, c in enumerate(classes):
        if test[labels == i].all():
            raise CapsnetError(f"{folder / c}: all {len(files[c])} images fell in the test "
                               f"split (--test-fraction {test_fraction}, drawn per image name); "
                               "add images or use train/ and test/ folders")
    test_idx, train_idx = _split_indices(test, folder, test_fraction)
    return _load_split(paths, labels, names, train_idx, test_idx, size, tuple(classes),
                       split_seed, test_only)


# --------------------------------------------------------------------------- multi-label CSV

HEADER = ["image_name", "tags"]
PREFERRED_CSV = ("train_v2.csv", "train.csv")  # Planet's (corrected v2 first)


def _header(path: Path) -> list[str] | None:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            row = next(csv.reader(f), None)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    return None if row is None else [c.strip().lower() for c in row]


def _image_dirs(csv_path: Path) -> list[Path]:
    stem = csv_path.stem
    base = stem.removesuffix("_v2")
    names = [f"{base}-jpg", f"{stem}-jpg", "images", f"{base}-tif", f"{stem}-tif"]
    return [csv_path.parent / n for n in dict.fromkeys(names)]


def find_multilabel(folder: Path) -> Path | None:
    """``folder`` if it holds a label CSV and its image folder, else None.

    The CSV is ``train_v2.csv`` or ``train.csv`` (Planet's names), else the one ``*.csv``
    whose header is ``image_name,tags`` (``sample_submission*`` and ``test*`` ignored;
    several: an error). The image folder is ``<stem without _v2>-jpg/`` (Planet's
    ``train-jpg/``), ``<stem>-jpg/``, ``images/``, then the ``-tif`` ones.
    """
    return Path(folder) if _locate_csv(Path(folder)) else None


def _locate_csv(folder: Path) -> tuple[Path, Path] | None:
    if not folder.is_dir():
        return None
    chosen = next((folder / n for n in PREFERRED_CSV if (folder / n).is_file()), None)
    if chosen is None:
        csvs = sorted(p for p in folder.glob("*.csv") if p.is_file()
                      and not p.name.lower().startswith(("sample_submission", "test"))
                      and _header(p) == HEADER)
        if len(csvs) > 1:
            raise CapsnetError(f"{folder}: several label CSVs ({', '.join(p.name for p in csvs)})"
                               "; keep exactly one")
        if not csvs:
            return None
        chosen = csvs[0]
    images = next((d for d in _image_dirs(chosen) if d.is_dir()), None)
    if images is None:
        raise CapsnetError(f"{chosen}: no image folder next to it (looked for "
                           f"{', '.join(d.name + '/' for d in _image_dirs(chosen))})")
    return chosen, images


def _image_path(images: Path, name: str) -> Path | None:
    if (images / name).is_file() and Path(name).suffix.lower() in IMAGE_SUFFIXES:
        return images / name
    for suffix in (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp"):
        if (images / (name + suffix)).is_file():
            return images / (name + suffix)
    return None


def read_label_csv(path: Path, images: Path
                   ) -> tuple[list[Path], list[list[str]], list[str]]:
    """The image files, tag lists and names (``image_name`` values) of a ``image_name,tags``
    CSV (tags space-separated), validated: header, two fields a line, a name and at least
    one tag, no duplicates, the image present in ``images``. Errors name the file and
    line."""
    rows: list[tuple[Path, list[str], str]] = []
    first_line: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [c.strip().lower() for c in header] != HEADER:
                raise CapsnetError(f"{path}:1: bad header {','.join(header or [])!r}, "
                                   "expected 'image_name,tags'")
            for row in reader:
                line = reader.line_num
                if not row or not any(c.strip() for c in row):
                    continue  # blank line
                if len(row) != 2:
                    raise CapsnetError(f"{path}:{line}: {len(row)} fields, expected 2 "
                                       "(image_name,tags)")
                name, tags = row[0].strip(), row[1].split()
                if not name:
                    raise CapsnetError(f"{path}:{line}: empty image_name")
                if Path(name).name != name or name.startswith("."):
                    raise CapsnetError(f"{path}:{line}: image name {name!r} is not a plain "
                                       "file name")
                if not tags:
                    raise CapsnetError(f"{path}:{line}: empty tags field for {name}")
                if name in first_line:
                    raise CapsnetError(f"{path}:{line}: image {name} listed again (first on "
                                       f"line {first_line[name]})")
                first_line[name] = line
                file = _image_path(images, name)
                if file is None:
                    raise CapsnetError(f"{path}:{line}: image {name} not found in {images}")
                rows.append((file, tags, name))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CapsnetError(f"{path}: cannot read ({e})") from None
    if not rows:
        raise CapsnetError(f"{path}: no images listed")
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def read_multilabel(folder: Path, image_size: int | None = None, test_fraction: float = 0.2,
                    split_seed: int = 0, test_only: bool = False, **_
                    ) -> tuple[ImageDataset | None, ImageDataset]:
    """``(train, test)`` from a label CSV and its image folder (:func:`find_multilabel`):
    images ``[N, C, S, S]`` uint8 (``S = image_size``, default 32), labels ``[N, K]`` uint8
    k-hot over the ``K`` sorted tags of the whole CSV. Split into about ``test_fraction``
    test images by a hash of each ``image_name`` and ``split_seed`` (:func:`held_out`;
    Planet's own test set has no labels)."""
    folder = Path(folder)
    size = _check_options(image_size, test_fraction)
    located = _locate_csv(folder)
    if located is None:
        raise CapsnetError(f"{folder}: no label CSV (image_name,tags) with an image folder")
    csv_path, images_dir = located
    paths, tags, names = read_label_csv(csv_path, images_dir)
    classes = tuple(sorted({t for ts in tags for t in ts}))
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.zeros(len(paths), len(classes), dtype=torch.uint8)
    for row, ts in enumerate(tags):
        labels[row, [index[t] for t in ts]] = 1
    # the CSV's names, not the files': the split survives a move from .tif to .jpg files
    test = held_out(names, test_fraction, split_seed)
    test_idx, train_idx = _split_indices(test, csv_path, test_fraction)
    return _load_split(paths, labels, names, train_idx, test_idx, size, classes, split_seed,
                       test_only)
