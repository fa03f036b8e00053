"""Real Fashion-MNIST loading, IDX validation, dataset discovery and augmentation."""

import gzip
import struct

import pytest
import torch

from capsnet.data.augment import (AugmentConfig, augment, process_draws, random_erase,
                                  random_shift)
from capsnet.cli import main
from capsnet.data.datamodule import ImageDataModule
from capsnet.data.datasets import load_dataset, locate, read_idx
from capsnet.errors import CapsnetError
from conftest import one_line_error


def write_idx(path, array: torch.Tensor, magic: int | None = None, gz=True, cut: int = 0):
    dims = list(array.shape)
    magic = magic if magic is not None else 0x0800 + len(dims)
    data = struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims)
    data += array.to(torch.uint8).numpy().tobytes()
    if cut:
        data = data[:-cut]
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def fake_dataset(folder, n_train=20, n_test=10, classes=10, size=28, gz=True):
    """A small synthetic set in the real file format and names."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}",
                  torch.randint(0, 256, (n, size, size), generator=g), gz=gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}",
                  torch.arange(n) % classes, gz=gz)
    return folder


def test_real_fashion_mnist(fashion_dir):
    train, test = load_dataset("fashion-mnist", fashion_dir)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert train.images.float().mean() > 50  # real pictures, not blank


def test_raw_files_and_mnist_names(tmp_path):
    folder = fake_dataset(tmp_path / "mnist", gz=False)
    train, test = load_dataset("mnist", folder)
    assert len(train) == 20 and len(test) == 10 and train.classes[3] == "3"


@pytest.mark.parametrize("damage,message", [
    ("truncated", "truncated"),
    ("magic", "bad IDX magic number"),
    ("label_range", "out of range"),
    ("count_mismatch", "holds 20 images but"),
    ("not_gzip", "cannot read"),
    ("gzip_body", "cannot read"),  # a valid gzip header, damaged compressed data
])
def test_corrupt_files_fail_clearly(tmp_path, capsys, damage, message):
    folder = fake_dataset(tmp_path / "d")
    images = folder / "train-images-idx3-ubyte.gz"
    labels = folder / "train-labels-idx1-ubyte.gz"
    if damage == "truncated":
        write_idx(images, torch.zeros(20, 28, 28), cut=100)
    elif damage == "magic":
        write_idx(images, torch.zeros(20, 28, 28), magic=0x0801)
    elif damage == "label_range":
        write_idx(labels, torch.full((20,), 10))
    elif damage == "count_mismatch":
        write_idx(labels, torch.zeros(19))
    elif damage == "not_gzip":
        images.write_bytes(b"this is not gzip data at all")
    elif damage == "gzip_body":
        data = bytearray(images.read_bytes())
        data[20:60] = bytes(255 - b for b in data[20:60])  # zlib.error inside gzip
        images.write_bytes(bytes(data))
    with pytest.raises(CapsnetError, match=message):
        load_dataset("fashion-mnist", folder)
    # the command line: one line naming the file, exit code 2, no traceback
    code = main(["evaluate", "nonexistent.ckpt"])  # checkpoint error comes first
    assert code == 2
    capsys.readouterr()
    code = main(["train", "--data-dir", str(folder), "--out", str(tmp_path / "run"),
                 "--epochs", "1", "--no-progress", "--val-size", "0"])
    err = capsys.readouterr().err
    assert one_line_error(code, err)
    assert message in err and str(folder) in err


def test_datasets_lists_a_cut_gzip_as_unusable(tmp_path, capsys):
    """A gzip cut short (an interrupted copy) was listed by `capsnet datasets` as found, and
    only reading it failed; now the listing says so, judged from the file's header and its
    gzip trailer without decompressing it. A whole file of several gzip members (whose last
    4 bytes hold only the last member's length) is still accepted, raw files too."""
    folder = fake_dataset(tmp_path / "d")
    images = folder / "train-images-idx3-ubyte.gz"
    whole = images.read_bytes()
    images.write_bytes(whole[: len(whole) // 2])
    assert main(["datasets", "--data-dir", str(folder)]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("fashion-mnist")]
    assert "UNUSABLE" in line[0] and str(images) in line[0], line
    raw = gzip.decompress(whole)
    images.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    train, _ = load_dataset("fashion-mnist", folder, allow_download=False)
    assert train.images.shape == (20, 1, 28, 28)
    images.unlink()
    (folder / "train-images-idx3-ubyte").write_bytes(raw[:-5])  # raw and cut
    assert main(["datasets", "--data-dir", str(folder)]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("fashion-mnist")]
    assert "UNUSABLE" in line[0] and "truncated" in line[0], line


def test_evaluating_needs_only_the_test_files(tmp_path, capsys):
    """The two t10k files alone are enough to evaluate (a user checking the shipped model need
    not fetch the training set); training still needs all four; a damaged test file there is
    still a one-line error."""
    from capsnet.data.registry import describe_datasets, format_datasets, load_test_split
    from capsnet.models import build_model
    from capsnet.weights import save_weights
    folder = fake_dataset(tmp_path / "d")
    whole = load_dataset("fashion-mnist", folder, allow_download=False)[1]
    for f in folder.glob("train-*"):
        f.unlink()
    test = load_test_split("fashion-mnist", folder, allow_download=False)
    listed = {r["name"]: r for r in describe_datasets(folder)}["fashion-mnist"]
    assert listed["found"] is None and listed["test_only"] == str(folder)
    assert "the test files only" in format_datasets([listed])
    assert torch.equal(test.images, whole.images) and torch.equal(test.labels, whole.labels)
    assert test.classes == whole.classes
    with pytest.raises(CapsnetError, match="not found"):
        load_dataset("fashion-mnist", folder, allow_download=False)
    model = tmp_path / "m.safetensors"
    save_weights(build_model("capsnet", {"conv_channels": 8, "primary_types": 2}), model,
                 {"classes": list(whole.classes), "dataset": "fashion-mnist"})
    capsys.readouterr()
    assert main(["evaluate", str(model), "--data-dir", str(folder), "--json"]) == 0
    assert '"n": 10' in capsys.readouterr().out
    write_idx(folder / "t10k-images-idx3-ubyte.gz", torch.zeros(10, 28, 28), cut=100)
    code = main(["evaluate", str(model), "--data-dir", str(folder)])
    err = capsys.readouterr().err
    assert one_line_error(code, err) and "truncated" in err


def test_missing_data_names_both_ways(tmp_path, capsys, monkeypatch):
    import urllib.request
    calls = []

    def offline(url, timeout=None):  # the network call alone is replaced
        calls.append(url)
        raise OSError("network unreachable (test)")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    empty = tmp_path / "mistyped"
    code = main(["train", "--data-dir", str(empty), "--out", str(tmp_path / "run"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert one_line_error(code, err)
    assert "apt-get install dataset-fashion-mnist" in err and "--data-dir" in err
    assert "download" in err and "network unreachable" in err
    assert calls and all(u.endswith("train-images-idx3-ubyte.gz") for u in calls)
    assert not empty.exists()  # the failed download left no empty folder behind
    assert not (tmp_path / "run").exists()  # nor did the refused run


def test_search_order(tmp_path, monkeypatch):
    env_dir = fake_dataset(tmp_path / "env" / "fashion-mnist")
    monkeypatch.setenv("CAPSNET_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    found = locate("fashion-mnist")
    assert found["train_images"].parent == env_dir  # $CAPSNET_DATA before the Debian folder
    explicit = fake_dataset(tmp_path / "explicit")
    assert locate("fashion-mnist", explicit)["test_labels"].parent == explicit
    with pytest.raises(CapsnetError):  # an explicit --data-dir is the only place looked at
        locate("fashion-mnist", tmp_path / "empty", allow_download=False)


def test_read_idx_roundtrip(tmp_path):
    a = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    assert torch.equal(read_idx(write_idx(tmp_path / "x.gz", a), 3), a)


def test_shift_stays_within_two_pixels():
    torch.manual_seed(0)
    x = torch.zeros(500, 1, 28, 28)
    x[:, :, 14, 14] = 1.0
    y = random_shift(x, 2)
    pos = y[:, 0].flatten(1).argmax(1)
    dy, dx = pos // 28 - 14, pos % 28 - 14
    assert dy.abs().max() == 2 and dx.abs().max() == 2  # all shifts used ...
    assert (y.flatten(1).sum(1) == 1).all()  # ... and the pixel is never lost
    assert len(set(zip(dy.tolist(), dx.tolist()))) == 25  # per image, not per batch


def test_affine_and_flip_per_image():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 28, 28).repeat(8, 1, 1, 1)
    y = augment(x, AugmentConfig(shift=0, rotate=20, scale=0.1, shear=10, translate=0.1))
    assert y.shape == x.shape
    assert len({round(float(v), 4) for v in y.flatten(1).sum(1)}) == 8  # 8 different draws
    assert torch.equal(augment(x, AugmentConfig(shift=0)), x)


def test_test_set_never_augmented(fashion_dir, monkeypatch, tmp_path):
    import lightning as L

    import capsnet.lit
    from capsnet.lit import LitCapsNet

    seen = []

    def recording_augment(x, cfg):
        seen.append(x.shape[0])
        return capsnet.data.augment.augment(x, cfg)

    monkeypatch.setattr(capsnet.lit, "augment", recording_augment)
    dm = ImageDataModule("fashion-mnist", fashion_dir, batch_size=16, eval_batch_size=40,
                         train_size=48, val_size=0, test_size=80)
    module = LitCapsNet(model={"conv_channels": 8, "primary_types": 2})
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    trainer.validate(module, datamodule=dm, verbose=False)
    assert seen == [16, 16, 16]  # the three training batches; no test batch (40 images)


def test_data_parallel_processes_draw_their_own_augmentation():
    """Two processes with the same global RNG state (as DDP seeds them, and as a resume
    restores them) draw different shifts and flips inside process_draws, each the same again
    from the same state, and leave the shared state as each other; one process draws from
    the global generator as if the block were not there."""
    cpu, x = torch.device("cpu"), torch.rand(64, 1, 28, 28)
    cfg = AugmentConfig(shift=2, hflip=True)

    def step(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)  # every process's state at this step
        with process_draws(rank, world, cpu):
            out = augment(x, cfg)
        return out, torch.get_rng_state()

    (a, state_a), (b, state_b) = step(0, 2), step(1, 2)
    assert not torch.equal(a, b)  # the same batch position, different draws
    assert torch.equal(state_a, state_b)  # the processes stay alike
    assert torch.equal(step(1, 2)[0], b)  # reproducible from the same state (exact resume)
    torch.manual_seed(0)
    plain, plain_state = augment(x, cfg), torch.get_rng_state()
    one, one_state = step(0, 1)
    assert torch.equal(one, plain) and torch.equal(one_state, plain_state)


def test_validation_split(fashion_dir):
    """5,000 images by default, class-stratified, disjoint from training, the same whatever
    --train-size or run seed, and carved before --train-size applies."""
    full = ImageDataModule("fashion-mnist", fashion_dir)
    full.setup()
    assert len(full.val) == 5000 and len(full.train) == 55000
    assert full.val.labels.bincount(minlength=10).tolist() == [500] * 10  # stratified
    small = ImageDataModule("fashion-mnist", fashion_dir, train_size=1000)
    small.setup()
    assert torch.equal(small.val.images, full.val.images)  # same split, reproducible
    assert len(small.train) == 1000 and torch.equal(small.train.images, full.train.images[:1000])
    # disjoint and complete: the indices into the 60,000 training images
    assert set(full.val_index.tolist()).isdisjoint(full.train_index.tolist())
    assert len(set(full.val_index.tolist()) | set(full.train_index.tolist())) == 60000
    train, _ = load_dataset("fashion-mnist", fashion_dir)
    assert torch.equal(full.val.images, train.images[full.val_index])


def test_stratified_split_proportions_and_remainder():
    from capsnet.data.datamodule import stratified_split
    labels = torch.tensor([0] * 70 + [1] * 20 + [2] * 10)
    held, rest = stratified_split(labels, 15, seed=5)
    assert labels[held].bincount().tolist() == [11, 3, 1] or \
        labels[held].bincount().tolist() == [10, 3, 2]  # 10.5/3/1.5: remainder to the largest
    assert len(held) == 15 and len(rest) == 85
    assert set(held.tolist()).isdisjoint(rest.tolist())
    assert torch.equal(stratified_split(labels, 15, seed=5)[0], held)
    assert not torch.equal(stratified_split(labels, 15, seed=6)[0], held)


def test_hflip_refused_on_digits(tmp_path, capsys):
    folder = fake_dataset(tmp_path / "mnist")
    code = main(["train", "--dataset", "mnist", "--data-dir", str(folder), "--hflip",
                 "--val-size", "0", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert one_line_error(code, err) and "--hflip" in err and "mnist" in err
    assert not (tmp_path / "run").exists()  # a refused run leaves no folder behind


def test_mirroring_refused_on_the_protocol_sets_for_the_right_reason():
    """The sets generated for the paper's robustness protocols refuse mirrors because the
    protocols have none (a mirrored garment is still a garment: the digits' reason would be
    wrong there)."""
    from capsnet.data.registry import refuse_mirroring
    with pytest.raises(CapsnetError, match="follows the paper's protocol") as e:
        refuse_mirroring("multi-fashion-mnist", "--hflip")
    assert "not of the same class" not in str(e.value)
    with pytest.raises(CapsnetError, match="not of the same class"):
        refuse_mirroring("mnist", "--tta hflip")
    refuse_mirroring("fashion-mnist", "--hflip")  # clothing: allowed


def test_hflip_mirrors_about_half_the_images():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 28, 28).repeat(400, 1, 1, 1)
    y = augment(x, AugmentConfig(shift=0, hflip=True))
    mirrored = (y == x.flip(-1)).flatten(1).all(1)
    kept = (y == x).flatten(1).all(1)
    assert bool((mirrored | kept).all()) and 150 < int(mirrored.sum()) < 250


def test_random_erase_blanks_one_rectangle_in_about_p_of_the_images():
    torch.manual_seed(0)
    x = torch.ones(2000, 1, 28, 28)
    y = random_erase(x, 0.5)
    zeros = (y == 0)[:, 0]  # [B, H, W]
    erased = zeros.flatten(1).any(1)
    assert 900 < int(erased.sum()) < 1100  # each image its own draw, p = 0.5
    share = zeros.flatten(1).float().mean(1)[erased]
    assert share.min() >= 0.01 and share.max() <= 0.45  # 2-40% of the image, after rounding
    assert share.std() > 0.05  # sizes differ from image to image
    for box in zeros[erased][:50]:  # the zeros form one full rectangle
        rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
        assert int(box.sum()) == len(rows) * len(cols)
        assert bool(box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all())
    assert torch.equal(y[~erased], x[~erased])
    assert torch.equal(random_erase(x, 0.0), x)
    assert torch.equal(augment(x[:4], AugmentConfig(shift=0, erase=0.0)), x[:4])
