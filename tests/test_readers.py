"""The dataset registry and every reader, on small files written here in the published layouts;
each failure mode; downloads with the network call alone replaced."""

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import re
import struct
import tarfile
import urllib.request
from argparse import Namespace
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from capsnet.data import cifar, download, smallnorb, svhn
from capsnet.data.datasets import center_crop
from capsnet.data.folder import held_out
from capsnet.data.registry import (DATASETS, cmd_datasets, dataset_info, describe_datasets,
                                   load_dataset, refuse_other_idx)
from capsnet.errors import CapsnetError


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No $CAPSNET_DATA, a private cache, and no network: a test that reaches it fails
    unless it installs its own fake."""
    monkeypatch.delenv("CAPSNET_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def no_network(url, timeout=None):
        raise AssertionError(f"unexpected network access: {url}")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


class FakeNet:
    """Replaces ``urllib.request.urlopen``: serves ``files`` (url -> bytes), records calls,
    and checks on every read that the destination is not yet in place."""

    def __init__(self, files, watch=None):
        self.files, self.calls, self.watch, self.seen_parts = files, [], watch, []

    def __call__(self, url, timeout=None):
        self.calls.append(url)
        if url not in self.files:
            raise OSError(f"no route to {url} (test)")
        if self.watch is not None:  # the file lands only after the whole download
            assert not self.watch.exists()
            self.seen_parts += [p.name for p in self.watch.parent.iterdir()
                                if p.name.endswith(".part")]
        return io.BytesIO(self.files[url])


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# --------------------------------------------------------------------------- registry

def test_registry_contract():
    assert list(DATASETS)[:2] == ["fashion-mnist", "mnist"]
    for name in ("cifar10", "cifar100", "svhn", "smallnorb", "folder", "multilabel"):
        assert name in DATASETS
    s = dataset_info("smallnorb")
    assert s.crop == 32 and s.image_shape == (2, 32, 32) and not s.hflip_ok
    assert dataset_info("fashion-mnist").hflip_ok and not dataset_info("mnist").hflip_ok
    assert not dataset_info("svhn").hflip_ok and dataset_info("cifar10").hflip_ok
    assert dataset_info("cifar100").num_classes == 100
    assert dataset_info("folder").classes is None and dataset_info("folder").image_shape is None
    assert dataset_info("multilabel").multi_label and dataset_info("multilabel").hflip_ok
    for spec in DATASETS.values():
        assert spec.how_to_get and "\n" not in spec.how_to_get
    with pytest.raises(CapsnetError) as e:
        dataset_info("imagenet")
    assert "cifar10" in one_line(e) and "'imagenet'" in one_line(e)
    # the old names keep working
    from capsnet.data import datasets
    assert datasets.DATASETS is DATASETS and datasets.dataset_info is dataset_info
    assert datasets.load_dataset is load_dataset


def test_center_crop():
    x = torch.arange(2 * 6 * 6).view(1, 2, 6, 6)
    assert torch.equal(center_crop(x, 4), x[..., 1:5, 1:5])
    assert center_crop(torch.zeros(3, 48, 48), 32).shape == (3, 32, 32)
    with pytest.raises(CapsnetError):
        center_crop(x, 7)


def test_fashion_mnist_still_found_by_default(fashion_dir, monkeypatch):
    """No --data-dir, no $CAPSNET_DATA: the Debian folder (or wherever conftest found it)."""
    if str(fashion_dir) != "/usr/share/datasets/fashion-mnist":
        monkeypatch.setenv("CAPSNET_DATA", str(fashion_dir))
    train, test = load_dataset("fashion-mnist", allow_download=False)
    assert train.images.shape == (60000, 1, 28, 28) and test.labels.shape == (10000,)
    assert train.labels.dtype == torch.int64 and train.classes[9] == "Ankle boot"


def test_one_idx_dataset_is_not_taken_for_the_other(fashion_dir, tmp_path, monkeypatch):
    """Fashion-MNIST and MNIST have the same four file names: the Fashion-MNIST files asked
    for as MNIST (given, or as $CAPSNET_DATA itself) are refused by their test labels."""
    with pytest.raises(CapsnetError, match="holds fashion-mnist's files, not mnist's") as e:
        load_dataset("mnist", fashion_dir, allow_download=False)
    assert str(fashion_dir) in one_line(e)
    monkeypatch.setenv("CAPSNET_DATA", str(fashion_dir))
    with pytest.raises(CapsnetError, match="not mnist's"):
        load_dataset("mnist", allow_download=False)
    raw = tmp_path / "raw"  # un-gzipped files are read the same way
    raw.mkdir()
    (raw / "t10k-labels-idx1-ubyte").write_bytes(
        gzip.decompress((fashion_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    with pytest.raises(CapsnetError, match="not mnist's"):
        refuse_other_idx("mnist", raw)
    refuse_other_idx("fashion-mnist", raw)  # its own files pass


# --------------------------------------------------------------------------- CIFAR

def cifar_record(label_bytes: bytes, r=1, g=2, b=3) -> bytes:
    planes = np.stack([np.full((32, 32), v, np.uint8) for v in (r, g, b)])
    planes[0, 0, 1] = 250  # red, row 0, column 1: row-major order
    return label_bytes + planes.tobytes()


def write_cifar10(root, n=2, sub=True):
    folder = root / "cifar-10-batches-bin" if sub else root
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        (folder / f"data_batch_{i}.bin").write_bytes(
            b"".join(cifar_record(bytes([(i + k) % 10])) for k in range(n)))
    (folder / "test_batch.bin").write_bytes(cifar_record(bytes([7]), 10, 20, 30) * n)
    (folder / "batches.meta.txt").write_text("\n".join(cifar.CIFAR10_CLASSES) + "\n")
    return root


def write_cifar100(root, n=3):
    folder = root / "cifar-100-binary"
    folder.mkdir(parents=True)
    (folder / "train.bin").write_bytes(
        b"".join(cifar_record(bytes([k % 20, 90 + k])) for k in range(n)))
    (folder / "test.bin").write_bytes(cifar_record(bytes([19, 99])))
    (folder / "fine_label_names.txt").write_text("\n".join(cifar.CIFAR100_CLASSES))
    (folder / "coarse_label_names.txt").write_text("x\n" * 20)
    return root


def test_cifar10_decodes_planes_and_labels(tmp_path):
    train, test = load_dataset("cifar10", write_cifar10(tmp_path / "c"))
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    img = train.images[0]
    assert img[0, 0, 1] == 250 and img[0, 0, 0] == 1 and img[0, 1, 0] == 1
    assert (img[1] == 2).all() and (img[2] == 3).all()
    assert test.labels.tolist() == [7, 7] and test.images[0, 2, 5, 5] == 30
    assert train.classes == cifar.CIFAR10_CLASSES
    # the extracted folder itself is accepted too
    train2, _ = load_dataset("cifar10", tmp_path / "c" / "cifar-10-batches-bin")
    assert torch.equal(train2.images, train.images)


def test_cifar100_uses_fine_labels(tmp_path):
    train, test = load_dataset("cifar100", write_cifar100(tmp_path / "c"))
    assert train.labels.tolist() == [90, 91, 92] and test.labels.tolist() == [99]
    assert len(train.classes) == 100 and train.classes[99] == "worm"
    assert (train.images[:, 2] == 3).all()


@pytest.mark.parametrize("damage,message", [
    ("size", "not a whole number of 3073-byte records"),
    ("label", "label 10 out of range 0..9"),
    ("missing", "data_batch_3.bin: missing"),
])
def test_cifar10_damage(tmp_path, damage, message):
    root = write_cifar10(tmp_path / "c")
    folder = root / "cifar-10-batches-bin"
    if damage == "size":
        with open(folder / "data_batch_4.bin", "ab") as f:
            f.write(b"\0" * 7)
    elif damage == "label":
        (folder / "data_batch_2.bin").write_bytes(cifar_record(bytes([10])))
    else:
        (folder / "data_batch_3.bin").unlink()
    with pytest.raises(CapsnetError, match=re.escape(message)) as e:
        load_dataset("cifar10", root)
    msg = one_line(e)
    assert str(folder) in msg


def test_cifar100_label_ranges(tmp_path):
    root = write_cifar100(tmp_path / "c")
    (root / "cifar-100-binary" / "test.bin").write_bytes(cifar_record(bytes([3, 100])))
    with pytest.raises(CapsnetError, match="fine label 100 out of range 0..99"):
        load_dataset("cifar100", root)
    (root / "cifar-100-binary" / "test.bin").write_bytes(cifar_record(bytes([20, 1])))
    with pytest.raises(CapsnetError, match="coarse label 20 out of range 0..19"):
        load_dataset("cifar100", root)


@pytest.mark.parametrize("name,layout", [
    ("cifar10", {"cifar-10-batches-py/data_batch_1": 1}),
    ("cifar10", {"data_batch_1": 1, "test_batch": 1}),
    ("cifar100", {"cifar-100-python/train": 1}),
    ("cifar100", {"train": 1, "test": 1, "meta": 1}),
])
def test_cifar_python_version_never_unpickled(tmp_path, monkeypatch, name, layout):
    def refuse(*a, **k):
        raise AssertionError("a pickle was loaded")
    for attr in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, attr, refuse)
    for rel in layout:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"\x80\x04garbage that a pickle reader would choke on")
    with pytest.raises(CapsnetError) as e:
        load_dataset(name, tmp_path)  # download allowed, yet refused: no network call
    msg = one_line(e)
    assert "python version" in msg and "binary" in msg and str(tmp_path) in msg
    url = {"cifar10": "cifar-10", "cifar100": "cifar-100"}[name]
    assert f"https://www.cs.toronto.edu/~kriz/{url}-binary.tar.gz" in msg


def cifar_archive(tmp_path, extra_members=()) -> bytes:
    src = write_cifar10(tmp_path / "archive-source", n=1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for p in sorted((src / "cifar-10-batches-bin").iterdir()):
            tar.add(p, arcname=f"cifar-10-batches-bin/{p.name}")
        for name, data in extra_members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def with_md5(monkeypatch, name, fmt_md5):
    """The registry entry ``name`` with the archive checksum ``fmt_md5`` (everything else,
    including the URL and the extraction, unchanged)."""
    fmt = dataclasses.replace(cifar.CIFAR10, md5=fmt_md5)
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(
        DATASETS[name], download=partial(cifar.download_cifar, fmt=fmt)))


@pytest.mark.parametrize("has_filter", [True, False])
def test_cifar_download_extracts_only_expected_members(tmp_path, monkeypatch, has_filter):
    if not has_filter:  # a Python without tarfile's extraction filters
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    data = cifar_archive(tmp_path, [("../escape.txt", b"x"),
                                    ("cifar-10-batches-bin/readme.html", b"r"),
                                    ("/tmp/absolute.txt", b"x")])
    net = FakeNet({cifar.CIFAR10.url: data})
    monkeypatch.setattr(urllib.request, "urlopen", net)
    with_md5(monkeypatch, "cifar10", md5(data))
    target = tmp_path / "new" / "cifar"
    train, test = load_dataset("cifar10", target)
    assert net.calls == [cifar.CIFAR10.url] and len(train) == 5 and len(test) == 1
    assert sorted(p.name for p in target.iterdir()) == ["cifar-10-batches-bin"]  # archive gone
    extracted = sorted(p.name for p in (target / "cifar-10-batches-bin").iterdir())
    assert extracted == sorted([f"data_batch_{i}.bin" for i in range(1, 6)]
                               + ["test_batch.bin", "batches.meta.txt"])
    assert not (tmp_path / "new" / "escape.txt").exists()
    # the cache is the target without --data-dir
    monkeypatch.setattr(urllib.request, "urlopen", FakeNet({cifar.CIFAR10.url: data}))
    load_dataset("cifar10")
    assert (tmp_path / "cache" / "capsnet" / "cifar10" / "cifar-10-batches-bin").is_dir()


def test_cifar_download_failures_leave_nothing(tmp_path, monkeypatch):
    data = cifar_archive(tmp_path)
    monkeypatch.setattr(urllib.request, "urlopen", FakeNet({cifar.CIFAR10.url: data}))
    target = tmp_path / "mistyped" / "deeper"
    with pytest.raises(CapsnetError) as e:  # the real md5: the fake archive does not match
        load_dataset("cifar10", target)
    assert "checksum mismatch" in one_line(e) and cifar.CIFAR10.url in one_line(e)
    assert not (tmp_path / "mistyped").exists()
    # an archive lacking a member: checksum fine, extraction refuses, folder removed
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-bin/data_batch_1.bin")
        tar.addfile(info, io.BytesIO(b""))
    monkeypatch.setattr(urllib.request, "urlopen", FakeNet({cifar.CIFAR10.url: buf.getvalue()}))
    with_md5(monkeypatch, "cifar10", md5(buf.getvalue()))
    with pytest.raises(CapsnetError, match="has no file cifar-10-batches-bin/data_batch_2.bin"):
        load_dataset("cifar10", target)
    assert not (tmp_path / "mistyped").exists()


# --------------------------------------------------------------------------- downloads

def test_fetch_lands_atomically_and_tries_mirrors_in_order(tmp_path, monkeypatch):
    payload = b"the real file" * 100
    dest = tmp_path / "f.bin"
    net = FakeNet({"http://second/f.bin": payload}, watch=dest)
    monkeypatch.setattr(download, "_urlopen", net)  # the single network function
    assert download.fetch(["http://first/f.bin", "http://second/f.bin"], dest,
                          md5(payload)) == dest
    assert net.calls == ["http://first/f.bin", "http://second/f.bin"]
    assert dest.read_bytes() == payload
    assert net.seen_parts and all(p.startswith(".f.bin.") for p in net.seen_parts)
    assert os.listdir(tmp_path) == ["f.bin"]  # no temporary file left
    download.fetch(["http://second/f.bin"], dest, md5(payload))  # present and right:
    assert len(net.calls) == 2  # no download
    sha = hashlib.sha256(payload).hexdigest()
    net.watch = None
    dest.write_bytes(b"stale")
    download.fetch("http://second/f.bin", dest, sha256=sha)
    assert dest.read_bytes() == payload


def test_fetch_bad_checksum_leaves_nothing(tmp_path, monkeypatch):
    net = FakeNet({"http://a/f": b"wrong", "http://b/f": b"also wrong"})
    monkeypatch.setattr(download, "_urlopen", net)
    with pytest.raises(CapsnetError) as e:
        download.fetch(["http://a/f", "http://b/f"], tmp_path / "f", md5(b"right"))
    msg = one_line(e)
    assert "http://a/f: checksum mismatch" in msg and "http://b/f: checksum mismatch" in msg
    assert os.listdir(tmp_path) == []


def test_new_folder_removes_only_what_it_created(tmp_path):
    with pytest.raises(RuntimeError):
        with download.new_folder(tmp_path / "a" / "b" / "c"):
            (tmp_path / "a" / "b" / "c" / "partial").write_bytes(b"x")
            raise RuntimeError
    assert os.listdir(tmp_path) == []
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError):
        with download.new_folder(tmp_path / "kept"):
            raise RuntimeError
    assert (tmp_path / "kept").is_dir()


# --------------------------------------------------------------------------- SVHN

def svhn_mat(path, labels, x=None, **extra):
    import scipy.io
    n = len(labels)
    if x is None:
        x = np.zeros((32, 32, 3, n), np.uint8)
        for i in range(n):
            x[..., 0, i], x[..., 1, i], x[..., 2, i] = 10 + i, 100, 200
        x[1, 2, 0, 0] = 77  # row 1, column 2, red, image 0
    scipy.io.savemat(path, {"X": x, "y": np.asarray(labels, np.uint8).reshape(-1, 1), **extra})
    return path


def write_svhn(folder, extra=False):
    folder.mkdir(parents=True, exist_ok=True)
    svhn_mat(folder / "train_32x32.mat", [10, 1, 5])
    svhn_mat(folder / "test_32x32.mat", [3, 10])
    if extra:
        svhn_mat(folder / "extra_32x32.mat", [9, 9, 9, 9])
    return folder


def test_svhn_decodes_and_maps_ten_to_zero(tmp_path):
    train, test = load_dataset("svhn", write_svhn(tmp_path / "s"))
    assert train.images.shape == (3, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 1, 5] and test.labels.tolist() == [3, 0]
    assert train.images[0, 0, 1, 2] == 77 and train.images[0, 0, 2, 1] == 10
    assert (train.images[2, 0] == 12).all() and (train.images[:, 1] == 100).all()
    assert (train.images[:, 2] == 200).all()
    with pytest.raises(CapsnetError, match="svhn-extra not found"):  # extra only on request
        load_dataset("svhn-extra", tmp_path / "s", allow_download=False)
    write_svhn(tmp_path / "s", extra=True)
    train, test = load_dataset("svhn-extra", tmp_path / "s")
    assert train.labels.tolist() == [0, 1, 5, 9, 9, 9, 9] and len(test) == 2
    assert len(load_dataset("svhn", tmp_path / "s")[0]) == 3


def test_svhn_test_split_alone_reads_only_the_test_file(tmp_path, monkeypatch):
    """Evaluating reads test_32x32.mat only: not the training file, not the extra one,
    whether they are there (damaged here, to show they are not read) or not."""
    from capsnet.data.registry import load_test_split
    folder = write_svhn(tmp_path / "s", extra=True)
    (folder / "train_32x32.mat").write_bytes(b"not read")
    (folder / "extra_32x32.mat").write_bytes(b"not read")
    for name in ("svhn", "svhn-extra"):
        test = load_test_split(name, folder, allow_download=False)
        assert test.labels.tolist() == [3, 0] and test.images.shape == (2, 3, 32, 32)
    only = tmp_path / "only"
    only.mkdir()
    (only / "test_32x32.mat").write_bytes((folder / "test_32x32.mat").read_bytes())
    assert load_test_split("svhn-extra", only, allow_download=False).labels.tolist() == [3, 0]
    rows = {r["name"]: r for r in describe_datasets(only)}
    assert rows["svhn"]["test_only"] == str(only) and rows["svhn"]["found"] is None
    (only / "test_32x32.mat").write_bytes(b"damaged")
    with pytest.raises(CapsnetError, match="cannot read the .mat file") as e:
        load_test_split("svhn", only, allow_download=False)
    assert str(only / "test_32x32.mat") in one_line(e)


V73 = (b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116) + b"\0" * 8
       + b"\x00\x02IM" + b"\x89HDF\r\n\x1a\n" + b"\0" * 64)


@pytest.mark.parametrize("damage,message", [
    ("v73", "MATLAB v7.3 (HDF5)"),
    ("garbage", "cannot read the .mat file"),
    ("no_y", "no variable 'y'"),
    ("shape", "expected uint8 [32, 32, 3, N]"),
    ("dtype", "X is float64"),
    ("label", "label 11 (image 1) out of range 1..10"),
    ("zero", "label 0 (image 0) out of range"),
    ("count", "X holds 3 images but y holds 2 labels"),
])
def test_svhn_damage(tmp_path, damage, message):
    import scipy.io
    folder = write_svhn(tmp_path / "s")
    path = folder / "train_32x32.mat"
    if damage == "v73":
        path.write_bytes(V73)
    elif damage == "garbage":
        path.write_bytes(b"not a mat file" * 20)
    elif damage == "no_y":
        scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 1), np.uint8)})
    elif damage == "shape":
        svhn_mat(path, [1], x=np.zeros((28, 28, 1, 1), np.uint8))
    elif damage == "dtype":
        svhn_mat(path, [1], x=np.zeros((32, 32, 3, 1)))
    elif damage == "label":
        svhn_mat(path, [1, 11])
    elif damage == "zero":
        svhn_mat(path, [0])
    else:
        scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 3), np.uint8),
                                "y": np.ones((2, 1), np.uint8)})
    with pytest.raises(CapsnetError, match=re.escape(message)) as e:
        load_dataset("svhn", folder)
    assert str(path) in one_line(e)


def test_svhn_download(tmp_path, monkeypatch):
    files = write_svhn(tmp_path / "src")
    served = {svhn.URL + n: (files / n).read_bytes() for n in ("train_32x32.mat",
                                                               "test_32x32.mat")}
    net = FakeNet(served)
    monkeypatch.setattr(urllib.request, "urlopen", net)
    for url, data in served.items():  # the checksums of these small stand-ins
        monkeypatch.setitem(svhn.MD5, url.rsplit("/", 1)[1], md5(data))
    target = tmp_path / "new" / "svhn"
    train, test = load_dataset("svhn", target)
    assert net.calls == list(served) and train.labels.tolist() == [0, 1, 5]
    assert sorted(os.listdir(target)) == ["test_32x32.mat", "train_32x32.mat"]
    # bad checksum on the second file: the first stays out too, the new folder is removed
    monkeypatch.setitem(svhn.MD5, "test_32x32.mat", md5(b"something else"))
    with pytest.raises(CapsnetError) as e:
        load_dataset("svhn", tmp_path / "other" / "svhn")
    assert "checksum mismatch" in one_line(e) and "--data-dir" in one_line(e)
    assert not (tmp_path / "other").exists()
    with pytest.raises(CapsnetError, match="download disabled"):
        load_dataset("svhn", tmp_path / "other", allow_download=False)
    assert not (tmp_path / "other").exists()


# --------------------------------------------------------------------------- smallNORB

def norb_bytes(magic, dims, data: np.ndarray, header_dims=None) -> bytes:
    shown = list(dims) + [1] * max(0, 3 - len(dims))
    head = struct.pack("<ii", magic, len(dims)) + struct.pack(f"<{len(shown)}i", *shown)
    return head + np.ascontiguousarray(data).tobytes()


def write_norb(folder, n=3, gz=True, seed=0, **replace):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split in ("train", "test"):
        dat = rng.integers(0, 256, (n, 2, 96, 96), dtype=np.uint8)
        dat[:, 0, :2, :2] = [[10, 20], [30, 41]]  # block mean 25.25 -> 25
        dat[:, 1, :2, :2] = [[1, 2], [1, 2]]  # block mean 1.5 -> 2 (half up)
        cat = (np.arange(n) % 5).astype("<i4")
        info = np.zeros((n, 4), "<i4")
        parts = {"dat": (smallnorb.MAGIC_UINT8, dat), "cat": (smallnorb.MAGIC_INT32, cat),
                 "info": (smallnorb.MAGIC_INT32, info)}
        for kind, (magic, a) in parts.items():
            magic, a = replace.get(f"{split}-{kind}", (magic, a))
            data = norb_bytes(magic, a.shape, a)
            name = smallnorb.STEMS[split].format(kind)
            (folder / (name + ".gz" if gz else name)).write_bytes(
                gzip.compress(data, 1) if gz else data)
        arrays[split] = dat
    return folder, arrays


def test_smallnorb_downsamples_and_crops_test(tmp_path):
    folder, arrays = write_norb(tmp_path / "n", n=3)
    train, test = load_dataset("smallnorb", folder)
    assert train.images.shape == (3, 2, 48, 48) and train.images.dtype == torch.uint8
    assert test.images.shape == (3, 2, 32, 32)  # centre crop of the 48x48 test images
    assert train.labels.tolist() == [0, 1, 2] and train.classes[4] == "car"
    expect = np.floor(arrays["train"].reshape(3, 2, 48, 2, 48, 2).mean((3, 5)) + 0.5)
    assert np.array_equal(train.images.numpy(), expect.astype(np.uint8))
    assert train.images[0, 0, 0, 0] == 25 and train.images[0, 1, 0, 0] == 2
    expect_test = np.floor(arrays["test"].reshape(3, 2, 48, 2, 48, 2).mean((3, 5)) + 0.5)
    assert np.array_equal(test.images.numpy(), expect_test[..., 8:40, 8:40].astype(np.uint8))
    raw, _ = write_norb(tmp_path / "raw", n=2, gz=False)  # un-gzipped files too
    assert load_dataset("smallnorb", raw)[0].images.shape == (2, 2, 48, 48)


@pytest.mark.parametrize("replace,message", [
    ({"train-dat": (0x1E3D4C51, np.zeros((3, 2, 96, 96), np.float32))},
     "magic number 0x1E3D4C51 (a float32 matrix), expected 0x1E3D4C55"),
    ({"train-cat": (smallnorb.MAGIC_UINT8, np.zeros(3, np.uint8))}, "expected 0x1E3D4C54"),
    ({"train-dat": (smallnorb.MAGIC_UINT8, np.zeros((3, 2, 96, 95), np.uint8))},
     "dimensions 3x2x96x95, expected Nx2x96x96"),
    ({"train-dat": (smallnorb.MAGIC_UINT8, np.zeros((3, 96, 96), np.uint8))},
     "3 dimensions, expected 4"),
    ({"test-cat": (smallnorb.MAGIC_INT32, np.zeros(2, "<i4"))},
     "holds 3 image pairs but"),
    ({"test-info": (smallnorb.MAGIC_INT32, np.zeros((2, 4), "<i4"))},
     "holds 3 image pairs but"),
    ({"train-cat": (smallnorb.MAGIC_INT32, np.array([0, 5, 1], "<i4"))},
     "label 5 out of range 0..4"),
])
def test_smallnorb_damage(tmp_path, replace, message):
    folder, _ = write_norb(tmp_path / "n", **replace)
    with pytest.raises(CapsnetError, match=re.escape(message)) \
            as e:
        load_dataset("smallnorb", folder)
    assert str(folder) in one_line(e)


def test_smallnorb_truncated_and_missing(tmp_path):
    folder, _ = write_norb(tmp_path / "n", gz=False)
    path = folder / smallnorb.STEMS["test"].format("dat")
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CapsnetError, match="truncated") as e:
        load_dataset("smallnorb", folder)
    assert str(path) in one_line(e)
    path.unlink()
    with pytest.raises(CapsnetError, match="smallnorb not found.*download disabled"):
        load_dataset("smallnorb", folder, allow_download=False)


def test_smallnorb_download_checks_sha256(tmp_path, monkeypatch):
    src, _ = write_norb(tmp_path / "src", n=1)
    served = {smallnorb.URL + p.name: p.read_bytes() for p in src.iterdir()}
    net = FakeNet(served)
    monkeypatch.setattr(urllib.request, "urlopen", net)
    for url, data in served.items():
        monkeypatch.setitem(smallnorb.SHA256, url.rsplit("/", 1)[1],
                            hashlib.sha256(data).hexdigest())
    train, test = load_dataset("smallnorb")  # into the cache
    assert len(train) == 1 and test.shape == (2, 32, 32) and len(net.calls) == 6
    assert len(os.listdir(tmp_path / "cache" / "capsnet" / "smallnorb")) == 6


# --------------------------------------------------------------------------- image folders

def save(path, array, mode=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    im.save(path, **kw)
    return path


def grey(v, size=(8, 8)):
    return np.full(size, v, np.uint8)


def _split_values(root, **kw):
    """{pixel value of each image: 'train' or 'test'} (every file has its own value)."""
    train, test = load_dataset("folder", root, image_size=8, **kw)
    for ds in (train, test):  # the label of image k matches its file (value // 80 = class)
        assert ((ds.images[:, 0, 0, 0].long() // 80) == ds.labels).all()
    return {**{int(v): "train" for v in train.images[:, 0, 0, 0]},
            **{int(v): "test" for v in test.images[:, 0, 0, 0]}}


def test_folder_split_seeded_and_stable_when_the_folder_grows(tmp_path):
    root = tmp_path / "d"
    for c, name in enumerate(["cat", "dog", "emu"]):
        for i in range(30):
            save(root / name / f"{name}{i:02d}.png", grey(80 * c + i))
    (root / "README.txt").write_text("ignored")
    (root / "cat" / ".DS_Store").write_bytes(b"ignored")
    train, test = load_dataset("folder", root, image_size=8, test_fraction=0.2)
    assert train.classes == ("cat", "dog", "emu") and train.labels.dtype == torch.int64
    assert len(train) + len(test) == 90 and 6 <= len(test) <= 32  # binomial(90, 0.2)
    assert set(test.labels.tolist()) == {0, 1, 2}
    before = _split_values(root, test_fraction=0.2)
    assert before == _split_values(root)  # seeded: the same again (0.2 is the default)
    assert before != _split_values(root, split_seed=3)
    # a class grows by 10 images: no image that was there changes sides
    for i in range(30, 40):
        save(root / "dog" / f"dog{i:02d}.png", grey(80 + i))
    after = _split_values(root)
    assert len(after) == 100 and {v: after[v] for v in before} == before
    assert load_dataset("folder", root)[0].images.shape[-1] == 32  # default size


def test_folder_split_share_and_one_line_errors(tmp_path):
    names = [f"img_{i:05d}.jpg" for i in range(4000)]
    assert abs(held_out(names, 0.2).float().mean().item() - 0.2) < 0.02
    assert torch.equal(held_out(names[:100], 0.3, 1), held_out(names, 0.3, 1)[:100])
    root = tmp_path / "d"
    for c in ("a", "b"):
        for i in range(4):
            save(root / c / f"{i}.png", grey(1))
    # a class whose every image is drawn for the test set: one line naming the class
    seed = next(s for s in range(1000) if held_out([f"{i}.png" for i in range(4)], 0.5, s).all())
    with pytest.raises(CapsnetError, match="all 4 images fell in the test split") as e:
        load_dataset("folder", root, test_fraction=0.5, split_seed=seed)
    assert str(root / "a") in one_line(e)


def test_folder_modes_crop_and_channels(tmp_path):
    root = tmp_path / "d"
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, :10], wide[:, 10:20], wide[:, 20:] = (255, 0, 0), (10, 20, 30), (0, 0, 255)
    save(root / "train" / "a" / "wide.png", wide)  # centre crop keeps the middle square
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[...] = (200, 100, 50, 128)
    save(root / "train" / "a" / "alpha.png", rgba)
    save(root / "train" / "b" / "grey.png", grey(90, (10, 10)))
    save(root / "train" / "b" / "deep.png", np.full((10, 10), 257 * 100, np.uint16))
    pal = Image.new("P", (10, 10))
    pal.putpalette([0, 0, 0, 5, 6, 7] + [0] * 762)
    pal.paste(1, (0, 0, 10, 10))
    (root / "test" / "a").mkdir(parents=True)
    pal.save(root / "test" / "a" / "palette.png")
    save(root / "test" / "b" / "bw.png", np.ones((10, 10), bool))
    save(root / "test" / "b" / "photo.JPG", np.full((12, 12, 3), 128, np.uint8), quality=95)
    (root / "val").mkdir()  # ignored with train/ and test/
    train, test = load_dataset("folder", root, image_size=10)
    assert train.images.shape == (4, 3, 10, 10) and test.images.shape == (3, 3, 10, 10)
    # each split in a hashed order that mixes the classes: compare per label, any order
    def pixels(ds, label, y, x):
        return sorted(img[:, y, x].tolist() for img, lab in zip(ds.images, ds.labels)
                      if lab == label)
    assert sorted(train.labels.tolist()) == [0, 0, 1, 1]
    assert sorted(test.labels.tolist()) == [0, 1, 1]
    # wide: the centre crop keeps the middle colour; alpha: composited on black
    assert pixels(train, 0, 5, 5) == [[10, 20, 30], [100, 50, 25]]
    assert pixels(train, 1, 5, 5) == [[90] * 3, [100] * 3]  # grey and 16-bit: R = G = B
    assert pixels(test, 0, 0, 0) == [[5, 6, 7]]
    assert [255] * 3 in pixels(test, 1, 0, 0)
    assert abs(int(test.images[2, 0, 5, 5]) - 128) <= 2  # 12x12 JPEG resized to 10x10


def test_folder_all_grey_is_one_channel_and_resized(tmp_path):
    save(tmp_path / "a" / "x.png", grey(7, (64, 48)))
    save(tmp_path / "b" / "y.png", np.full((40, 40), 65535, np.uint16))
    save(tmp_path / "a" / "z.png", grey(7, (20, 20)))
    save(tmp_path / "b" / "w.png", grey(9, (20, 20)))
    train, test = load_dataset("folder", tmp_path, image_size=16, test_fraction=0.5)
    assert train.shape == (1, 16, 16) and len(train) + len(test) == 4
    assert set(torch.cat([train.images, test.images]).unique().tolist()) == {7, 9, 255}


def test_folder_splits_mix_the_classes_and_load_without_copies(tmp_path):
    """A folder lists its classes one after another; each split comes in a hashed order, so
    its first images (``--train-size``/``--test-size`` keep those) hold every class. The
    images are read into one tensor of which both splits are views."""
    import tracemalloc

    from capsnet.data.datamodule import ImageDataModule
    root = tmp_path / "images"
    for c in ("a", "b", "c"):
        for i in range(40):
            save(root / c / f"{c}{i}.png", np.full((8, 8, 3), (i, 3 * i, 0), np.uint8))
    train, test = load_dataset("folder", root, image_size=32, test_fraction=0.25)
    assert set(train.labels[:9].tolist()) == {0, 1, 2} == set(test.labels[:6].tolist())
    assert train.images.untyped_storage().data_ptr() == test.images.untyped_storage().data_ptr()
    dm = ImageDataModule("folder", root, train_size=12, test_size=6, val_size=0,
                         options={"image_size": 32, "test_fraction": 0.25})
    dm.setup("fit")
    assert set(dm.train.labels.tolist()) == {0, 1, 2} and len(dm.test) == 6
    tracemalloc.start()
    train, test = load_dataset("folder", root, image_size=32, test_fraction=0.25)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1.5 * 120 * 3 * 32 * 32  # the images once, and a little more


@pytest.mark.parametrize("damage,message", [
    ("unreadable", "cannot read the image"),
    ("empty_class", "empty class folder"),
    ("no_classes", "no class sub-folders"),
    ("one_class", "only one class folder"),
    ("class_sets", "classes differ"),
    ("no_test", "missing (a folder with train/ needs test/"),
    ("fraction", "leaves an empty split"),
])
def test_folder_damage(tmp_path, damage, message):
    root = tmp_path / "d"
    for c in ("a", "b"):
        for name in ("0.png", "3.png"):  # drawn to the test and the training split (0.5)
            save(root / c / name, grey(1))
    where = root
    if damage == "unreadable":
        where = root / "b" / "1.png"
        where.write_bytes(b"not a png")
    elif damage == "empty_class":
        where = root / "c"
        (where / "nested").mkdir(parents=True)
        save(where / "nested" / "0.png", grey(1))  # nested folders are not looked into
        (where / "notes.txt").write_text("x")
    elif damage in ("no_classes", "one_class"):
        root = tmp_path / "e"
        where = root
        if damage == "one_class":
            save(root / "only" / "0.png", grey(1))
        else:
            save(root / "x.png", grey(1))
    elif damage in ("class_sets", "no_test"):
        root = tmp_path / "split"
        for c in ("a", "b"):
            save(root / "train" / c / "0.png", grey(1))
        if damage == "class_sets":
            save(root / "test" / "a" / "0.png", grey(1))
            save(root / "test" / "c" / "0.png", grey(1))
            where = root / "test"
        else:
            where = root / "test"
    with pytest.raises(CapsnetError, match=re.escape(message)) as e:
        load_dataset("folder", root, test_fraction=0.01 if damage == "fraction" else 0.5)
    assert str(where) in one_line(e)


def test_folder_image_too_large(tmp_path, monkeypatch):
    for c in ("a", "b"):
        for name in ("0.png", "3.png"):  # drawn to the test and the training split (0.5)
            save(tmp_path / c / name, grey(1, (10, 10)))
    for limit in (60, 40):  # our check (and Pillow's warning), Pillow's bomb error
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(CapsnetError, match="image too large") as e:
            load_dataset("folder", tmp_path, test_fraction=0.5)
        assert re.search(re.escape(str(tmp_path)) + r"/[ab]/[03]\.png: ", one_line(e))


def test_folder_never_downloads_nor_creates(tmp_path):
    with pytest.raises(CapsnetError) as e:  # the autouse fixture fails any network access
        load_dataset("folder", tmp_path / "nope" / "typo")
    assert "nothing usable" in one_line(e) and "class sub-folders" in one_line(e)
    assert not (tmp_path / "nope").exists()
    with pytest.raises(CapsnetError):
        load_dataset("folder")  # nothing in the (empty) cache: still nothing created
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------- multi-label CSV

def write_planet(root, rows=None, csv_name="train_v2.csv", images="train-jpg", ext=".jpg"):
    rows = rows if rows is not None else [("train_0", "haze primary"), ("train_1", "clear"),
                                          ("train_2", "primary water clear"),
                                          ("train_3", "haze"), ("train_4", "clear primary")]
    root.mkdir(parents=True, exist_ok=True)
    lines = ["image_name,tags"] + [f"{n},{t}" for n, t in rows]
    (root / csv_name).write_text("\n".join(lines) + "\n")
    for i, (name, _) in enumerate(rows):
        if name:
            save(root / images / (name + ext), np.full((16, 16, 3), (40 * i, 0, 0), np.uint8))
    return root


def test_multilabel_planet_layout(tmp_path):
    root = write_planet(tmp_path / "planet", ext=".png", images="train-jpg")
    (root / "sample_submission_v2.csv").write_text("image_name,tags\ntest_0,clear\n")
    # the split is drawn per image_name of the CSV (held_out); with these five names and
    # the default seed, 0.1 holds out two of them
    train, test = load_dataset("multilabel", root, image_size=8, test_fraction=0.1)
    assert torch.equal(held_out([f"train_{i}" for i in range(5)], 0.1),
                       torch.tensor([True, False, True, False, False]))
    assert train.classes == ("clear", "haze", "primary", "water")
    assert train.labels.dtype == torch.uint8 and train.labels.shape == (3, 4)
    assert len(test) == 2 and test.images.shape == (2, 3, 8, 8)
    expect = {0: [0, 1, 1, 0], 1: [1, 0, 0, 0], 2: [1, 0, 1, 1], 3: [0, 1, 0, 0],
              4: [1, 0, 1, 0]}
    for ds in (train, test):  # the k-hot row belongs to its image (red = 40 x index)
        for img, lab in zip(ds.images, ds.labels):
            assert lab.tolist() == expect[int(img[0, 0, 0]) // 40]
    assert dataset_info("multilabel").multi_label


def test_multilabel_jpg_and_other_csv_names(tmp_path):
    root = write_planet(tmp_path / "p", csv_name="labels.csv", images="images")
    train, test = load_dataset("multilabel", root, test_fraction=0.4)  # 2 of these 5 names
    assert len(train) == 3 and len(test) == 2 and train.shape == (3, 32, 32)


@pytest.mark.parametrize("damage,message", [
    ("duplicate", "train_v2.csv:4: image train_0 listed again (first on line 2)"),
    ("missing", "train_v2.csv:3: image train_1 not found in"),
    ("empty_tags", "train_v2.csv:3: empty tags field for train_1"),
    ("header", "train_v2.csv:1: bad header"),
    ("fields", "train_v2.csv:2: 3 fields, expected 2"),
    ("no_images_dir", "train_v2.csv: no image folder next to it"),
    ("two_csvs", "several label CSVs (a.csv, b.csv)"),
])
def test_multilabel_damage(tmp_path, damage, message):
    root = write_planet(tmp_path / "p")
    csv_path = root / "train_v2.csv"
    if damage == "duplicate":
        write_planet(root, [("train_0", "a"), ("train_1", "b"), ("train_0", "c")])
    elif damage == "missing":
        (root / "train-jpg" / "train_1.jpg").unlink()
    elif damage == "empty_tags":
        write_planet(root, [("train_0", "a"), ("train_1", " ")])
    elif damage == "header":
        csv_path.write_text("name,labels\ntrain_0,a\n")
    elif damage == "fields":
        csv_path.write_text("image_name,tags\ntrain_0,a,b\n")
    elif damage == "no_images_dir":
        (root / "train-jpg").rename(root / "pictures")
    else:
        csv_path.unlink()
        for n in ("a.csv", "b.csv"):
            (root / n).write_text("image_name,tags\ntrain_0,x\n")
    with pytest.raises(CapsnetError, match=re.escape(message)) \
            as e:
        load_dataset("multilabel", root)
    assert str(root) in one_line(e)


# --------------------------------------------------------------------------- listing

def test_describe_and_cmd_datasets(tmp_path, monkeypatch, capsys):
    env = tmp_path / "env"
    write_svhn(env / "svhn")
    write_cifar10(env / "cifar10")
    (env / "cifar100" / "cifar-100-python").mkdir(parents=True)
    monkeypatch.setenv("CAPSNET_DATA", str(env))
    rows = {r["name"]: r for r in describe_datasets()}
    assert set(rows) == set(DATASETS)
    assert rows["svhn"]["found"] == str(env / "svhn") and rows["svhn"]["classes"] == 10
    assert rows["cifar10"]["found"] == str(env / "cifar10" / "cifar-10-batches-bin")
    assert rows["cifar100"]["found"] is None and "python version" in rows["cifar100"]["problem"]
    assert rows["smallnorb"]["found"] is None and rows["smallnorb"]["image_shape"] == (2, 32, 32)
    assert rows["folder"]["classes"] is None and rows["folder"]["image_shape"] is None
    assert not (tmp_path / "cache").exists()  # looking never downloads nor creates
    assert cmd_datasets(Namespace(data_dir=None)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["dataset", "classes", "image"]
    assert len(lines) == 1 + len(DATASETS)
    by_name = {line.split()[0]: line for line in lines[1:]}
    assert str(env / "svhn") in by_name["svhn"] and "3x32x32" in by_name["svhn"]
    assert "UNUSABLE" in by_name["cifar100"]
    assert "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/" in by_name["smallnorb"]
    # --data-dir: the only place looked at
    assert cmd_datasets(Namespace(data_dir=str(env / "svhn"))) == 0
    out = capsys.readouterr().out
    by_name = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert str(env / "svhn") in by_name["svhn"]  # and svhn-extra can be evaluated there:
    extra = by_name["svhn-extra"]
    assert str(env / "svhn") in extra and "test files only" in extra
    rows = {r["name"]: r for r in describe_datasets(env / "svhn")}
    assert rows["cifar10"]["found"] is None and rows["svhn-extra"]["found"] is None
    assert rows["svhn-extra"]["test_only"] == str(env / "svhn")


# --------------------------------------------------------------------------- training on them

def test_training_on_smallnorb_takes_random_crops_and_evaluates_centre_crops(tmp_path):
    """A real (tiny) run end to end on files in smallNORB's published format: the model sees
    32x32 stereo pairs (2 channels): random crops of the 48x48 training images, centre crops
    for validation and test; `capsnet evaluate` reads the same test split."""
    from capsnet.checkpoints import load_model
    from capsnet.cli import main
    folder, _ = write_norb(tmp_path / "norb", n=40)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "smallnorb", "--data-dir", str(folder),
                 "--val-size", "10", "--epochs", "1", "--batch-size", "10",
                 "--no-progress", "--no-tensorboard", "--out", str(out)]) == 0
    model, meta = load_model(out / "last.ckpt")
    c = model.config
    assert (c.in_channels, c.image_size, c.num_classes) == (2, 32, 5)
    assert meta["dataset"] == "smallnorb"
    assert main(["evaluate", str(out / "last.ckpt"), "--data-dir", str(folder)]) == 0
    # flips are refused: a mirrored stereo pair is not the same view
    assert main(["train", "--dataset", "smallnorb", "--data-dir", str(folder), "--hflip",
                 "--out", str(tmp_path / "flip")]) == 2


def test_training_on_cifar10_binary_files(tmp_path):
    from capsnet.checkpoints import load_model
    from capsnet.cli import main
    root = write_cifar10(tmp_path / "c10", n=8)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(root), "--val-size", "0",
                 "--epochs", "1", "--batch-size", "16", "--hflip", "--no-progress",
                 "--no-tensorboard", "--out", str(out)]) == 0
    model, _ = load_model(out / "last.ckpt")
    assert (model.config.in_channels, model.config.image_size) == (3, 32)


def test_folder_that_changed_refuses_the_runs_validation_split(tmp_path, capsys):
    """The validation split is carved by position: from a folder that gained images since
    the run it would be other images, some trained on. evaluate --split val (checkpoint and
    exported file) and --resume refuse; the test split (drawn per file name) still works."""
    from capsnet.cli import main
    root = tmp_path / "d"
    for c, name in enumerate(["cat", "dog", "emu"]):
        for i in range(14):
            save(root / name / f"{name}{i:02d}.png", grey(80 * c + i, (16, 16)))
    run = tmp_path / "run"
    flags = ["--dataset", "folder", "--data-dir", str(root), "--image-size", "28",
             "--val-size", "6", "--epochs", "1", "--batch-size", "16", "--no-progress",
             "--no-tensorboard"]
    assert main(["train", *flags, "--out", str(run)]) == 0
    assert main(["export", str(run / "last.ckpt"), str(tmp_path / "w.safetensors")]) == 0
    for model in (run / "last.ckpt", tmp_path / "w.safetensors"):
        assert main(["evaluate", str(model), "--split", "val", "--data-dir", str(root)]) == 0
    capsys.readouterr()
    for i in range(14, 17):  # the folder grows
        save(root / "dog" / f"dog{i:02d}.png", grey(80 + i, (16, 16)))
    for model in (run / "last.ckpt", tmp_path / "w.safetensors"):
        assert main(["evaluate", str(model), "--split", "val", "--data-dir", str(root)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "changed since the run" in err
        assert "Traceback" not in err and str(model) in err
        assert main(["evaluate", str(model), "--data-dir", str(root)]) == 0  # drawn per name
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "changed since the run" in err and "resuming would carve another" in err


def test_large_jpeg_decoded_at_a_reduced_scale(tmp_path):
    """A 12-megapixel JPEG is decoded by the DCT's own scaling (a fraction of the memory of
    a full decode) and gives nearly the picture the full decode gives."""
    import tracemalloc

    from capsnet.data.folder import _square, load_image
    y, x = np.mgrid[0:3000, 0:4000]
    photo = np.stack([x * 255 // 3999, y * 255 // 2999, (x + y) * 255 // 6998], -1)
    path = save(tmp_path / "big.jpg", photo.astype(np.uint8), quality=92)
    tracemalloc.start()
    try:
        small, grey = load_image(path, 32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert small.shape == (32, 32, 3) and not grey
    assert peak < 4_000_000  # a full decode alone is 36 MB as an array
    with Image.open(path) as im:
        full = _square(np.asarray(im.convert("RGB")), 32)
    assert np.abs(small.astype(int) - full.astype(int)).mean() < 2


def test_test_split_of_own_images_decodes_only_the_test_images(tmp_path, monkeypatch):
    """Evaluating a folder or multi-label model reads its test images only (the split is
    drawn per name): the same test split as a full read, with grey test images widened to
    the model's 3 channels where a colour training image made the full read colour."""
    from capsnet.data import folder as image_folder
    from capsnet.data.registry import load_test_split
    decoded = []
    real = image_folder.load_image
    monkeypatch.setattr(image_folder, "load_image",
                        lambda path, size: decoded.append(path.name) or real(path, size))
    root = tmp_path / "d"
    names = [f"{c}{i:02d}.png" for c in ("cat", "dog") for i in range(20)]
    test_names = {n for n, t in zip(names, held_out(names, 0.2)) if t}
    colour = next(n for n in names if n not in test_names)  # a training image in colour
    for k, name in enumerate(names):
        pixels = grey(5 * k) if name != colour else np.full((8, 8, 3), (200, 10, 10), np.uint8)
        save(root / name[:3] / name, pixels)
    full = load_dataset("folder", root, image_size=8)[1]
    assert full.images.shape[1] == 3  # one colour image makes the whole set colour
    decoded.clear()
    for channels, expect in ((3, 3), (None, 1)):
        test = load_test_split("folder", root, image_size=8, channels=channels)
        assert test.images.shape[1] == expect and torch.equal(test.labels, full.labels)
        assert torch.equal(test.images.expand_as(full.images), full.images)
    assert sorted(decoded) == sorted([*test_names] * 2)  # twice: only the test images
    planet = write_planet(tmp_path / "planet", ext=".png", images="train-jpg")
    full = load_dataset("multilabel", planet, image_size=8, test_fraction=0.1)[1]
    decoded.clear()
    test = load_test_split("multilabel", planet, image_size=8, test_fraction=0.1, channels=3)
    assert torch.equal(test.images, full.images) and torch.equal(test.labels, full.labels)
    assert len(decoded) == len(test) == 2


def test_idx_download_completes_a_partial_folder(tmp_path, monkeypatch):
    """Three of Fashion-MNIST's four files present (gzipped or not): only the fourth is
    fetched, so a failure names the file that is missing."""
    from capsnet.data import download
    from capsnet.data.datasets import FILES, download_idx
    stems = list(FILES.values())
    (tmp_path / (stems[0] + ".gz")).write_bytes(b"x")
    (tmp_path / stems[1]).write_bytes(b"x")
    (tmp_path / (stems[3] + ".gz")).write_bytes(b"x")
    fetched = []
    monkeypatch.setattr(download, "fetch", lambda urls, dest, md5, timeout: fetched.append(dest))
    download_idx(tmp_path, 1.0, mirrors=["http://m/"], md5={s + ".gz": "0" for s in stems})
    assert fetched == [tmp_path / (stems[2] + ".gz")]
