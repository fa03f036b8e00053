"""The dataset registry: one :class:`DatasetSpec` per dataset in :data:`DATASETS`, and
:func:`load_dataset`, which finds, downloads (where a public URL exists), reads and validates.

Adding a dataset is one entry here (plus its reader module when the format is new).

Where a dataset is looked for, in order (the first folder its ``find`` accepts wins):

1. ``--data-dir`` (``data_dir``) when given: the ONLY place looked at, and the download target;
2. ``$CAPSNET_DATA`` itself, then its ``<folder>/`` sub-folder (``folder`` is the dataset's
   name except where two entries share files, e.g. ``svhn-extra`` uses ``svhn/``);
3. the Debian package's folder, for datasets that have one (``/usr/share/datasets/<name>``);
4. the per-user cache ``~/.cache/capsnet/<folder>/`` (``$XDG_CACHE_HOME`` respected), where
   downloads go when no ``--data-dir`` is given.

A folder that looks like the dataset but cannot be used (a missing CIFAR batch, the CIFAR
"python version") is an error rather than a reason to download. A failed download removes
the folders it created.
"""

from __future__ import annotations

import gzip
import os
import sys
import zlib
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

from ..errors import CapsnetError
from . import cifar, folder as image_folder, generated, smallnorb, svhn
from .datasets import (FILES, ImageDataset, center_crop, download_idx, find_file, find_idx,
                       find_idx_test, idx_reader, idx_test_reader)
from .download import DEFAULT_TIMEOUT, new_folder

Reader = Callable[..., "tuple[ImageDataset, ImageDataset]"]


@dataclass(frozen=True)
class DatasetSpec:
    """What the rest of capsnet knows about a dataset.

    ``classes``: the class names, or None when they come from the files (``folder``,
    ``multilabel``). ``image_shape``: ``(C, H, W)`` of what the model sees, or None when set
    by ``image_size``. ``crop``: the side of the square the model sees when the data are
    served larger (smallNORB: 48x48 served, random 32x32 crops in training, the centre crop
    for evaluation; :func:`load_dataset` centre-crops the test split itself); ``served``: that
    larger side (``capsnet predict`` resizes a picture to it, then takes the centre crop).
    ``find(folder)`` returns the folder to read (``folder`` or a sub-folder of it) or None,
    and raises :class:`CapsnetError` when the folder holds the dataset in an unusable state.
    ``read(folder, **options)`` returns ``(train, test)``. ``download(target, timeout)``
    puts the files into ``target`` (None: no public URL). ``find_test``/``read_test``: the
    same for the test split alone, where its files can be read without the training files
    (the IDX datasets and SVHN), so that evaluating needs only them
    (:func:`load_test_split`).

    ``protocol``: for the sets generated from Fashion-MNIST (:mod:`capsnet.data.generated`):
    ``"multi"`` (MultiFashion pairs), ``"expanded"`` (random positions on 40x40) or
    ``"affine"`` (evaluation only); their training split is the 28x28 garments, their test
    split generated, and ``image_shape`` what the model sees. None for every other dataset.
    """

    name: str
    classes: tuple[str, ...] | None
    image_shape: tuple[int, int, int] | None
    hflip_ok: bool  # horizontal flips keep the class (clothing, objects: yes; digits: no)
    how_to_get: str  # one line: apt package / URL / what files to put where
    find: Callable[[Path], Path | None]
    read: Reader
    multi_label: bool = False
    crop: int | None = None
    served: int | None = None
    download: Callable[[Path, float], None] | None = None
    debian_dir: str | None = None
    debian_package: str | None = None
    folder: str = ""  # sub-folder name under $CAPSNET_DATA and the cache; default: name
    protocol: str | None = None  # generated from Fashion-MNIST (capsnet.data.generated)
    description: str = field(default="", compare=False)
    find_test: Callable[[Path], Path | None] | None = None
    read_test: Callable[[Path], ImageDataset] | None = None
    light_on_dark: bool = False  # light objects on black (the IDX sets): predict may invert

    def __post_init__(self):
        if not self.folder:
            object.__setattr__(self, "folder", self.name)

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    @property
    def sized_by_option(self) -> bool:
        """True when ``image_size``, ``test_fraction`` and ``split_seed`` apply."""
        return self.image_shape is None


_IDX_FILES = ", ".join(s + ".gz" for s in FILES.values())
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
DIGITS = tuple(str(d) for d in range(10))


# The published .gz files' MD5s (downloads are checked against them).
IDX_MD5 = {
    "fashion-mnist": {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                      "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                      "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                      "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
    "mnist": {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
              "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
              "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
              "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
}
# Fashion-MNIST and MNIST share the four file names, so a folder of one would pass for the
# other: search() refuses a folder whose first ten test labels are the other set's
# (refuse_other_idx; read from the file, so any compression or none will do).
IDX_TEST_LABELS_START = {"fashion-mnist": (9, 2, 1, 1, 6, 1, 4, 6, 5, 7),
                         "mnist": (7, 2, 1, 0, 4, 1, 4, 9, 5, 9)}


def _spec_list() -> list[DatasetSpec]:
    specs = [
        DatasetSpec(
            name="fashion-mnist", classes=FASHION_CLASSES, image_shape=(1, 28, 28),
            hflip_ok=True, light_on_dark=True, find=find_idx, read=idx_reader(FASHION_CLASSES),
            find_test=find_idx_test, read_test=idx_test_reader(FASHION_CLASSES),
            download=partial(download_idx, mirrors=(
                "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/"
                "fashion/"), md5=IDX_MD5["fashion-mnist"]),
            debian_dir="/usr/share/datasets/fashion-mnist",
            debian_package="dataset-fashion-mnist",
            how_to_get="`apt-get install dataset-fashion-mnist` (Debian), or the four IDX "
                       f"files ({_IDX_FILES}) from "
                       "https://github.com/zalandoresearch/fashion-mnist",
            description="Zalando's clothing photos, 28x28 grey, 60,000 + 10,000"),
        DatasetSpec(
            name="mnist", classes=DIGITS, image_shape=(1, 28, 28), hflip_ok=False,
            light_on_dark=True, find=find_idx, read=idx_reader(DIGITS),
            find_test=find_idx_test, read_test=idx_test_reader(DIGITS),
            download=partial(download_idx, mirrors=(
                "https://ossci-datasets.s3.amazonaws.com/mnist/",
                "https://storage.googleapis.com/cvdf-datasets/mnist/"), md5=IDX_MD5["mnist"]),
            debian_dir="/usr/share/datasets/mnist",
            how_to_get=f"the four IDX files ({_IDX_FILES}) from "
                       "https://ossci-datasets.s3.amazonaws.com/mnist/",
            description="handwritten digits, 28x28 grey, 60,000 + 10,000"),
        DatasetSpec(
            name="cifar10", classes=cifar.CIFAR10_CLASSES, image_shape=(3, 32, 32),
            hflip_ok=True, find=partial(cifar.find_cifar, fmt=cifar.CIFAR10),
            read=partial(cifar.read_cifar, fmt=cifar.CIFAR10, classes=cifar.CIFAR10_CLASSES),
            download=partial(cifar.download_cifar, fmt=cifar.CIFAR10),
            how_to_get=f"the binary version {cifar.CIFAR10.url}, extracted "
                       "(cifar-10-batches-bin/data_batch_1.bin ... test_batch.bin)",
            description="32x32 colour photos, 10 classes, 50,000 + 10,000"),
        DatasetSpec(
            name="cifar100", classes=cifar.CIFAR100_CLASSES, image_shape=(3, 32, 32),
            hflip_ok=True, find=partial(cifar.find_cifar, fmt=cifar.CIFAR100),
            read=partial(cifar.read_cifar, fmt=cifar.CIFAR100,
                         classes=cifar.CIFAR100_CLASSES),
            download=partial(cifar.download_cifar, fmt=cifar.CIFAR100),
            how_to_get=f"the binary version {cifar.CIFAR100.url}, extracted "
                       "(cifar-100-binary/train.bin, test.bin)",
            description="32x32 colour photos, 100 fine classes, 50,000 + 10,000"),
        DatasetSpec(
            name="svhn", classes=svhn.CLASSES, image_shape=(3, 32, 32), hflip_ok=False,
            find=svhn.find_svhn, read=svhn.read_svhn, download=svhn.download_svhn,
            find_test=svhn.find_svhn_test, read_test=svhn.read_svhn_test,
            how_to_get=f"train_32x32.mat and test_32x32.mat from {svhn.URL}",
            description="house-number digits, 32x32 colour, 73,257 + 26,032"),
        DatasetSpec(
            name="svhn-extra", classes=svhn.CLASSES, image_shape=(3, 32, 32),
            hflip_ok=False, folder="svhn", find=partial(svhn.find_svhn, extra=True),
            read=partial(svhn.read_svhn, extra=True),
            find_test=svhn.find_svhn_test, read_test=svhn.read_svhn_test,
            download=partial(svhn.download_svhn, extra=True),
            how_to_get=f"train_32x32.mat, test_32x32.mat and extra_32x32.mat (1.3 GB) from "
                       f"{svhn.URL}",
            description="svhn with the 531,131 extra images added to training"),
        DatasetSpec(
            # no flips: a mirrored stereo pair is not a stereo pair of the mirrored scene
            # unless its two channels are swapped too; kept off until that is done
            name="smallnorb", classes=smallnorb.CLASSES, image_shape=(2, 32, 32),
            hflip_ok=False, crop=32, served=smallnorb.SERVED, find=smallnorb.find_smallnorb,
            read=smallnorb.read_smallnorb, download=smallnorb.download_smallnorb,
            how_to_get=f"the six smallnorb-*-{{dat,cat,info}}.mat.gz files from "
                       f"{smallnorb.URL}",
            description="toys, stereo 96x96 grey pairs served at 48x48 (32x32 crops), "
                        "24,300 + 24,300"),
        DatasetSpec(
            name="folder", classes=None, image_shape=None, hflip_ok=True,
            find=image_folder.find_folder, read=image_folder.read_folder,
            how_to_get="class sub-folders of images (<class>/*.png, or train/<class>/ and "
                       "test/<class>/) in --data-dir",
            description="your images, one sub-folder per class"),
        DatasetSpec(
            name="multilabel", classes=None, image_shape=None, hflip_ok=True,
            multi_label=True, find=image_folder.find_multilabel,
            read=image_folder.read_multilabel,
            how_to_get="a CSV image_name,tags (e.g. Planet's train_v2.csv) and its image "
                       "folder (train-jpg/ or images/) in --data-dir",
            description="your images with space-separated tags (Planet Amazon layout)"),
    ]
    return specs[:2] + _generated_specs(specs[0]) + specs[2:]


def _generated_specs(fashion: DatasetSpec) -> list[DatasetSpec]:
    """The sets generated from Fashion-MNIST (:mod:`capsnet.data.generated`): found,
    downloaded and cached where Fashion-MNIST is (``folder``), their test splits built on
    first use and cached under their own names."""
    def derived(name, protocol, shape, description):
        return replace(fashion, name=name, protocol=protocol, image_shape=shape,
                       hflip_ok=False, folder=fashion.folder, description=description,
                       find_test=None, read_test=None,  # their test sets need more files
                       read=partial(generated.read_generated, name=name, protocol=protocol,
                                    classes=FASHION_CLASSES))
    return [
        derived("multi-fashion-mnist", generated.MULTI, (1, 36, 36),
                "MultiMNIST's protocol on Fashion-MNIST: two garments of different classes "
                "overlaid on 36x36 (training pairs per batch; 10,000 fixed test pairs)"),
        derived("fashion-mnist-expanded", generated.EXPANDED, (1, 40, 40),
                "Fashion-MNIST at random positions on a 40x40 canvas (training: per batch; "
                "test: fixed)"),
        derived("fashion-mnist-affine", generated.AFFINE, (1, 40, 40),
                "evaluation only: the 10,000 test garments under fixed random affine maps in "
                "affNIST's ranges, 40x40"),
    ]


DATASETS: dict[str, DatasetSpec] = {s.name: s for s in _spec_list()}


def dataset_info(name: str) -> DatasetSpec:
    """The spec of a registered dataset; one-line :class:`CapsnetError` listing the names
    for an unknown one."""
    try:
        return DATASETS[name]
    except KeyError:
        raise CapsnetError(f"unknown dataset {name!r}; choose from "
                           f"{', '.join(DATASETS)}") from None


def refuse_mirroring(name: str, flag: str) -> None:
    """One-line error when ``flag`` (``--hflip``, ``--tta hflip``) would mirror the images of
    a dataset whose ``hflip_ok`` is False (digits: a mirrored 2 is not a 2; the sets generated
    from Fashion-MNIST follow the paper's protocols, which mirror nothing)."""
    info = dataset_info(name)
    if info.protocol:
        raise CapsnetError(f"{flag}: {name} follows the paper's protocol (its MultiMNIST and "
                           "affNIST experiments mirror no image), so that its results compare "
                           "with the paper's and the CNN baselines'; leave it off")
    if not info.hflip_ok:
        raise CapsnetError(f"{flag} does not keep the class on {name} (a mirrored image is "
                           "not of the same class there); leave it off")


# --------------------------------------------------------------------------- finding

def cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/capsnet/<name>`` (default ``~/.cache/capsnet/<name>``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "capsnet" / name


def candidate_dirs(spec: DatasetSpec | str, data_dir: str | Path | None) -> list[Path]:
    """The folders searched, in order (see the module docstring)."""
    spec = dataset_info(spec) if isinstance(spec, str) else spec
    if data_dir is not None:
        return [Path(data_dir)]
    dirs = []
    env = os.environ.get("CAPSNET_DATA")
    if env:
        dirs += [Path(env), Path(env) / spec.folder]
    if spec.debian_dir:
        dirs.append(Path(spec.debian_dir))
    return dirs + [cache_dir(spec.folder)]


def refuse_other_idx(name: str, folder: Path) -> None:
    """One-line error when ``folder``'s test labels begin as another IDX dataset's do (an
    MNIST folder given as Fashion-MNIST: the same file names). An unreadable file is left
    to the reader to judge."""
    if name not in IDX_TEST_LABELS_START:
        return
    path = find_file(Path(folder), FILES["test_labels"])
    if path is None:
        return
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            start = tuple(f.read(18)[8:])  # after the 8-byte IDX header
    except (OSError, EOFError, zlib.error):
        return
    for other, labels in IDX_TEST_LABELS_START.items():
        if other != name and start == labels:
            raise CapsnetError(f"{folder}: holds {other}'s files, not {name}'s (the same "
                               "file names); point --data-dir or $CAPSNET_DATA at a "
                               f"{name} folder")


def search(spec: DatasetSpec, data_dir: str | Path | None) -> Path | None:
    """The first candidate folder ``spec.find`` accepts, or None; never downloads nor
    creates anything. Raises the first unusable folder's error if none is usable."""
    problem = None
    for d in candidate_dirs(spec, data_dir):
        try:
            found = spec.find(d)
            if found:
                refuse_other_idx(spec.name, Path(found))
        except CapsnetError as e:
            problem = problem or e
            continue
        except OSError:  # unreadable folder: as good as absent
            continue
        if found:
            return Path(found)
    if problem is not None:
        raise problem
    return None


def _where(spec: DatasetSpec) -> str:
    return f"--data-dir, $CAPSNET_DATA/{spec.folder}/ or {cache_dir(spec.folder)}"


def locate_folder(spec: DatasetSpec, data_dir: str | Path | None = None,
                  allow_download: bool = True, timeout: float = DEFAULT_TIMEOUT) -> Path:
    """The folder to read ``spec`` from: found (:func:`search`), else downloaded into
    ``data_dir`` (when given) or the cache. One-line :class:`CapsnetError` saying where it
    looked and how to get the data otherwise."""
    found = search(spec, data_dir)
    if found is not None:
        return found
    dirs = ", ".join(map(str, candidate_dirs(spec, data_dir)))
    if spec.download is None and data_dir is not None and Path(data_dir).is_dir():
        return Path(data_dir)  # the reader says precisely what is wrong with it
    if spec.download is None:
        raise CapsnetError(f"{spec.name}: nothing usable in {dirs}; put {spec.how_to_get}")
    if allow_download:
        target = Path(data_dir) if data_dir is not None else cache_dir(spec.folder)
        try:
            with new_folder(target):
                spec.download(target, timeout)
                found = spec.find(target)
                if not found:
                    raise CapsnetError(f"{target}: the downloaded files are incomplete")
            return Path(found)
        except CapsnetError as e:
            reason = str(e)
    else:
        reason = "download disabled"
    raise CapsnetError(f"{spec.name} not found in {dirs} and the download failed ({reason}); "
                       f"get it: {spec.how_to_get}, into {_where(spec)}")


# --------------------------------------------------------------------------- loading

def _check_split(spec: DatasetSpec, split: str, ds: ImageDataset, where: Path) -> None:
    """The invariants of one split that the rest of capsnet relies on."""
    import torch
    if ds.images.dim() != 4 or ds.images.dtype != torch.uint8:
        raise CapsnetError(f"{where}: {split} images are {ds.images.dtype} "
                           f"{list(ds.images.shape)}, expected uint8 [N, C, H, W]")
    if len(ds) != ds.images.shape[0] or len(ds) == 0:
        raise CapsnetError(f"{where}: {split} split has {ds.images.shape[0]} images and "
                           f"{len(ds)} labels")
    want = (torch.uint8, 2) if spec.multi_label else (torch.int64, 1)
    if spec.protocol == generated.MULTI and split == "test":
        want = (torch.int64, 2)  # packed pairs: the two classes of each
    if (ds.labels.dtype, ds.labels.dim()) != want:
        raise CapsnetError(f"{where}: {split} labels are {ds.labels.dtype} "
                           f"{list(ds.labels.shape)}")


def _check(spec: DatasetSpec, train: ImageDataset, test: ImageDataset, where: Path) -> None:
    """The invariants the rest of capsnet relies on: each split's, and that they match."""
    _check_split(spec, "train", train, where)
    _check_split(spec, "test", test, where)
    if train.shape != test.shape and spec.protocol is None:
        raise CapsnetError(f"{where}: test images are {'x'.join(map(str, test.shape))}, "
                           f"training images {'x'.join(map(str, train.shape))}")
    if train.classes != test.classes:
        raise CapsnetError(f"{where}: the test split's classes differ from the training "
                           "split's")


def load_dataset(name: str = "fashion-mnist", data_dir: str | Path | None = None,
                 allow_download: bool = True, *, image_size: int | None = None,
                 test_fraction: float = 0.2, split_seed: int = 0,
                 ) -> tuple[ImageDataset, ImageDataset]:
    """``(train, test)`` of a registered dataset, found (or downloaded), read, validated and
    held in memory: images ``[N, C, H, W]`` uint8, labels ``[N]`` int64 (``[N, K]`` uint8
    k-hot for multi-label data).

    ``image_size`` (default 32), ``test_fraction`` and ``split_seed`` apply to datasets sized
    by option (``folder``, ``multilabel``: resized to ``image_size`` square; split seeded
    when there are no train/test sub-folders). For a dataset with a ``crop`` (smallNORB)
    the test split is centre-cropped to ``crop x crop`` and the training split served
    uncropped (the trainer takes random crops).
    """
    spec = dataset_info(name)
    if not spec.sized_by_option and image_size is not None \
            and image_size != spec.image_shape[-1]:
        raise CapsnetError(f"--image-size {image_size}: {name} images are "
                           f"{spec.image_shape[-1]}x{spec.image_shape[-1]}; the option is "
                           "for folder and multilabel data")
    folder = locate_folder(spec, data_dir, allow_download)
    if spec.sized_by_option:
        train, test = spec.read(folder, image_size=image_size, test_fraction=test_fraction,
                                split_seed=split_seed)
    else:
        train, test = spec.read(folder)
    _check(spec, train, test, folder)
    if spec.crop:
        if min(train.shape[1:]) < spec.crop:
            raise CapsnetError(f"{folder}: training images {'x'.join(map(str, train.shape))} "
                               f"cannot give {spec.crop}x{spec.crop} crops")
        test = ImageDataset(center_crop(test.images, spec.crop).contiguous(), test.labels,
                            test.classes)
    return train, test


def load_test_split(name: str = "fashion-mnist", data_dir: str | Path | None = None,
                    allow_download: bool = True, channels: int | None = None,
                    **options) -> ImageDataset:
    """The test split of a registered dataset, as ``load_dataset(...)[1]`` returns it.

    Where the dataset's test files can be read alone (``spec.read_test``: the IDX datasets
    and SVHN), only they are read: from the folder holding the whole dataset if there is
    one, else from a folder holding just the test files. Evaluating the shipped model needs
    the 10,000 test images, not the 60,000 training ones; SVHN's needs neither its training
    file nor the 1.3 GB extra one. Datasets read from the user's own images
    (``sized_by_option``) decode their test images only (the split is drawn per name); a
    full read gives every image 3 channels if any is in colour, so grey test images are
    widened (R = G = B) to ``channels``, the model's, where that is 3. Otherwise (no test
    reader, or nothing found: the download fetches it all) this is :func:`load_dataset`.
    ``options`` as there.
    """
    spec = dataset_info(name)
    if spec.read_test is not None:
        folder = search(spec, data_dir) or search(replace(spec, find=spec.find_test),
                                                  data_dir)
        if folder is not None:
            test = spec.read_test(folder)
            _check_split(spec, "test", test, folder)
            return test
    if spec.sized_by_option:
        folder = locate_folder(spec, data_dir, allow_download)
        test = spec.read(folder, test_only=True, **options)[1]
        _check_split(spec, "test", test, folder)
        if channels == 3 and test.images.shape[1] == 1:
            test = replace(test, images=test.images.expand(-1, 3, -1, -1).contiguous())
        return test
    return load_dataset(name, data_dir, allow_download, **options)[1]


def recorded_options(name: str, *records: dict | None, image_size: int | None = None
                     ) -> dict:
    """The :func:`load_dataset` options that re-read the test split a model was trained
    with: for datasets read from the user's own images (``sized_by_option``), the image
    size and test fraction from the first record that has them (a checkpoint's or weights
    file's ``data_options``, then the run's settings), else ``image_size`` (the model's
    input side) and the default fraction. ``{}`` for every other dataset."""
    if name not in DATASETS or not DATASETS[name].sized_by_option:
        return {}
    found: dict = {}
    for record in records:
        for key in ("image_size", "test_fraction"):
            if (record or {}).get(key) is not None:
                found.setdefault(key, record[key])
    return {"image_size": found.get("image_size", image_size),
            "test_fraction": found.get("test_fraction", 0.2)}


# --------------------------------------------------------------------------- listing

def describe_datasets(data_dir: str | Path | None = None) -> list[dict]:
    """One dict per registered dataset, without downloading: ``name``, ``classes`` (count,
    or None: from the files), ``image_shape`` (``(C, H, W)`` or None: ``image_size``),
    ``hflip_ok``, ``multi_label``, ``protocol`` (generated from Fashion-MNIST, or None),
    ``found`` (the folder, or None), ``test_only`` (a folder holding only the test files,
    enough to evaluate, as :func:`load_test_split` reads it; or None), ``problem`` (why a
    folder that looks like it is unusable, or None), ``how_to_get``, ``description``."""
    rows = []
    for spec in DATASETS.values():
        test_only = None
        try:
            found, problem = search(spec, data_dir), None
            if found is None and spec.find_test is not None:
                test_only = search(replace(spec, find=spec.find_test), data_dir)
        except CapsnetError as e:
            found, problem = None, str(e)
        rows.append({"name": spec.name, "classes": spec.num_classes,
                     "image_shape": spec.image_shape, "hflip_ok": spec.hflip_ok,
                     "multi_label": spec.multi_label, "crop": spec.crop,
                     "protocol": spec.protocol,
                     "found": None if found is None else str(found), "problem": problem,
                     "test_only": None if test_only is None else str(test_only),
                     "downloadable": spec.download is not None,
                     "how_to_get": spec.how_to_get, "description": spec.description})
    return rows


def format_datasets(rows: list[dict]) -> str:
    """The rows of :func:`describe_datasets` as a plain-text table."""
    table = [("dataset", "classes", "image", "flip", "where")]
    for r in rows:
        shape = "image-size" if r["image_shape"] is None else "x".join(map(str,
                                                                          r["image_shape"]))
        if r["crop"]:
            shape += " (crop)"
        shape += {"multi": " (pairs)", "affine": " (test)"}.get(r.get("protocol"), "")
        if r["found"]:
            where = r["found"]
        elif r["problem"]:
            where = f"UNUSABLE: {r['problem']}"
        elif r.get("test_only"):
            where = (f"{r['test_only']}: the test files only (enough to evaluate; to train, "
                     f"get: {r['how_to_get']})")
        else:
            where = ("missing (downloaded on first use); " if r["downloadable"] else
                     "missing; ") + f"get: {r['how_to_get']}"
        classes = "from files" if r["classes"] is None else str(r["classes"])
        if r["multi_label"]:
            classes += " (tags)"
        table.append((r["name"], classes, shape, "yes" if r["hflip_ok"] else "no", where))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4]
                     for row in table)


def cmd_datasets(args) -> int:
    """``capsnet datasets``: print the registered datasets and where each was found (or how
    to get it); ``args.data_dir`` (may be None) restricts the search as for training."""
    data_dir = getattr(args, "data_dir", None)
    if data_dir is not None and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise CapsnetError(f"--data-dir {data_dir}: a file, not a folder")
    print(format_datasets(describe_datasets(data_dir)))
    return 0


def main(argv: list[str] | None = None) -> int:  # ``python -m capsnet.data.registry``
    import argparse
    p = argparse.ArgumentParser(prog="capsnet datasets")
    p.add_argument("--data-dir")
    return cmd_datasets(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
