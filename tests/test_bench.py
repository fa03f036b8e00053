"""`capsnet bench` end to end with tiny settings: keys, units and internal consistency.

No timing assertions: the machine is shared, only the bookkeeping is checked.

The bench changes process-wide settings: ``--threads`` sets torch's thread count and
``--retain-memory`` (the default) glibc's malloc behaviour, which cannot be undone. In this
process it runs with ``--no-retain-memory`` only (the default is run in a subprocess), and
the thread count is restored after every test.
"""

import json
import math
import pathlib
import platform
import subprocess
import sys

import pytest
import torch

from capsnet.bench import bench
from capsnet.cli import main
from capsnet.errors import CapsnetError
from conftest import one_line_error

CAPSNET = str(pathlib.Path(sys.executable).with_name("capsnet"))
TINY = ["--batch-size", "4", "--steps", "2", "--warmup", "1", "--image-size", "20",
        "--threads", "1"]
# The smallest run in this process: one timed step, no warm-up, no malloc change.
IN_PROCESS = ["--batch-size", "4", "--steps", "1", "--warmup", "0", "--image-size", "20",
              "--threads", "1", "--no-retain-memory"]
NAIVE_ROWS = ("naive (images/s)", "capsnet / naive")
KEYS = ["train_img_s", "eval_img_s", "limit_train_img_s", "limit_eval_img_s",
        "naive_train_img_s", "naive_eval_img_s", "train_gflop_per_img", "eval_gflop_per_img",
        "gemm_gflop_s", "train_peak_mb", "naive_train_peak_mb", "batch_size", "threads",
        "device", "torch", "precision"]


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


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_default_retains_freed_memory(result):
    """The default (only ever run in the subprocess) changes malloc's setting, and says so."""
    assert result["malloc"] == "retain freed memory"


def test_flops_are_counted_not_typed_in():
    from capsnet import CapsNet, CapsNetConfig
    from capsnet.bench.flops import count_gflop_per_img

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


def naive_rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(NAIVE_ROWS)]


def test_table_without_naive(capsys):
    assert main(["bench", *IN_PROCESS, "--no-naive", "--channels", "3"]) == 0
    out = capsys.readouterr().out
    assert "limit (images/s)" in out and "capsnet (images/s)" in out  # the arch names the row
    assert naive_rows(out) == []
    assert "naive" not in out  # no naive row, nor the naive peak memory
    assert "20x20x3" in out
    assert "malloc: default" in out  # --no-retain-memory left malloc alone


def test_table_with_naive(capsys):
    assert main(["bench", *IN_PROCESS]) == 0
    out = capsys.readouterr().out
    rows = naive_rows(out)
    assert [r[:28].strip() for r in rows] == list(NAIVE_ROWS)
    assert rows[1].rstrip().endswith("x")  # the speed-ups
    assert "(naive " in out  # its peak memory
    assert "malloc: default" in out


def test_efficient_capsnet(capsys):
    assert main(["bench", "--arch", "efficient-capsnet", "--steps", "1", "--warmup", "0",
                 "--batch-size", "4", "--json", "--threads", "1", "--no-retain-memory"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert r["arch"] == "efficient-capsnet"
    # 161,824 without the decoder (the authors' MNIST model), more with it
    assert isinstance(r["parameters"], int) and r["parameters"] > 161_824
    assert r["naive_train_img_s"] is None and r["naive_eval_img_s"] is None
    assert r["naive_train_peak_mb"] is None
    assert "train_vs_naive" not in r and "eval_vs_naive" not in r
    assert r["train_img_s"] > 0 and r["eval_img_s"] > 0 and r["malloc"] == "default"


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_precision_runs_forward_and_loss_under_autocast(precision, capsys, monkeypatch):
    import capsnet.bench as bench_module
    seen, loss = [], bench_module.capsule_loss

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return loss(*args, **kwargs)
    monkeypatch.setattr(bench_module, "capsule_loss", spy)
    assert main(["bench", *IN_PROCESS, "--no-naive", "--precision", precision, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["precision"] == precision and r["train_img_s"] > 0
    assert seen and all(seen) == (precision == "bf16-mixed"), seen


def test_16_mixed_on_the_cpu_is_one_line_error(capsys):
    code = main(["bench", *IN_PROCESS, "--precision", "16-mixed", "--device", "cpu"])
    err = capsys.readouterr().err
    assert one_line_error(code, err) and "needs a GPU" in err


def test_unknown_arch():
    with pytest.raises(CapsnetError, match="unknown architecture 'foo'"):
        bench(arch="foo", retain_memory=False)


def test_unknown_arch_is_one_line_error(capsys):
    code = main(["bench", "--arch", "foo", "--no-retain-memory"])
    err = capsys.readouterr().err
    assert one_line_error(code, err) and "foo" in err and "efficient-capsnet" in err


def test_routing_iterations_of_efficient_capsnet_is_one_line_error(capsys):
    code = main(["bench", "--arch", "efficient-capsnet", "--routing-iterations", "2",
                 "--no-retain-memory"])
    err = capsys.readouterr().err
    assert one_line_error(code, err) and "routing iterations" in err


def test_bad_flag_is_one_line_error(capsys):
    code = main(["bench", "--batch-size", "0"])
    err = capsys.readouterr().err
    assert one_line_error(code, err) and "batch-size" in err
