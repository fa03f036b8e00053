"""Efficient-CapsNet: its size, its routing against the formula written out, a short real run."""

import math

import pytest
import torch

from capsnet.models import ARCHITECTURES, EfficientCapsNet, build_model
from capsnet.models.efficient_capsnet import self_attention_routing, squash_exp
from conftest import exports_agree


def test_parameter_count_matches_the_authors():
    m = EfficientCapsNet()
    # 161,824 trainable parameters without the decoder, as the paper reports at 28x28x1
    assert m.num_parameters(decoder=False) == 161_824
    decoder = (160 * 512 + 512) + (512 * 1024 + 1024) + (1024 * 784 + 784)
    assert m.num_parameters() == 161_824 + decoder
    assert m.config.grid == 9


def test_squash_exp():
    s = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1e-12, 0.0]], dtype=torch.float64)
    v = squash_exp(s)
    assert torch.isfinite(v).all() and v[0].abs().sum() == 0
    assert math.isclose(float(v[1].norm()), 1 - math.exp(-5), rel_tol=1e-12)
    torch.testing.assert_close(v[1] / v[1].norm(), s[1] / 5)  # direction kept


def test_self_attention_routing_matches_the_formula():
    """u_hat [B, O, I, D]: A = u_hat u_hat^T / sqrt(D) per output capsule; C = softmax over
    the output capsules of A summed over its last axis; s_j = sum_i u_hat_ji (C_ji + B_ji)."""
    torch.manual_seed(0)
    b, o, i, d = 2, 3, 5, 4
    u_hat = torch.randn(b, o, i, d, dtype=torch.float64)
    bias = torch.randn(o, i, dtype=torch.float64)
    s = self_attention_routing(u_hat, bias)
    expected = torch.zeros(b, o, d, dtype=torch.float64)
    for n in range(b):
        logits = torch.zeros(o, i, dtype=torch.float64)
        for j in range(o):
            a = u_hat[n, j] @ u_hat[n, j].T / math.sqrt(d)  # [I, I]
            logits[j] = a.sum(dim=1)
        c = torch.softmax(logits, dim=0)  # over output capsules
        for j in range(o):
            for k in range(i):
                expected[n, j] += u_hat[n, j, k] * (c[j, k] + bias[j, k])
    torch.testing.assert_close(s, expected, rtol=1e-12, atol=1e-12)


def test_shapes_other_inputs_and_registry():
    assert set(ARCHITECTURES) >= {"capsnet", "efficient-capsnet"}
    m = build_model("efficient-capsnet", {"in_channels": 3, "image_size": 32,
                                          "num_classes": 7}).eval()
    out = m(torch.rand(2, 3, 32, 32))
    assert out.lengths.shape == (2, 7) and out.poses.shape == (2, 7, 16)
    assert out.reconstructions.shape == (2, 3, 32, 32)
    assert ((out.lengths >= 0) & (out.lengths < 1)).all()
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("resnet")


def test_short_real_run_learns_and_evaluates(fashion_dir, tmp_path, capsys):
    from capsnet.checkpoints import load_model
    from capsnet.cli import main
    out = tmp_path / "eff"
    assert main(["train", "--arch", "efficient-capsnet", "--data-dir", str(fashion_dir),
                 "--train-size", "2000", "--val-size", "200", "--test-size", "200",
                 "--epochs", "2", "--batch-size", "32", "--lr", "0.002", "--ema", "0.99",
                 "--no-progress", "--no-tensorboard", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "efficient-capsnet" in stdout
    model, meta = load_model(out / "best.ckpt")
    assert type(model) is EfficientCapsNet and meta["arch"] == "efficient-capsnet"
    code = main(["evaluate", str(out / "best.ckpt"), "--json", "--test-size", "2000"])
    import json
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["n"] == 2000
    print("efficient-capsnet, 2 epochs on 2,000 images:", result["accuracy"])
    assert result["accuracy"] > 0.6  # chance is 0.1
    exports_agree(out / "best.ckpt", tmp_path, capsys, fashion_dir)  # batch norm's buffers too
    code = main(["train", "--arch", "efficient-capsnet", "--routing-iterations", "2",
                 "--out", str(tmp_path / "x"), "--data-dir", str(fashion_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "--routing-iterations does not apply" in err
