"""Data-parallel training (DDP through Lightning, gloo on the CPU): the sharding of the data,
and one short real run with two processes on this machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capsnet.metrics import read_metrics
from capsnet.data.batches import ShardedBatches
from capsnet.errors import CapsnetError
from capsnet.runtime import trainer_devices

from conftest import one_line_error


@pytest.mark.parametrize("n,world,batch", [(10, 2, 3), (11, 2, 4), (1000, 3, 64), (7, 2, 7)])
def test_every_image_once_per_epoch_and_equal_steps(n, world, batch):
    for epoch in (0, 1):
        shards = []
        for rank in range(world):
            s = ShardedBatches(n, batch, rank, world, shuffle=True, seed=5)
            s.set_epoch(epoch)
            shards.append(list(s))
        # DDP needs the same number of steps on every process, none of them empty
        assert len({len(b) for b in shards}) == 1
        assert all(len(batch_) > 0 for b in shards for batch_ in b)
        assert max(len(x) for b in shards for x in b) <= batch
        seen = sorted(i for b in shards for x in b for i in x)
        assert seen == list(range(n))  # every image exactly once across the processes


def test_shuffle_differs_per_epoch_and_is_the_same_on_every_process():
    def order(rank, epoch):
        s = ShardedBatches(100, 10, rank, 2, shuffle=True, seed=0)
        s.set_epoch(epoch)
        return [i for b in s for i in b]
    assert order(0, 0) != order(0, 1)
    assert order(0, 3) == order(0, 3)
    # ranks take interleaved places of one permutation: disjoint, together everything
    assert not set(order(0, 2)) & set(order(1, 2))


def test_evaluation_shards_in_order():
    s = [list(ShardedBatches(5, 2, r, 2, shuffle=False)) for r in range(2)]
    assert s == [[[0, 2], [4]], [[1], [3]]]
    # batches of 1 over uneven shares (2, 1, 1, 1 images): as many batches everywhere, none
    # empty, every image once
    s = [list(ShardedBatches(5, 1, r, 4, shuffle=False)) for r in range(4)]
    assert {len(b) for b in s} == {1} and all(batch for b in s for batch in b)
    assert sorted(i for b in s for batch in b for i in batch) == list(range(5))


def test_device_flags_are_checked():
    assert trainer_devices("cpu", 1, 1, "auto") == ("cpu", 1)
    assert trainer_devices("cpu", 2, 1, "ddp") == ("cpu", 2)
    with pytest.raises(CapsnetError, match="--strategy ddp"):
        trainer_devices("cpu", 2, 1, "auto")
    with pytest.raises(CapsnetError):
        trainer_devices("cuda:1" if not torch.cuda.is_available() else "cuda:0", 2, 1, "ddp")


def test_bad_strategy_is_one_line(capsys):
    from capsnet.cli import main
    code = main(["train", "--strategy", "horovod", "--out", "/nonexistent/x"])
    assert one_line_error(code, capsys.readouterr().err)


def test_a_split_smaller_than_the_processes_is_refused(capsys, fashion_dir, tmp_path):
    """Two processes and one validation image: one process would validate on none."""
    from capsnet.cli import main
    code = main(["train", "--devices", "2", "--strategy", "ddp", "--val-size", "1",
                 "--train-size", "64", "--test-size", "64", "--data-dir", str(fashion_dir),
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert one_line_error(code, err) and "val split has 1 image(s), fewer than the 2" in err
    assert not (tmp_path / "r").exists()


def _capsnet(*args, cwd):
    exe = Path(sys.executable).with_name("capsnet")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_two_processes_train_resume_and_agree(tmp_path, fashion_dir):
    """A short real run with ``--devices 2 --strategy ddp`` on the CPU (two processes, gloo):
    the processes end with identical weights (checked by the run itself and printed), files
    are written once, the per-epoch test accuracy covers each test image once (it equals
    ``capsnet evaluate`` of the checkpoint on the same images), a time budget stops both, and
    ``--resume`` continues."""
    out = tmp_path / "ddp"
    flags = ["--devices", "2", "--strategy", "ddp", "--data-dir", str(fashion_dir),
             "--train-size", "128", "--val-size", "32", "--test-size", "51",
             "--batch-size", "16", "--lr", "0.002", "--no-tensorboard", "--no-progress"]
    # Stopped after its first epoch by a time budget (--max-minutes), which both processes
    # must obey (the main one decides) or the run would hang.
    r = _capsnet("train", *flags, "--epochs", "2", "--max-minutes", "1e-6", "--out", str(out),
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("stopped after epoch 1 of 2") == 1
    assert r.stdout.count("weights identical on all 2 processes") == 1
    assert r.stdout.count("parameters") == 1  # printed once, by the main process
    assert "2 processes, global batch 32" in r.stdout
    text = (out / "metrics.csv").read_text()
    assert text.count("epoch,") == 1 and len(read_metrics(out / "metrics.csv")) == 1
    assert {p.name for p in out.iterdir()} >= {"last.ckpt", "best.ckpt", "config.yaml"}

    r = _capsnet("train", "--resume", str(out), "--max-minutes", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_metrics(out / "metrics.csv")
    assert [row["epoch"] for row in rows] == [0, 1]

    r = _capsnet("evaluate", str(out / "last.ckpt"), "--test-size", "51", "--json",
                 "--data-dir", str(fashion_dir), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    assert result["n"] == 51
    # 51 images on 2 processes: 26 + 25, each counted once in the logged accuracy
    assert abs(result["accuracy"] - rows[-1]["test_acc"]) < 1e-6
    assert abs(result["loss"] - rows[-1]["test_loss"]) < 1e-4
