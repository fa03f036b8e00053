"""`capsnet bench` end to end with tiny settings: keys, units and internal consistency.

No timing assertions: the machine is shared, only the bookkeeping is checked.
"""

import json
import math
import pathlib
import subprocess
import sys

import pytest

from capsnet.cli import main
from conftest import one_line_error

CAPSNET = str(pathlib.Path(sys.executable).with_name("capsnet"))
TINY = ["--batch-size", "4", "--steps", "2", "--warmup", "1", "--image-size", "20",
        "--threads", "1"]
KEYS = ["train_img_s", "eval_img_s", "limit_train_img_s", "limit_eval_img_s",
        "naive_train_img_s", "naive_eval_img_s", "train_gflop_per_img", "eval_gflop_per_img",
        "gemm_gflop_s", "train_peak_mb", "naive_train_peak_mb", "batch_size", "threads",
        "device", "torch"]


@pytest.fixture(scope="module")
def result():
    proc = subprocess.run([CAPSNET, "bench", "--json", *TINY], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one JSON object"
    return json.loads(lines[0])


def test_json_has_every_key(result):
    missing = [k for k in KEYS if k not in result]
    assert not missing


def test_numbers_are_positive_and_consistent(result):
    for k in KEYS[:11]:
        assert isinstance(result[k], float) and math.isfinite(result[k]) and result[k] > 0, k
    assert result["batch_size"] == 4 and result["threads"] == 1 and result["device"] == "cpu"
    assert result["image_size"] == 20 and result["channels"] == 1
    # the limit is the measured GEMM rate divided by the counted FLOPs per image
    assert result["limit_train_img_s"] == pytest.approx(
        result["gemm_gflop_s"] / result["train_gflop_per_img"])
    assert result["limit_eval_img_s"] == pytest.approx(
        result["gemm_gflop_s"] / result["eval_gflop_per_img"])
    assert result["train_vs_limit"] == pytest.approx(
        result["train_img_s"] / result["limit_train_img_s"])
    assert result["train_vs_naive"] == pytest.approx(
        result["train_img_s"] / result["naive_train_img_s"])
    # a training step costs about 3x inference (forward + two backward products)
    assert 2 < result["train_gflop_per_img"] / result["eval_gflop_per_img"] < 3.2


def test_flops_are_counted_not_typed_in():
    from capsnet import CapsNet, CapsNetConfig
    from capsnet.bench.flops import count_gflop_per_img
    import torch
    def count(model, algorithm, eval_batch=2):
        model.primary.algorithm = algorithm
        return count_gflop_per_img(model, torch.device("cpu"), 2, eval_batch)

    small = count(CapsNet(CapsNetConfig(image_size=20)), "torch")
    paper = count(CapsNet(), "torch")
    assert paper[1] == pytest.approx(0.4064, rel=1e-3)  # conv1 + primary dominate
    assert small[1] < paper[1] / 5
    # What the frequency-domain PrimaryCaps executes, its weights' transform shared by 64
    # images (at batch 2 that transform alone is ~1 GFLOP per image).
    assert count(CapsNet(), "auto", eval_batch=64)[1] < paper[1] / 2


def test_table_without_naive(capsys):
    assert main(["bench", *TINY, "--no-naive", "--channels", "3"]) == 0
    out = capsys.readouterr().out
    assert "limit (images/s)" in out and "capsnet (images/s)" in out
    assert "naive" not in out.split("GEMM")[1]  # no naive rows
    assert "20x20x3" in out


def test_bad_flag_is_one_line_error(capsys):
    code = main(["bench", "--batch-size", "0"])
    err = capsys.readouterr().err
    assert one_line_error(code, err) and "batch-size" in err
