"""Multi-label data (the Planet CSV layout): k-hot targets through the margin loss, the decoder
fed every present capsule, and the scores (per-label precision/recall/F1, F2, mAP)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from capsnet.inference import average_precision, f_beta_per_image, summarize_multilabel
from capsnet.layers import Decoder
from capsnet.losses import margin_loss
from capsnet.models.base import present

from conftest import one_line_error


def test_margin_loss_k_hot_is_the_sum_of_the_present_classes_terms():
    lengths = torch.tensor([[0.95, 0.2, 0.6], [0.05, 0.8, 0.3]])
    one = margin_loss(lengths, torch.tensor([0, 1]))
    same = margin_loss(lengths, torch.tensor([[1, 0, 0], [0, 1, 0]], dtype=torch.uint8))
    assert torch.allclose(one, same)
    # both classes present: the second class's term changes from absent to present
    both = margin_loss(lengths, torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.uint8))
    expected0 = 0 + 0.5 * max(0, 0.2 - 0.1) ** 2 + max(0, 0.9 - 0.6) ** 2
    assert both[0].item() == pytest.approx(expected0, rel=1e-5)


def test_decoder_mask_keeps_every_present_capsule():
    v = torch.arange(1, 13, dtype=torch.float32).view(1, 3, 4)
    kept = Decoder.mask(v, torch.tensor([[1, 0, 1]])).view(3, 4)
    assert torch.equal(kept[0], v[0, 0]) and torch.equal(kept[2], v[0, 2])
    assert not kept[1].any()
    assert torch.equal(Decoder.mask(v, torch.tensor([1])),
                       Decoder.mask(v, torch.tensor([[0, 1, 0]])))


def test_present_keeps_the_longest_even_when_none_passes_half():
    p = present(torch.tensor([[0.1, 0.3, 0.2], [0.7, 0.6, 0.1]]))
    assert p.tolist() == [[0, 1, 0], [1, 1, 0]]


def test_scores_against_hand_computed_values():
    pred = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 0]])
    true = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 0]])
    # image 0: tp 1, fp 1, fn 0 -> F2 = 5 / (5 + 0 + 1); image 1: tp 1, fn 1 -> 5 / (5 + 4);
    # image 2: nothing true, nothing predicted -> 1
    f2 = f_beta_per_image(pred, true)
    assert f2.tolist() == pytest.approx([5 / 6, 5 / 9, 1.0])
    # AP of scores ranking positives 1st and 3rd: (1/1 + 2/3) / 2
    ap = average_precision(torch.tensor([0.9, 0.8, 0.7, 0.1]), torch.tensor([1, 0, 1, 0]))
    assert ap == pytest.approx((1 + 2 / 3) / 2)
    # tied scores are one threshold, whatever the order: the positive among three tied
    # images at the top counts precision 1/3 (scikit-learn's average_precision_score)
    for target in ([1, 0, 0, 0], [0, 0, 1, 0]):
        ap = average_precision(torch.tensor([1.0, 1.0, 1.0, 0.3]), torch.tensor(target))
        assert ap == pytest.approx(1 / 3)
    ap = average_precision(torch.tensor([0.9, 0.5, 0.5, 0.1]), torch.tensor([0, 1, 0, 1]))
    assert ap == pytest.approx(0.5 * 1 / 3 + 0.5 * 2 / 4)
    lengths = torch.tensor([[0.9, 0.6, 0.1], [0.2, 0.7, 0.4], [0.1, 0.2, 0.3]])
    s = summarize_multilabel(lengths, true, ["a", "b", "c"])
    assert s["f2"] == pytest.approx(float(f2.mean()))
    assert s["accuracy"] == pytest.approx(1 / 3)  # only image 2 is exactly right
    assert s["per_label"]["b"]["precision"] == pytest.approx(0.5)
    assert s["per_label"]["b"]["recall"] == pytest.approx(1.0)
    assert s["per_label"]["c"]["recall"] == 0.0


def _planet(root, n=96, size=40, seed=0):
    """A Planet-layout folder: ``train_v2.csv`` (image_name,tags) and ``train-jpg/``. The
    tags can be read off the pixels: "bright" = a light top half, "striped" = vertical
    stripes, "haze" = neither; so a short run has something to learn."""
    rng = np.random.default_rng(seed)
    (root / "train-jpg").mkdir(parents=True)
    lines = ["image_name,tags"]
    for i in range(n):
        img = rng.integers(0, 40, (size, size, 3)).astype(np.uint8)
        tags = []
        if rng.random() < 0.5:
            img[: size // 2] += 150
            tags.append("bright")
        if rng.random() < 0.5:
            img[:, ::4] = 250
            tags.append("striped")
        tags = tags or ["haze"]
        Image.fromarray(img).save(root / "train-jpg" / f"train_{i}.jpg", quality=95)
        lines.append(f"train_{i},{' '.join(tags)}")
    (root / "train_v2.csv").write_text("\n".join(lines) + "\n")
    return root


def test_a_multilabel_run_trains_evaluates_and_predicts(tmp_path, capsys):
    from capsnet.cli import main
    data = _planet(tmp_path / "planet")
    out = tmp_path / "run"
    assert main(["train", "--dataset", "multilabel", "--data-dir", str(data),
                 "--image-size", "24", "--val-size", "16", "--epochs", "2",
                 "--batch-size", "16", "--lr", "0.003", "--no-progress", "--no-tensorboard",
                 "--out", str(out)]) == 0
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    row = (out / "metrics.csv").read_text().splitlines()[-1].split(",")
    values = dict(zip(header, row))
    assert 0 <= float(values["val_f2"]) <= 1 and 0 <= float(values["test_f2"]) <= 1
    assert (out / "best.ckpt").is_file()
    capsys.readouterr()

    assert main(["evaluate", str(out / "best.ckpt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["multi_label"] and result["classes"] == ["bright", "haze", "striped"]
    assert result["n"] == round(96 * 0.2) or result["n"] > 0
    assert set(result["per_label"]) == {"bright", "haze", "striped"}
    assert 0 <= result["mAP"] <= 1

    image = next((data / "train-jpg").iterdir())
    assert main(["predict", str(out / "best.ckpt"), str(image), "--json"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert "present" in line and set(line["present"]) <= {"bright", "haze", "striped"}

    # the report is for single-label data: a one-line refusal, not a wrong page
    code = main(["report", str(out), "--out", str(tmp_path / "rep")])
    assert one_line_error(code, capsys.readouterr().err)


def test_inference_runs_in_eval_mode_and_restores_the_mode():
    """A model still in training mode (batch norm: Efficient-CapsNet) is scored on its
    running statistics, which stay as they were, and is left in training mode."""
    from capsnet.inference import infer, tta_lengths
    from capsnet.models import build_model
    torch.manual_seed(0)
    model = build_model("efficient-capsnet")
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        expect = model.eval()(x).lengths
    model.train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    with torch.no_grad():
        assert torch.allclose(tta_lengths(model, x, "none"), expect, atol=1e-6)
    images = (x * 255).round().to(torch.uint8)
    infer(model, images, torch.zeros(4, dtype=torch.long))
    assert model.training and stats
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
