"""Shared fixtures: the real Fashion-MNIST files and one short real training run."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")

# A short real run: 1 epoch on the first 4,096 real training images, tested on 1,000 real
# test images. Shared by every end-to-end test (train, evaluate, predict, resume, report).
TINY_RUN_FLAGS = ["--train-size", "4096", "--test-size", "1000", "--epochs", "1",
                  "--batch-size", "64", "--lr", "0.002", "--seed", "1", "--no-progress",
                  "--log-every", "8"]


@pytest.fixture(scope="session")
def fashion_dir():
    assert (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(), (
        "real Fashion-MNIST missing: `make setup` installs dataset-fashion-mnist")
    return FASHION_DIR


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, fashion_dir):
    """Directory of a finished short real run (last.ckpt, best.ckpt, metrics.csv, ...)."""
    from capsnet.cli import main
    out = tmp_path_factory.mktemp("run") / "tiny"
    assert main(["train", *TINY_RUN_FLAGS, "--data-dir", str(fashion_dir),
                 "--out", str(out)]) == 0
    return out
