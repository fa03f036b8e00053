"""End to end on real Fashion-MNIST: train, evaluate, predict, resume, bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from PIL import Image

from capsnet.metrics import read_metrics
from capsnet.checkpoints import load_model
from capsnet.cli import main
from capsnet.data.datasets import load_dataset
from capsnet.models import build_model
from capsnet.weights import save_weights
from conftest import CONFIGS, ROOT, one_line_error


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- the shared short run

def test_short_real_run_learns(trained_run):
    rows = read_metrics(trained_run / "metrics.csv")
    assert [r["epoch"] for r in rows] == [0]
    row = rows[0]
    assert row["test_acc"] > 0.35  # chance is 0.1, on 1,000 real test images
    for key in ("train_loss", "train_margin", "train_recon", "train_acc", "test_loss",
                "test_margin", "test_recon", "lr", "epoch_time_s"):
        assert key in row
    assert (trained_run / "last.ckpt").is_file() and (trained_run / "best.ckpt").is_file()
    assert list((trained_run / "tensorboard").glob("events.out.tfevents.*"))


def test_evaluate_json(trained_run, fashion_dir, capsys):
    code, out, _ = run_cli(capsys, "evaluate", trained_run / "best.ckpt", "--data-dir",
                           fashion_dir, "--test-size", 1000, "--json")
    assert code == 0
    result = json.loads(out)  # exactly one JSON object
    assert result["n"] == 1000
    assert 0.35 < result["accuracy"] <= 1
    assert set(result["per_class"]) == {"T-shirt/top", "Trouser", "Pullover", "Dress",
                                        "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                                        "Ankle boot"}
    conf = torch.tensor(result["confusion"])
    assert conf.shape == (10, 10) and conf.sum() == 1000
    assert conf.trace() / 1000 == pytest.approx(result["accuracy"])
    low, high = result["accuracy_interval"]  # 95% Wilson: about +-3 points at 1,000 images
    assert low < result["accuracy"] < high and 0.04 < high - low < 0.07
    # the checkpoint's recorded test accuracy is the one evaluate recomputes
    best = read_metrics(trained_run / "metrics.csv")[0]["test_acc"]
    assert result["accuracy"] == pytest.approx(best, abs=1e-6)


def test_evaluate_on_the_runs_validation_split_and_with_mirror_images(trained_run, fashion_dir,
                                                                     tmp_path, capsys):
    code, out, _ = run_cli(capsys, "evaluate", trained_run / "best.ckpt", "--data-dir",
                           fashion_dir, "--split", "val", "--json")
    result = json.loads(out)
    assert code == 0 and result["n"] == 500 and result["split"] == "val"
    # the very images training validated on: the same accuracy as metrics.csv's val_acc
    assert result["accuracy"] == pytest.approx(
        read_metrics(trained_run / "metrics.csv")[0]["val_acc"], abs=1e-6)
    # --tta hflip: each image scored by the mean of its and its mirror's capsule lengths
    from capsnet.inference import infer
    model, meta = load_model(trained_run / "best.ckpt", torch.device("cpu"))
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(6)
    plain, mirrored = (infer(model, x, labels).lengths for x in (images, images.flip(-1)))
    both = infer(model, images, labels, tta="hflip")
    assert torch.allclose(both.lengths, (plain + mirrored) / 2, atol=1e-6)
    assert not torch.allclose(plain, mirrored, atol=1e-3)  # the mirror changes something
    # --tta shift: the four one-pixel shifts, zero-filled, content moving as named
    from capsnet.inference import tta_views
    views = list(tta_views(images.float(), "shift+hflip"))
    assert len(views) == 6 and torch.equal(views[1], images.flip(-1).float())
    right, left, down, up = views[2:]
    assert torch.equal(right[..., 1:], images[..., :-1].float()) and (right[..., 0] == 0).all()
    assert torch.equal(left[..., :-1], images[..., 1:].float()) and (left[..., -1] == 0).all()
    assert torch.equal(down[..., 1:, :], images[..., :-1, :].float())
    assert torch.equal(up[..., :-1, :], images[..., 1:, :].float()) and (up[..., -1, :] == 0).all()
    # --tta gridR(+hflip): every shift by up to R pixels along each axis once, the image
    # first, then (with +hflip) the mirror image of each of those views
    for r in (1, 2):
        grid = list(tta_views(images.float(), f"grid{r}"))
        assert len(grid) == (2 * r + 1) ** 2 and torch.equal(grid[0], images.float())
        padded = torch.nn.functional.pad(images.float(), (r,) * 4)
        expected = [padded[..., r - dy:r - dy + 28, r - dx:r - dx + 28]
                    for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
        for e in expected:  # each shift exactly once
            assert sum(torch.equal(e, g) for g in grid) == 1
        mirrored = list(tta_views(images.float(), f"grid{r}+hflip"))
        assert len(mirrored) == 2 * len(grid)
        assert all(torch.equal(m, g.flip(-1)) for m, g in zip(mirrored[len(grid):], grid))
    moved = [infer(model, v.to(torch.uint8), labels).lengths for v in views]
    shifted = infer(model, images, labels, tta="shift+hflip")
    assert torch.allclose(shifted.lengths, torch.stack(moved).mean(0), atol=1e-6)
    code, out, _ = run_cli(capsys, "evaluate", trained_run / "best.ckpt", "--data-dir",
                           fashion_dir, "--test-size", 200, "--tta", "hflip")
    assert code == 0 and "200 test images, each with its mirror image" in out
    # an exported weights file records its run's split: the same images, away from the run
    weights = tmp_path / "w.safetensors"
    assert run_cli(capsys, "export", trained_run / "best.ckpt", weights)[0] == 0
    code, out, _ = run_cli(capsys, "evaluate", weights, "--data-dir", fashion_dir, "--split",
                           "val", "--json")
    assert code == 0 and json.loads(out)["n"] == 500
    assert json.loads(out)["accuracy"] == pytest.approx(result["accuracy"], abs=1e-6)
    # ... which another run's config.yaml beside the file does not change
    (tmp_path / "config.yaml").write_text(
        (trained_run / "config.yaml").read_text().replace("val_size: 500", "val_size: 400"))
    code, out, _ = run_cli(capsys, "evaluate", weights, "--data-dir", fashion_dir, "--split",
                           "val", "--json")
    assert code == 0 and json.loads(out)["n"] == 500
    (tmp_path / "config.yaml").unlink()
    # refusals: digits are not mirrored; a weights file that records no split has no run
    code, _, err = run_cli(capsys, "evaluate", trained_run / "best.ckpt", "--dataset", "mnist",
                           "--tta", "hflip")
    assert one_line_error(code, err) and "--tta hflip" in err
    from capsnet.weights import describe, save_weights
    save_weights(model, tmp_path / "old.safetensors",
                 describe({**meta, "val_size": None}, "written before val_size"))
    code, _, err = run_cli(capsys, "evaluate", tmp_path / "old.safetensors", "--split", "val")
    assert one_line_error(code, err) and "config.yaml" in err


def test_evaluate_an_ensemble_on_the_runs_validation_split(trained_run, fashion_dir, tmp_path,
                                                           capsys):
    import shutil
    from capsnet.evaluate import evaluation_data
    from capsnet.inference import infer
    from capsnet.weights import describe, save_weights
    run = tmp_path / "run"  # a copy of the run with a second, different member beside it
    shutil.copytree(trained_run, run)
    model, meta = load_model(run / "best.ckpt")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * p.std().nan_to_num() * 0.3)
    save_weights(model, run / "other.safetensors", describe(meta, "a perturbed copy"))
    code, out, _ = run_cli(capsys, "evaluate", run / "best.ckpt", run / "other.safetensors",
                           "--data-dir", fashion_dir, "--split", "val", "--json")
    result = json.loads(out)
    assert code == 0 and result["n"] == 500 and result["model"] == "ensemble"
    # each image scored by the mean of the two members' capsule lengths
    best, _ = load_model(run / "best.ckpt")
    val = evaluation_data(run / "best.ckpt", best, meta, "val", data_dir=str(fashion_dir))
    lengths = [infer(m, val.images, val.labels).lengths for m in (best, model)]
    alone = [float((x.argmax(1) == val.labels).float().mean()) for x in lengths]
    mean = ((lengths[0] + lengths[1]) / 2).argmax(1)
    assert result["accuracy"] == pytest.approx(float((mean == val.labels).float().mean()))
    assert result["member_accuracy"] == pytest.approx(alone)
    assert alone[0] != alone[1]  # two different members
    # the second member against the first, image by image
    right = [x.argmax(1) == val.labels for x in lengths]
    (vs,) = result["member_against_first"]
    assert (vs["gained"], vs["lost"]) == (int((right[1] & ~right[0]).sum()),
                                          int((right[0] & ~right[1]).sum()))
    assert vs["gained"] - vs["lost"] == round((alone[1] - alone[0]) * 500)
    # --predictions: every image's scores, and the same comparison from two such files
    from capsnet.evaluate import read_correct
    from capsnet.inference import paired_comparison
    files = [tmp_path / "preds" / f"{name}.csv" for name in ("best", "other", "ensemble")]
    for members, csv_file in ([[run / "best.ckpt"], files[0]],
                              [[run / "other.safetensors"], files[1]],
                              [[run / "best.ckpt", run / "other.safetensors"], files[2]]):
        code, out, _ = run_cli(capsys, "evaluate", *members, "--data-dir", fashion_dir,
                               "--split", "val", "--json", "--predictions", csv_file)
        assert code == 0 and json.loads(out)["predictions"] == str(csv_file)
    rows = [line.split(",") for line in files[2].read_text().splitlines()]
    assert rows[0] == ["index", "label", "predicted", "correct", *meta["classes"]]
    scores = torch.tensor([[float(v) for v in r[4:]] for r in rows[1:]])
    assert torch.allclose(scores, (lengths[0] + lengths[1]) / 2, atol=1e-6)
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(500)]
    assert [r[1] for r in rows[1:]] == [meta["classes"][t] for t in val.labels]
    assert [r[2] for r in rows[1:]] == [meta["classes"][p] for p in mean]
    assert torch.equal(read_correct(files[2]), mean == val.labels)
    assert paired_comparison(read_correct(files[1]), read_correct(files[0])) == vs
    code, _, err = run_cli(capsys, "evaluate", run / "best.ckpt", "--data-dir", fashion_dir,
                           "--test-size", 10, "--predictions", tmp_path)
    assert one_line_error(code, err) and "a folder" in err
    code, out, _ = run_cli(capsys, "evaluate", run / "best.ckpt", run / "other.safetensors",
                           "--data-dir", fashion_dir, "--test-size", 100)
    assert code == 0 and out.startswith("ensemble of 2 models: accuracy") and "alone" in out
    assert "against the first, right on" in out and "exact McNemar p = " in out
    # a member whose run carved another validation split is refused (a checkpoint: its
    # run's config.yaml says; a weights file: its own record)
    other_run = tmp_path / "other_run"
    other_run.mkdir()
    shutil.copy(run / "best.ckpt", other_run / "other.ckpt")
    (other_run / "config.yaml").write_text(
        (run / "config.yaml").read_text().replace("val_size: 500", "val_size: 400"))
    code, _, err = run_cli(capsys, "evaluate", run / "best.ckpt", other_run / "other.ckpt",
                           "--data-dir", fashion_dir, "--split", "val")
    assert one_line_error(code, err) and "other.ckpt" in err and "val images" in err
    save_weights(model, other_run / "other.safetensors",
                 describe({**meta, "val_size": 400}, "a run with 400 validation images"))
    code, _, err = run_cli(capsys, "evaluate", run / "best.ckpt",
                           other_run / "other.safetensors", "--data-dir", fashion_dir,
                           "--split", "val")
    assert one_line_error(code, err) and "other.safetensors" in err and "val images" in err
    # and so is a member with other classes (a digit model beside a clothing one)
    save_weights(model, run / "digits.safetensors",
                 describe({**meta, "classes": list("0123456789")}, "digits"))
    code, _, err = run_cli(capsys, "evaluate", run / "best.ckpt", run / "digits.safetensors",
                           "--data-dir", fashion_dir, "--test-size", 10)
    assert one_line_error(code, err) and "digits.safetensors" in err and "classes" in err


def test_evaluate_table(trained_run, fashion_dir, capsys):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        code, out, _ = run_cli(capsys, "evaluate", trained_run / "last.ckpt", "--data-dir",
                               fashion_dir, "--test-size", 200, "--threads", 1)
        assert torch.get_num_threads() == 1  # --threads took effect
    finally:
        torch.set_num_threads(before)
    assert code == 0 and "accuracy" in out and "Ankle boot" in out
    acc, low, high = map(float, re.search(r"accuracy ([\d.]+) \(95% interval ([\d.]+)-([\d.]+)\) "
                                          r"on 200 test images", out).groups())
    assert low < acc < high


def test_evaluate_with_other_routing_iterations(trained_run, fashion_dir, tmp_path, capsys):
    def result(*extra):
        code, out, err = run_cli(capsys, "evaluate", trained_run / "last.ckpt", "--data-dir",
                                 fashion_dir, "--test-size", 200, "--json", *extra)
        assert code == 0, err
        return json.loads(out)
    trained = result()  # the run's own r = 3
    same, one = result("--routing-iterations", 3), result("--routing-iterations", 1)
    assert same["routing_iterations"] == 3 and "routing_iterations" not in trained
    assert same["loss"] == pytest.approx(trained["loss"], abs=1e-6)
    assert abs(one["loss"] - trained["loss"]) > 1e-4  # uniform coupling: other lengths
    code, out, _ = run_cli(capsys, "evaluate", trained_run / "last.ckpt", "--data-dir",
                           fashion_dir, "--test-size", 200, "--routing-iterations", 5)
    assert code == 0 and "on 200 test images, 5 routing iterations, loss" in out
    meta = {"classes": [f"c{i}" for i in range(10)], "dataset": "fashion-mnist"}
    efficient = save_weights(build_model("efficient-capsnet"), tmp_path / "e.safetensors", meta)
    for args, needle in [([trained_run / "last.ckpt", "--routing-iterations", 0],
                          "--routing-iterations must be positive, got 0"),
                         ([efficient, "--routing-iterations", 2],
                          "applies to the paper's CapsNet (dynamic routing), not to "
                          "efficient-capsnet")]:
        code, _, err = run_cli(capsys, "evaluate", *args, "--data-dir", fashion_dir)
        assert one_line_error(code, err) and needle in err, err


def test_predict_png_and_jpeg(trained_run, fashion_dir, tmp_path, capsys):
    _, test = load_dataset("fashion-mnist", fashion_dir)
    model, _ = load_model(trained_run / "last.ckpt")
    files = []
    for i in range(6):
        img = Image.fromarray(test.images[i, 0].numpy())
        path = tmp_path / (f"img{i}.png" if i % 2 else f"img{i}.jpg")
        img.save(path, quality=100) if path.suffix == ".jpg" else img.save(path)
        files.append(path)
    code, out, _ = run_cli(capsys, "predict", trained_run / "last.ckpt", *files, "--json")
    assert code == 0
    results = [json.loads(line) for line in out.strip().splitlines()]
    assert len(results) == 6
    with torch.inference_mode():
        expected = model(test.images[:6].float() / 255).lengths
    for i, r in enumerate(results):
        assert r["file"] == str(files[i]) and len(r["lengths"]) == 10
        assert r["class"] in model_classes(trained_run)
        if files[i].suffix == ".png":  # lossless: exactly the test image
            assert r["index"] == int(expected[i].argmax())
            assert r["lengths"] == pytest.approx(expected[i].tolist(), abs=1e-5)
    code, out, _ = run_cli(capsys, "predict", trained_run / "last.ckpt", files[1])
    assert code == 0 and "capsule lengths" in out


def model_classes(run):
    return load_model(run / "last.ckpt")[1]["classes"]


def test_predict_bad_image(trained_run, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    code, _, err = run_cli(capsys, "predict", trained_run / "last.ckpt", bad)
    assert one_line_error(code, err) and "bad.png" in err


# ---------------------------------------------------------------- resume and interruption

SMALL = ["--train-size", "128", "--val-size", "64", "--test-size", "64", "--batch-size", "32",
         "--seed", "3", "--no-progress", "--no-tensorboard", "--routing-iterations", "1"]


class _StopAfterOneEpoch(L.Callback):
    """Ends a run after its first epoch, as a session's end does (then `--resume`)."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


def test_budget_left_counts_the_runs_clock():
    from capsnet.callbacks import budget_left
    rows = [{"epoch": 0, "epoch_time_s": 60.0}, {"epoch": 1, "epoch_time_s": 120.0}]
    assert budget_left(rows, 5.0) == (True, 3.0, 2.0)  # 3 used + 2 expected = 5: fits
    assert budget_left(rows, 4.9)[0] is False
    assert budget_left([], 0.001) == (True, 0.0, 0.0)


def test_a_time_budget_stops_after_an_epoch_and_resume_extends_it(fashion_dir, tmp_path,
                                                                     capsys):
    """--max-minutes: the first epoch always runs; then a budget the next epoch cannot fit
    ends the run with its checkpoints; --resume within the spent budget is a one-line error,
    and with a larger one (recorded in config.yaml) continues to --epochs."""
    out = tmp_path / "budget"
    flags = [*SMALL, "--val-size", "0", "--data-dir", str(fashion_dir), "--epochs", "3"]
    code, printed, _ = run_cli(capsys, "train", *flags, "--max-minutes", "1e-6",
                               "--out", out)
    assert code == 0 and "stopped after epoch 1 of 3" in printed
    assert [r["epoch"] for r in read_metrics(out / "metrics.csv")] == [0]
    assert torch.load(out / "last.ckpt", weights_only=True)["epoch"] == 0
    code, _, err = run_cli(capsys, "train", "--resume", out)
    assert one_line_error(code, err) and "--max-minutes 1e-06 are used" in err, err
    code, printed, _ = run_cli(capsys, "train", "--resume", out, "--max-minutes", "1000")
    assert code == 0 and "stopped" not in printed
    assert [r["epoch"] for r in read_metrics(out / "metrics.csv")] == [0, 1, 2]
    assert "max_minutes: 1000" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("val_size", ["64", "0"])
def test_resume_continues_exactly(fashion_dir, tmp_path, capsys, monkeypatch, val_size):
    """Two epochs straight on, and one, then a resume, end with the same weights and
    figures. With a validation split: the shipped recipe (cosine with warm-up, EMA, flips,
    shifts) with weight decay and SAM, stopped after epoch 1 (its cosine keeps --epochs);
    without: the paper's exponential decay, extended by ``--epochs`` on the resume. With a
    validation split, last.ckpt must be the last epoch even when the validation accuracy
    did not improve (Lightning's save_last alone does not do that)."""
    import capsnet.train
    recipe = ["--config", str(ROOT / "configs" / "fashion-mnist.yaml"), "--warmup-steps", "3",
              "--weight-decay", "0.05", "--sam", "0.05"] if val_size != "0" else []
    flags = [*recipe, *SMALL, "--val-size", val_size, "--data-dir", str(fashion_dir)]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", *flags, "--epochs", "2", "--out", str(straight)]) == 0
    if recipe:
        extra = capsnet.train._extra_callbacks
        monkeypatch.setattr(capsnet.train, "_extra_callbacks",
                            lambda s, dm: [*extra(s, dm), _StopAfterOneEpoch()])
        assert main(["train", *flags, "--epochs", "2", "--out", str(resumed)]) == 0
        monkeypatch.setattr(capsnet.train, "_extra_callbacks", extra)
        assert len(read_metrics(resumed / "metrics.csv")) == 1
        more = []
    else:
        assert main(["train", *flags, "--epochs", "1", "--out", str(resumed)]) == 0
        more = ["--epochs", "2"]
    capsys.readouterr()
    assert main(["train", "--resume", str(resumed), *more]) == 0
    a, b = read_metrics(straight / "metrics.csv"), read_metrics(resumed / "metrics.csv")
    assert [r["epoch"] for r in b] == [0, 1]  # counted from 0 in the file, from 1 when told:
    out = capsys.readouterr().out
    if val_size == "0":
        assert f"after epoch 2: test accuracy {b[1]['test_acc']:.4f}" in out
        assert "best.ckpt" not in out
    else:  # validation, never the test set, at the end; the epoch kept as best.ckpt
        assert f"after epoch 2: val accuracy {b[1]['val_acc']:.4f}" in out
        assert not re.search(r"test accuracy \d", out)
        best = torch.load(resumed / "best.ckpt", weights_only=True)["epoch"]
        assert f"best.ckpt: epoch {best + 1}, val accuracy {b[best]['val_acc']:.4f}" in out
    # epoch 0: two separate runs with the same seed; epoch 1: straight on vs resumed
    assert torch.load(straight / "last.ckpt", weights_only=True)["epoch"] == 1
    for epoch in (0, 1):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
            assert a[epoch][key] == pytest.approx(b[epoch][key], rel=1e-5, abs=1e-7), key
    sa = torch.load(straight / "last.ckpt", weights_only=True)["state_dict"]
    sb = torch.load(resumed / "last.ckpt", weights_only=True)["state_dict"]
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-6), k
    capsys.readouterr()
    # a new run refuses to overwrite an existing one
    code = main(["train", *SMALL, "--data-dir", str(fashion_dir), "--out", str(resumed)])
    assert one_line_error(code, capsys.readouterr().err)


def test_a_resume_keeps_best_ckpt_even_from_a_moved_folder(fashion_dir, tmp_path):
    """The first epoch after a resume replaces best.ckpt only if it scores higher. With a
    learning rate of 1e-12 both epochs score the same, and a tie keeps the first: an epoch
    after a resume that forgot the best score so far (last.ckpt written before best.ckpt's
    score was known; a moved folder, whose old paths Lightning refuses) would replace it."""
    first, moved = tmp_path / "first", tmp_path / "moved"
    flags = [*SMALL, "--data-dir", str(fashion_dir), "--lr", "1e-12",
             "--lr-schedule", "constant"]
    assert main(["train", *flags, "--epochs", "1", "--out", str(first)]) == 0
    (row,) = read_metrics(first / "metrics.csv")
    states = torch.load(first / "last.ckpt", weights_only=True)["callbacks"]
    (best_state,) = [v for k, v in states.items() if "val/acc" in k]
    assert float(best_state["best_model_score"]) == pytest.approx(row["val_acc"])
    first.rename(moved)
    assert main(["train", "--resume", str(moved), "--epochs", "2"]) == 0
    rows = read_metrics(moved / "metrics.csv")
    assert rows[1]["val_acc"] == rows[0]["val_acc"]  # the tie this test is about
    assert torch.load(moved / "best.ckpt", weights_only=True)["epoch"] == 0


def test_killed_run_leaves_loadable_checkpoint(fashion_dir, tmp_path, capsys):
    """A run killed with SIGKILL can be resumed exactly where its last.ckpt left it; while it
    was still running, a second `capsnet train --resume` into its folder was refused."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "capsnet.cli", "train", *SMALL, "--data-dir",
           str(fashion_dir), "--epochs", "50", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "last.ckpt").exists() and time.time() < deadline:
            time.sleep(0.05)
        code, _, err = run_cli(capsys, "train", "--resume", out)
        assert proc.poll() is None  # (50 epochs: still running)
        assert one_line_error(code, err) and "another capsnet train is writing" in err, err
        code, _, err = run_cli(capsys, "train", *SMALL, "--data-dir", fashion_dir, "--out", out)
        assert one_line_error(code, err) and "another capsnet train is writing" in err, err
        time.sleep(1.3)  # somewhere in a later epoch, maybe mid-save
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    ckpt = torch.load(out / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] >= 0 and "state_dict" in ckpt
    done = read_metrics(out / "metrics.csv")
    assert main(["train", "--resume", str(out), "--epochs", str(ckpt["epoch"] + 2)]) == 0
    rows = read_metrics(out / "metrics.csv")
    epochs = [r["epoch"] for r in rows]
    assert epochs == list(range(ckpt["epoch"] + 2)), (epochs, len(done))
    assert not list(out.glob("*.tmp"))  # a half-written checkpoint from the kill is cleared


# ---------------------------------------------------------------- bad input

class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/capsnet-pwned",))


def test_checkpoint_never_executes_code(tmp_path, capsys):
    if os.path.exists("/tmp/capsnet-pwned"):
        os.unlink("/tmp/capsnet-pwned")
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model": {}}, "x": _Evil()}, evil)
    for cmd in (["evaluate", evil], ["predict", evil, evil]):
        code, _, err = run_cli(capsys, *cmd)
        assert one_line_error(code, err) and "evil.ckpt" in err
        assert "refused to load" in err and "system" in err  # names what was refused
    assert not os.path.exists("/tmp/capsnet-pwned")


@pytest.mark.parametrize("content,needle", [
    (b"", "not a readable checkpoint"),
    (b"garbage" * 10, "not a readable checkpoint"),
    ("truncated", "not a readable checkpoint"),
    (None, "not a capsnet checkpoint"),
])
def test_unreadable_or_foreign_checkpoint(tmp_path, capsys, content, needle):
    path = tmp_path / "x.ckpt"
    if content is None:
        torch.save({"weights": torch.zeros(3)}, path)  # a foreign but valid torch file
    elif content == "truncated":
        torch.save({"weights": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:2000])
    else:
        path.write_bytes(content)
    code, _, err = run_cli(capsys, "evaluate", path)
    assert one_line_error(code, err) and "x.ckpt" in err and needle in err


def test_a_reader_that_leaves_early_is_no_traceback():
    """`capsnet datasets | head -1`: the pipe closes before capsnet has written."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from capsnet.cli import main; "
                             "sys.exit(main(['datasets']))"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1 and err == ""


@pytest.mark.parametrize("args,needle", [
    (["train", "--epochs", "0"], "epochs"),
    (["train", "--batch-size", "abc"], "batch-size"),
    (["train", "--routing-iterations", "-1"], "routing_iterations"),
    (["train", "--erase", "1.5"], "erase"),
    (["train", "--erase", "-0.1"], "erase"),
    (["train", "--weight-decay", "-0.1"], "weight_decay"),
    (["train", "--sam", "-0.05"], "sam"),
    (["train", "--device", "cuda:7"], "cuda"),
    (["train", "--device", "tpu"], "device"),
    (["train", "--no-such-flag"], "no-such-flag"),
    (["train", "--dataset", "cifar"], "cifar"),
    (["train", "--resume", "/nonexistent/run"], "nonexistent"),
    (["evaluate"], "MODEL"),
    (["bench", "--device", "tpu"], "device"),
    (["evaluate", "fashion-mnist", "--device", "gpu"], "device"),
    (["train", "--seed", "-1"], "seed"),
    (["train", "--seed", "4294967296"], "seed"),
    (["evaluate", ""], "empty model name"),
    (["predict", "-m", "", "x.png"], "empty model name"),
    (["datasets", "--data-dir", "/etc/hostname"], "a file, not a folder"),
])
def test_bad_flags_one_line(capsys, tmp_path, args, needle):
    if not any(a in args for a in ("--resume",)):
        args = args + ["--out", str(tmp_path / "r")] if args[0] == "train" else args
    if args[:2] == ["train", "--device"] and "cuda" in args[2] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, _, err = run_cli(capsys, *args)
    assert one_line_error(code, err), err
    assert needle in err


def test_config_file_and_flag_override(tmp_path, fashion_dir, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 1\ntrain-size: 128\ntest_size: 64\nval_size: 64\nbatch_size: 64\n"
                   "routing_iterations: 1\nprogress: false\ntensorboard: false\nlr: 0.01\n")
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "train", "--config", cfg, "--lr", "0.002", "--data-dir",
                              fashion_dir, "--out", out)
    assert code == 0
    assert "8,215,568 parameters" in stdout  # the paper model, printed at train start
    import yaml
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == 0.002 and saved["train_size"] == 128 and saved["epochs"] == 1
    assert saved["val_size"] == 64
    bad = tmp_path / "bad.yaml"
    bad.write_text("epocs: 3\n")
    code, _, err = run_cli(capsys, "train", "--config", bad, "--out", tmp_path / "r2")
    assert one_line_error(code, err) and "epocs" in err


def test_a_users_config_yaml_in_out_is_never_overwritten(tmp_path, fashion_dir, capsys):
    out = tmp_path / "exp"
    out.mkdir()
    mine = "# my notes on this experiment\nepochs: 1\ntrain_size: 64\ntest_size: 64\n"
    (out / "config.yaml").write_text(mine)
    code, _, err = run_cli(capsys, "train", "--config", out / "config.yaml", "--out", out,
                           "--data-dir", fashion_dir, "--no-progress", "--no-tensorboard")
    assert one_line_error(code, err) and "config.yaml" in err and "--out" in err
    assert (out / "config.yaml").read_text() == mine
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]
    # nor a file with the name of one a run writes, in a folder that holds no run
    own = tmp_path / "own"
    own.mkdir()
    (own / "metrics.csv").write_text("my table\n")
    code, _, err = run_cli(capsys, "train", "--train-size", 64, "--val-size", 0, "--out", own,
                           "--data-dir", fashion_dir, "--no-progress", "--no-tensorboard")
    assert one_line_error(code, err) and "metrics.csv is not from a capsnet run" in err
    assert sorted(p.name for p in own.iterdir()) == ["metrics.csv"]
    assert (own / "metrics.csv").read_text() == "my table\n"


def test_help_and_predict_load_neither_lightning_nor_tensorboard(tmp_path):
    """Fast start: `capsnet --help`, and a model or run that does not exist given to evaluate,
    export, predict or report, import no torch at all; `predict` on one image loads the model
    without Lightning, TensorBoard or torchmetrics (checked in a fresh interpreter)."""
    from PIL import Image

    save_weights(build_model("capsnet", {"conv_channels": 8, "primary_types": 2}),
                 tmp_path / "m.safetensors", {"classes": [str(i) for i in range(10)]})
    Image.new("L", (40, 30), 200).save(tmp_path / "x.png")
    heavy = ("lightning", "tensorboard", "torchmetrics")
    code = f"""
import contextlib, io, sys
from capsnet.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main(["--help"])
    except SystemExit:
        pass
assert "torch" not in sys.modules, "--help imported torch"
missing = {str(tmp_path / 'no-such.ckpt')!r}
with contextlib.redirect_stderr(io.StringIO()) as err:
    for argv in (["evaluate", missing], ["evaluate", "fashion-mnist", missing],
                 ["export", missing, "m.onnx"], ["predict", "--model", missing, "x.png"],
                 ["report", missing]):
        assert main(argv) == 2, argv
assert err.getvalue().count("no-such.ckpt: no such") == 5, err.getvalue()
assert "torch" not in sys.modules, "a missing model was reported only after importing torch"
assert main(["predict", "--model", {str(tmp_path / 'm.safetensors')!r},
             {str(tmp_path / 'x.png')!r}]) == 0
with contextlib.redirect_stderr(io.StringIO()):
    assert main(["report", {str(tmp_path / 'no-run')!r}]) == 2
loaded = [m for m in {heavy!r} if m in sys.modules]
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_no_channels_last_is_honoured():
    from capsnet.lit import LitCapsNet
    small = {"conv_channels": 8, "primary_types": 2}
    on = LitCapsNet(model=small, channels_last=True).model.primary.conv.weight
    off = LitCapsNet(model=small, channels_last=False).model.primary.conv.weight
    assert on.is_contiguous(memory_format=torch.channels_last) and not on.is_contiguous()
    assert off.is_contiguous()


def test_evaluate_uses_the_runs_reconstruction_weight(fashion_dir, tmp_path, capsys,
                                                      monkeypatch):
    out = tmp_path / "rw"
    monkeypatch.chdir(fashion_dir.parent)  # a relative --data-dir is recorded absolute
    assert main(["train", *SMALL, "--data-dir", fashion_dir.name, "--epochs", "1",
                 "--recon-weight", "0.01", "--no-tensorboard", "--out", str(out)]) == 0
    from capsnet.settings import load_run_settings
    assert load_run_settings(out)["data_dir"] == str(fashion_dir.resolve())
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["evaluate", str(out / "last.ckpt"), "--json", "--test-size", "200"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["loss"] == pytest.approx(r["margin_loss"] + 0.01 * r["reconstruction_sse"])


def test_a_recorded_reconstruction_weight_of_0_stays_0(fashion_dir, tmp_path, capsys):
    """A model trained without the decoder's loss (``--recon-weight 0``) is evaluated and
    reported with 0, not with the paper's 0.0005."""
    from capsnet.data.registry import FASHION_CLASSES
    model = build_model("capsnet", {"conv_channels": 8, "primary_types": 2})
    save_weights(model, path := tmp_path / "m.safetensors",
                 {"classes": list(FASHION_CLASSES), "dataset": "fashion-mnist",
                  "recon_weight": 0.0})
    assert main(["evaluate", str(path), "--json", "--test-size", "50",
                 "--data-dir", str(fashion_dir)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["reconstruction_sse"] > 0 and r["loss"] == pytest.approx(r["margin_loss"])
    assert main(["report", str(path), "--test-size", "50", "--data-dir", str(fashion_dir),
                 "--out", str(tmp_path / "page")]) == 0
    page = (tmp_path / "page" / "index.html").read_text()
    assert f"{r['loss']:.4f}" in page


def test_an_unwritable_output_is_a_one_line_error(fashion_dir, tmp_path, capsys):
    """The report's folder inside a file: one line naming the path, no traceback."""
    from capsnet.data.registry import FASHION_CLASSES
    save_weights(build_model("capsnet", {"conv_channels": 8, "primary_types": 2}),
                 path := tmp_path / "m.safetensors",
                 {"classes": list(FASHION_CLASSES), "dataset": "fashion-mnist"})
    (tmp_path / "file").write_text("a user's file")
    code, _, err = run_cli(capsys, "report", path, "--test-size", "20", "--data-dir",
                           fashion_dir, "--out", tmp_path / "file" / "page")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(tmp_path / "file") in err
    assert (tmp_path / "file").read_text() == "a user's file"


def test_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    """A write that fails names no file; atomic_write names the one it was writing, and
    main() prints one line either way (exit code 1), leaving no temporary file."""
    from capsnet import cli
    from capsnet.checkpoints import atomic_write

    def full(f):
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError) as e:
        atomic_write(tmp_path / "metrics.csv", full)
    assert e.value.errno == 28 and e.value.filename == str(tmp_path / "metrics.csv")
    assert not list(tmp_path.iterdir())
    monkeypatch.setitem(cli.COMMANDS, "datasets", lambda a: full(None))
    code, _, err = run_cli(capsys, "datasets")
    assert code == 1 and err == "capsnet: error: No space left on device\n"
    monkeypatch.setitem(cli.COMMANDS, "datasets",
                        lambda a: atomic_write(tmp_path / "x.yaml", full))
    code, _, err = run_cli(capsys, "datasets")
    assert code == 1 and err.startswith(f"capsnet: error: {tmp_path / 'x.yaml'}: No space")


def test_metrics_csv_is_replaced_whole_on_resume(tmp_path, monkeypatch):
    """On resume the rows of epochs to be repeated are dropped through a temporary file: a
    run killed meanwhile keeps the rows of its earlier epochs."""
    import csv
    from types import SimpleNamespace

    from capsnet.callbacks import EpochMetricsCSV
    from capsnet.metrics import COLUMNS
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows({"epoch": e, "test_acc": 0.5 + e / 10} for e in range(3))
    trainer = SimpleNamespace(global_rank=0, current_epoch=2)
    monkeypatch.setattr(csv.DictWriter, "writerows",
                        lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        EpochMetricsCSV(path).on_train_start(trainer, None)
    assert [r["epoch"] for r in read_metrics(path)] == [0, 1, 2]
    monkeypatch.undo()
    EpochMetricsCSV(path).on_train_start(trainer, None)
    assert [r["test_acc"] for r in read_metrics(path)] == pytest.approx([0.5, 0.6])
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_bf16_mixed_precision_trains_and_16_mixed_needs_a_gpu(fashion_dir, tmp_path, capsys):
    out = tmp_path / "bf16"
    # Two steps of 8 images: a CPU without bf16 instructions runs bf16 convolutions on
    # PyTorch's slow reference path (about 15 times fp32's time on an AMD EPYC).
    assert main(["train", *SMALL, "--train-size", "16", "--val-size", "0", "--test-size", "16",
                 "--batch-size", "8", "--data-dir", str(fashion_dir), "--epochs", "1",
                 "--precision", "bf16-mixed", "--no-tensorboard", "--out", str(out)]) == 0
    (row,) = read_metrics(out / "metrics.csv")
    assert all(torch.isfinite(torch.tensor(v)) for v in row.values())
    model, _ = load_model(out / "last.ckpt")
    assert model.digits.weight.dtype == torch.float32  # weights stay fp32
    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, "train", "--precision", "16-mixed", "--device", "cpu",
                               "--out", tmp_path / "x", "--data-dir", fashion_dir)
        assert one_line_error(code, err) and "16-mixed" in err


def test_resume_with_a_validation_split(fashion_dir, tmp_path):
    out = tmp_path / "v"
    assert main(["train", *SMALL, "--data-dir", str(fashion_dir), "--epochs", "1",
                 "--out", str(out)]) == 0
    assert main(["train", "--resume", str(out), "--epochs", "2"]) == 0
    rows = read_metrics(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == [0, 1] and all("val_acc" in r for r in rows)
    assert (out / "best.ckpt").is_file()


def test_init_starts_from_trained_weights_and_swa_averages_every_step(
        trained_run, fashion_dir, tmp_path, capsys):
    out = tmp_path / "swa"
    # A learning rate of 1e-12 leaves the weights where --init put them (weight decay
    # included; and SAM's moves, 0.05 along the gradient, undone), so the average must equal
    # the starting model; random weights would be far from it.
    code, stdout, _ = run_cli(capsys, "train", "--init", trained_run / "best.ckpt", "--swa",
                              "--lr-schedule", "constant", "--lr", "1e-12",
                              "--weight-decay", "0.05", "--sam", "0.05",
                              "--train-size", "192", "--val-size", "0", "--test-size", "64",
                              "--batch-size", "64", "--epochs", "1", "--no-progress",
                              "--no-tensorboard", "--data-dir", fashion_dir, "--out", out)
    assert code == 0 and "starting from the weights of" in stdout
    start, _ = load_model(trained_run / "best.ckpt")
    averaged, _ = load_model(out / "last.ckpt")
    for (name, a), b in zip(start.state_dict().items(), averaged.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
    ckpt = torch.load(out / "last.ckpt", weights_only=True)
    assert int(ckpt["state_dict"]["ema.n_averaged"]) == 3  # one update per step: 192 / 64
    # --weight-decay reached the optimizer: kernels decayed, biases not
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert ckpt["hyper_parameters"]["sam"] == 0.05
    # Refusals: another architecture, both averages at once, a missing file.
    for args, needle in [(["--arch", "efficient-capsnet"], "holds a capsnet"),
                         (["--swa", "--ema", "0.99"], "exclude each other"),
                         (["--init", tmp_path / "nothing.ckpt"], "nothing.ckpt")]:
        init = [] if "--init" in args else ["--init", trained_run / "best.ckpt"]
        code, _, err = run_cli(capsys, "train", *init, *args, "--train-size", "64",
                               "--test-size", "64", "--val-size", "0", "--epochs", "1",
                               "--data-dir", fashion_dir, "--out", tmp_path / "r")
        assert one_line_error(code, err) and needle in str(err), err


@pytest.mark.parametrize("average", [[], ["--ema", "0.9"], ["--swa"]],
                         ids=["plain", "ema", "swa"])
def test_save_every_steps_keeps_weights_files_that_evaluate_on_the_runs_split(
        fashion_dir, tmp_path, capsys, average):
    """The step-N file holds the evaluated weights after N steps: with an average, the
    average after N updates (the last one equals last.ckpt's)."""
    out = tmp_path / "steps"
    assert main(["train", *SMALL, "--data-dir", str(fashion_dir), "--epochs", "1",
                 "--save-every-steps", "2", *average, "--out", str(out)]) == 0  # 4 steps
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000002.safetensors",
                                                          "step-000004.safetensors"]
    final, _ = load_model(out / "step-000004.safetensors")
    last, _ = load_model(out / "last.ckpt")
    for (name, a), b in zip(last.state_dict().items(), final.state_dict().values()):
        assert torch.equal(a, b), name
    earlier, meta = load_model(out / "step-000002.safetensors")
    assert not torch.equal(earlier.digits.weight, final.digits.weight)
    assert meta["val_size"] == 64  # recorded in the file, not only beside it
    capsys.readouterr()
    assert main(["evaluate", str(out / "step-000002.safetensors"), "--split", "val",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 64


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_files_are_valid_and_choose_on_validation(path):
    """Every recipe in configs/ reads and passes the settings check, keeps a validation split
    (best.ckpt follows it), and mirrors images except in the paper's own recipe."""
    from capsnet.settings import DEFAULTS, check_settings, read_config
    s = check_settings({**DEFAULTS, **read_config(path)})
    assert s["val_size"] == 5000 and s["dataset"] == "fashion-mnist"
    assert s["hflip"] == (path.stem != "paper")
    assert s["arch"] == ("efficient-capsnet" if "efficient" in path.stem else "capsnet")


def test_settings_refusals_and_strict_json(tmp_path):
    """A warm-up the exp schedule would ignore is refused; a config that is not UTF-8 is a
    one-line error; JSON output has null where a figure does not exist (never NaN)."""
    from capsnet.cli import _json
    from capsnet.errors import CapsnetError
    from capsnet.settings import DEFAULTS, check_settings, read_config
    with pytest.raises(CapsnetError, match="warmup_steps"):
        check_settings({**DEFAULTS, "warmup_steps": 100})  # the default schedule is exp
    assert check_settings({**DEFAULTS, "warmup_steps": 100, "lr_schedule": "cosine"})
    (bad := tmp_path / "latin1.yaml").write_bytes("# caf\xe9\nepochs: 3\n".encode("latin-1"))
    with pytest.raises(CapsnetError, match="not UTF-8"):
        read_config(bad)
    for key, value in (("out", 5), ("out", ""), ("data_dir", 5)):  # a config's wrong kinds
        with pytest.raises(CapsnetError, match=f"'{key}' must be"):
            check_settings({**DEFAULTS, key: value})
    # a run's config.yaml with values of the wrong kind is named; another tool's is ignored
    from capsnet.settings import RUN_CONFIG_HEADER, settings_beside
    (tmp_path / "m.ckpt").write_bytes(b"")
    (tmp_path / "config.yaml").write_text(RUN_CONFIG_HEADER + "val_size: abc\n")
    with pytest.raises(CapsnetError, match="config.yaml: its 'val_size' must be a whole"):
        settings_beside(tmp_path / "m.ckpt")
    (tmp_path / "config.yaml").write_text(RUN_CONFIG_HEADER + "val_size: [\n")
    with pytest.raises(CapsnetError, match="invalid YAML"):
        settings_beside(tmp_path / "m.ckpt")
    (tmp_path / "config.yaml").write_text("another_tool: [\n")
    assert settings_beside(tmp_path / "m.ckpt") == {}
    out = _json({"mAP": float("nan"), "per_label": {"a": {"ap": float("nan"), "f1": 0.5}},
                 "lengths": [0.25, float("nan")]})
    assert json.loads(out) == {"mAP": None, "per_label": {"a": {"ap": None, "f1": 0.5}},
                               "lengths": [0.25, None]}


def test_evaluation_data_must_have_the_models_class_names(tmp_path):
    from capsnet.data.datasets import ImageDataset
    from capsnet.errors import CapsnetError
    from capsnet.evaluate import same_classes
    data = ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]),
                        ("cat", "wolf"))
    with pytest.raises(CapsnetError, match="class 1 is 'dog', the data's is 'wolf'"):
        same_classes(data, {"classes": ["cat", "dog"]}, "m.ckpt")
    assert same_classes(data, {"classes": ["cat", "wolf"]}, "m.ckpt") is data
    assert same_classes(data, {"classes": [0, 1]}, "old.ckpt") is data  # no names kept
    with pytest.raises(CapsnetError, match="class 0 is '0'"):  # names, e.g. MNIST's digits
        same_classes(data, {"classes": ["0", "1"]}, "digits.ckpt")


def test_run_settings_file_is_replaced_whole(tmp_path, monkeypatch):
    """config.yaml is rewritten on every start and resume: an interruption while the new
    one is being written leaves the old one whole (it is what --resume reads)."""
    from capsnet import settings
    s = {**settings.DEFAULTS, "lr": 0.0003, "epochs": 7, "out": str(tmp_path)}
    settings.save_run_settings(tmp_path, s)
    assert settings.load_run_settings(tmp_path) == s

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(settings.yaml, "safe_dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        settings.save_run_settings(tmp_path, {**s, "epochs": 9})
    assert settings.load_run_settings(tmp_path) == s
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary file left


def test_resume_refuses_changed_settings(tmp_path, capsys):
    """A resumed run keeps what defines it: a larger validation split would hold images it
    trained on, a new learning rate would be ignored, a cosine run's length is its schedule.
    Refused before anything loads (the run folder needs only its config.yaml)."""
    import yaml
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"val_size": 500, "lr": 0.001,
                                                     "lr_schedule": "cosine", "epochs": 4}))
    for flags, key in ((["--val-size", "1000"], "--val-size"), (["--lr", "0.01"], "--lr"),
                       (["--weight-decay", "0.01"], "--weight-decay"),
                       (["--epochs", "8"], "--epochs"),
                       (["--devices", "2", "--strategy", "ddp"], "--devices"),
                       (["--num-nodes", "2", "--strategy", "ddp"], "--num-nodes")):
        code, _, err = run_cli(capsys, "train", "--resume", run, *flags)
        assert one_line_error(code, err) and key in err and "keeps its settings" in err


def test_python_api_resume_starts_from_the_runs_settings(tmp_path):
    """``train({"out": run}, resume=True)`` takes what it leaves out from the run's
    config.yaml, as ``capsnet train --resume`` does, instead of the defaults: here the
    default --lr would be refused as a change (and a default --hflip went unnoticed)."""
    import yaml
    from capsnet.errors import CapsnetError
    from capsnet.train import train
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"lr": 0.01, "hflip": True}))
    with pytest.raises(CapsnetError, match="no last.ckpt there to resume from"):
        train({"out": str(run)}, resume=True)
    with pytest.raises(CapsnetError, match="keeps its settings"):
        train({"out": str(run), "lr": 0.02}, resume=True)
