"""Distillation (`capsnet train --teacher MODEL`): the loss, the teacher's targets and what
is refused."""

import pytest
import torch

from conftest import one_line_error

STUDENT = ["--train-size", "256", "--val-size", "500", "--test-size", "64", "--epochs", "1",
           "--batch-size", "64", "--lr", "0.002", "--no-progress", "--no-tensorboard",
           "--log-every", "4"]


def test_distillation_loss_by_hand():
    from capsnet.losses import distillation_loss
    lengths = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.2, 0.7]])
    teacher = torch.tensor([[0.8, 0.3, 0.0], [0.2, 0.2, 0.7]])
    # (0.1^2 + 0.2^2, 0): summed over classes, per image
    assert torch.allclose(distillation_loss(lengths, teacher), torch.tensor([0.05, 0.0]))


def test_train_with_teacher(trained_run, fashion_dir, tmp_path, capsys, monkeypatch):
    """The targets are the teacher's mean lengths over its views on exactly the training
    images; the loss adds teacher_weight times the distillation term; a resume (from
    another folder: the teacher's relative path was recorded absolute) reads the targets
    back instead of scoring again."""
    from safetensors import safe_open

    from capsnet.checkpoints import load_model
    from capsnet.cli import main
    from capsnet.data.datamodule import ImageDataModule
    from capsnet.inference import infer
    from capsnet.metrics import read_metrics
    teacher, out = str((trained_run / "best.ckpt").resolve()), tmp_path / "student"
    monkeypatch.chdir(trained_run)
    common = [*STUDENT, "--data-dir", str(fashion_dir), "--teacher", "best.ckpt",
              "--teacher-tta", "hflip", "--teacher-weight", "2"]
    assert main(["train", *common, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"teacher {teacher}: targets for 256 training images (hflip views)" in printed
    with safe_open(str(out / "teacher.safetensors"), framework="pt") as f:
        targets = f.get_tensor("lengths")
    dm = ImageDataModule("fashion-mnist", fashion_dir, train_size=256, val_size=500)
    dm.setup("fit")
    model, _ = load_model(teacher)
    expected = infer(model, dm.train.images, dm.train.labels, tta="hflip").lengths
    assert targets.shape == (256, 10) and torch.allclose(targets, expected, atol=1e-6)
    # The student learns more than the labels say: the targets are not one-hot.
    assert 0.02 < targets.min(dim=1).values.mean() and targets.max(dim=1).values.mean() < 0.95

    row = read_metrics(out / "metrics.csv")[-1]
    recon_weight = 0.0005  # the paper's, this run's
    assert row["train_distill"] > 0
    assert row["train_loss"] == pytest.approx(row["train_margin"] + recon_weight
                                              * row["train_recon"] + 2 * row["train_distill"],
                                              rel=1e-4)

    stamp = (out / "teacher.safetensors").stat().st_mtime_ns
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(out), "--epochs", "2"]) == 0
    assert f"teacher {teacher}: targets read from {out / 'teacher.safetensors'}" in \
        capsys.readouterr().out
    assert (out / "teacher.safetensors").stat().st_mtime_ns == stamp
    assert len(read_metrics(out / "metrics.csv")) == 2

    # The targets were computed from other teacher weights (the file behind --teacher was
    # replaced since): the resume is refused rather than changing the targets mid-run.
    from capsnet.distill import _read_cache, _write_cache
    key, lengths = _read_cache(out / "teacher.safetensors", 256, 10)
    _write_cache(out / "teacher.safetensors", {**key, "teacher_sha256": "0" * 64}, lengths)
    code = main(["train", "--resume", str(out), "--epochs", "3"])
    err = capsys.readouterr().err
    assert one_line_error(code, err) and "computed from other teacher weights" in err, err
    assert len(read_metrics(out / "metrics.csv")) == 2


def test_teacher_refusals(trained_run, fashion_dir, tmp_path, capsys):
    from capsnet.cli import main
    import shutil
    teacher = str(trained_run / "best.ckpt")
    # The same weights as if from a run without a validation split (trained on all images)
    everything = tmp_path / "no-val"
    everything.mkdir()
    shutil.copy(teacher, everything / "best.ckpt")
    (everything / "config.yaml").write_text(
        (trained_run / "config.yaml").read_text().replace("val_size: 500", "val_size: 0"))
    base = [*STUDENT, "--data-dir", str(fashion_dir), "--out", str(tmp_path / "s")]
    for extra, needle in [
            (["--teacher", teacher, "--val-size", "400"],
             "its validation split was 500 images, this run's is 400"),
            (["--teacher", str(everything / "best.ckpt")],
             "its validation split was none (it trained on every training image)"),
            (["--teacher", str(tmp_path / "missing.ckpt")], "missing.ckpt"),
            (["--teacher", teacher, "--teacher-weight", "-1"],
             "'teacher_weight' must not be negative"),
            (["--teacher", teacher, "--teacher-tta", "spin"], "invalid choice: 'spin'")]:
        code = main(["train", *base, *extra])
        err = capsys.readouterr().err
        assert one_line_error(code, err) and needle in err, (extra, err)
        assert not (tmp_path / "s").exists()  # a refused run leaves no folder behind


def test_weight_zero_is_the_run_without_teacher(trained_run, fashion_dir, tmp_path):
    """The teacher is built off the run's random stream: with --teacher-weight 0 a run is
    the run without a teacher, to the last digit (same initial weights, batches and
    augmentation), so a run with a teacher can be paired with one without it."""
    from capsnet.cli import main
    from capsnet.metrics import read_metrics
    common = [*STUDENT, "--data-dir", str(fashion_dir), "--seed", "3"]
    assert main(["train", *common, "--out", str(tmp_path / "plain")]) == 0
    assert main(["train", *common, "--out", str(tmp_path / "zero"), "--teacher",
                 str(trained_run / "best.ckpt"), "--teacher-weight", "0"]) == 0
    plain, zero = (read_metrics(tmp_path / run / "metrics.csv")[0] for run in ("plain", "zero"))
    assert zero["train_distill"] > 0 and "train_distill" not in plain
    for key in ("train_loss", "train_acc", "val_acc", "val_loss", "test_acc"):
        assert zero[key] == plain[key], key


def test_teacher_with_init(trained_run, fashion_dir, tmp_path, capsys):
    """A second stage (`--init STAGE1/best.ckpt`) keeps its teacher: the student starts
    from the given weights and still learns the teacher's targets."""
    from capsnet.cli import main
    from capsnet.metrics import read_metrics
    ckpt = str(trained_run / "best.ckpt")
    assert main(["train", *STUDENT, "--data-dir", str(fashion_dir), "--init", ckpt,
                 "--teacher", ckpt, "--teacher-tta", "none", "--out",
                 str(tmp_path / "s2")]) == 0
    printed = capsys.readouterr().out
    assert f"starting from the weights of {ckpt}" in printed
    assert "targets for 256 training images" in printed
    assert read_metrics(tmp_path / "s2" / "metrics.csv")[0]["train_distill"] > 0
    # A further stage from s2 with the same teacher and views reads s2's targets (and keeps
    # a copy, for its own resume) instead of scoring the images again.
    s2, s3 = tmp_path / "s2", tmp_path / "s3"
    assert main(["train", *STUDENT, "--data-dir", str(fashion_dir), "--init",
                 str(s2 / "last.ckpt"), "--teacher", ckpt, "--teacher-tta", "none",
                 "--out", str(s3)]) == 0
    printed = capsys.readouterr().out
    assert f"targets read from {s2 / 'teacher.safetensors'}" in printed
    assert "targets for" not in printed
    from safetensors.torch import load_file
    assert torch.equal(load_file(s3 / "teacher.safetensors")["lengths"],
                       load_file(s2 / "teacher.safetensors")["lengths"])

    # Several teachers (given more than once): the targets are their mean lengths, the
    # lengths an ensemble scores by; the run records the list, and a resume keeps it.
    from capsnet.checkpoints import load_model
    from capsnet.data.datamodule import ImageDataModule
    from capsnet.inference import infer
    from capsnet.settings import load_run_settings
    s4, second = tmp_path / "s4", str(s2 / "last.ckpt")
    assert main(["train", *STUDENT, "--data-dir", str(fashion_dir), "--teacher", ckpt,
                 "--teacher", second, "--teacher-tta", "none", "--out", str(s4)]) == 0
    assert f"teacher {ckpt} + {second}: targets for 256 training images" in \
        capsys.readouterr().out
    dm = ImageDataModule("fashion-mnist", fashion_dir, train_size=256, val_size=500)
    dm.setup("fit")
    each = [infer(load_model(t)[0], dm.train.images, dm.train.labels).lengths
            for t in (ckpt, second)]
    assert not torch.allclose(each[0], each[1], atol=1e-3)  # two different teachers
    assert torch.allclose(load_file(s4 / "teacher.safetensors")["lengths"],
                          (each[0] + each[1]) / 2, atol=1e-6)
    assert load_run_settings(s4)["teacher"] == [ckpt, second]
    assert main(["train", "--resume", str(s4), "--epochs", "2"]) == 0
    assert "targets read from" in capsys.readouterr().out
    assert len(read_metrics(s4 / "metrics.csv")) == 2


def test_teacher_setting_forms():
    """One teacher is a name, several a list (a config file's list or --teacher given more
    than once); anything else is refused in one line."""
    from capsnet.errors import CapsnetError
    from capsnet.settings import DEFAULTS, check_settings
    assert check_settings({**DEFAULTS, "teacher": ["a"]})["teacher"] == "a"
    assert check_settings({**DEFAULTS, "teacher": ["a", "b"]})["teacher"] == ["a", "b"]
    for key, bad in [("teacher", []), ("teacher", [1, "b"]), ("teacher", 3),
                     ("init", ["a", "b"])]:
        with pytest.raises(CapsnetError, match=f"setting '{key}' must be a path"):
            check_settings({**DEFAULTS, key: bad})
