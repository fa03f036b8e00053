"""Issue 13's infrastructure: MultiFashion pairs, the expanded and affine test sets, the
paper's CNN baselines, and the commands on them (tiny real runs on real Fashion-MNIST)."""

import json

import pytest
import torch

from capsnet.data import affine, generated, multi
from capsnet.data.datasets import ImageDataset, read_idx_dataset
from capsnet.data.registry import FASHION_CLASSES, dataset_info
from capsnet.losses import capsule_loss, model_loss
from capsnet.models import build_model, objective

from conftest import one_line_error


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Generated sets are cached in a temporary per-user cache, never the real one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
        yield


@pytest.fixture(scope="module")
def fashion_test(fashion_dir):
    return read_idx_dataset(fashion_dir, FASHION_CLASSES)[1]


def dot_images(rows, cols, size=28):
    """One white pixel per image at (row, col): ``[B, 1, size, size]`` floats."""
    x = torch.zeros(len(rows), 1, size, size)
    x[torch.arange(len(rows)), 0, torch.tensor(rows), torch.tensor(cols)] = 1.0
    return x


# --------------------------------------------------------------------------- MultiFashion

def test_training_pairs_different_classes_shifts_within_4_and_clipped_sum():
    torch.manual_seed(0)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    x = dot_images([14] * 8, [14] * 8) * 0.75
    p = multi.make_pairs(x, y)
    assert p.composite.shape == p.first.shape == p.second.shape == (8, 1, 36, 36)
    assert p.valid.all() and (p.labels[:, 0] == y).all()
    assert (p.labels[:, 0] != p.labels[:, 1]).all()  # a garment of another class
    for img in (p.first, p.second):  # the dot sits at 18 + (dy, dx), |dy|, |dx| <= 4
        pos = img.flatten(1).argmax(1)
        dy, dx = pos // 36 - 18, pos % 36 - 18
        assert dy.abs().max() <= 4 and dx.abs().max() <= 4
    assert torch.equal(p.composite, (p.first + p.second).clamp(max=1))
    torch.manual_seed(0)  # the global generator: a seed (and a checkpoint) reproduces them
    again = multi.make_pairs(x, y)
    assert all(torch.equal(a, b) for a, b in zip(p, again))
    solid = multi.make_pairs(torch.full((8, 1, 28, 28), 0.75), y)  # overlapping: 1.5 -> 1
    assert solid.composite.max() == 1.0 and (solid.first <= 0.75).all()
    assert ((solid.composite == 1.0) == ((solid.first > 0) & (solid.second > 0))).all()


def test_overlay_clips_and_lonely_classes_are_flagged():
    a = torch.tensor([200, 10], dtype=torch.uint8)
    assert multi.overlay(a, a).tolist() == [255, 20]
    assert multi.overlay(torch.tensor([0.7]), torch.tensor([0.6])).item() == 1.0
    partner, valid = multi.choose_partners(torch.tensor([3, 3, 3]))
    assert not valid.any() and partner.tolist() == [0, 1, 2]
    partner, valid = multi.choose_partners(torch.tensor([3, 3, 5]))
    assert valid.all() and partner.tolist() == [2, 2, partner[2].item()] and partner[2] < 2


def test_bounding_box_overlap_on_hand_made_boxes():
    img = torch.zeros(2, 1, 10, 10)
    img[0, 0, 2:5, 3:9] = 1  # rows 2..4, cols 3..8
    boxes = multi.bounding_boxes(img)
    assert boxes.tolist() == [[2, 3, 5, 9], [0, 0, 0, 0]]  # an empty image: an empty box
    a = torch.tensor([[0, 0, 4, 4], [0, 0, 4, 4], [0, 0, 2, 2], [0, 0, 4, 4]])
    b = torch.tensor([[2, 2, 6, 6], [0, 0, 4, 4], [0, 0, 4, 4], [5, 5, 6, 6]])
    # 2x2 of 16; identical; the small box inside the big one; disjoint
    assert multi.box_overlap(a, b).tolist() == [4 / 16, 1.0, 1.0, 0.0]
    assert multi.box_iou(a, b).tolist() == [4 / 28, 1.0, 4 / 16, 0.0]
    packed = torch.zeros(1, 3, 6, 6, dtype=torch.uint8)
    packed[0, 1, 0:4, 0:4] = 9
    packed[0, 2, 2:6, 2:6] = 9
    assert multi.pair_overlap(packed) == {"overlap": 0.25, "iou": 4 / 28, "n": 1}


def test_fixed_pairs_are_deterministic_and_of_two_classes(fashion_test):
    sub = ImageDataset(fashion_test.images[:600], fashion_test.labels[:600], FASHION_CLASSES)
    one = generated.val_split(generated.MULTI, sub)
    two = generated.val_split(generated.MULTI, sub)
    assert torch.equal(one.images, two.images) and torch.equal(one.labels, two.labels)
    assert one.images.shape == (600, 3, 36, 36) and one.labels.shape == (600, 2)
    assert multi.is_pair_set(one) and (one.labels[:, 0] != one.labels[:, 1]).all()
    comp, first, second = multi.split_packed(one.images)
    assert torch.equal(comp, multi.overlay(first, second))
    assert torch.equal(one.labels[:, 0], sub.labels)  # every garment is a base once
    table = multi.pair_table(sub.labels, 3, seed=5)
    assert len(table["first"]) == 1800 and table["shifts"].abs().max() <= 4


def test_generated_test_sets_are_identical_builds_and_cached(fashion_test, tmp_path,
                                                             monkeypatch):
    infos = {}
    for protocol in (generated.MULTI, generated.AFFINE):
        a, infos[protocol] = generated.build_test(protocol, fashion_test)
        b, _ = generated.build_test(protocol, fashion_test)
        assert generated.digest(*a.values()) == generated.digest(*b.values())
        assert a["images"].shape[0] == 10_000
    assert 0.6 < infos[generated.MULTI]["overlap"] < 0.95  # measured on the whole pair set
    # the cache: built and saved once, then read back (not rebuilt), the same bytes
    sub = ImageDataset(fashion_test.images[:300], fashion_test.labels[:300], FASHION_CLASSES)
    built, info = generated.test_split("multi-fashion-mnist", generated.MULTI, sub, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"test-v1.npz", "test-v1.json"}
    assert json.loads((tmp_path / "test-v1.json").read_text())["info"]["n"] == 300
    monkeypatch.setattr(generated, "build_test", lambda *a: pytest.fail("rebuilt"))
    cached, _ = generated.test_split("multi-fashion-mnist", generated.MULTI, sub, tmp_path)
    assert torch.equal(built.images, cached.images) and torch.equal(built.labels, cached.labels)
    monkeypatch.undo()
    whole = (tmp_path / "test-v1.npz").read_bytes()
    for damaged in (b"damaged", whole[:len(whole) // 2]):  # a damaged or cut cache is rebuilt
        (tmp_path / "test-v1.npz").write_bytes(damaged)
        again, _ = generated.test_split("multi-fashion-mnist", generated.MULTI, sub, tmp_path)
        assert torch.equal(again.images, built.images)
    expanded, _ = generated.build_test(generated.EXPANDED, sub)
    assert expanded["images"].shape == (300, 1, 40, 40) and expanded["shifts"].abs().max() <= 6
    val = generated.val_split(generated.EXPANDED, sub)  # fixed positions, another seed
    assert torch.equal(val.images, generated.val_split(generated.EXPANDED, sub).images)
    assert val.images.shape == (300, 1, 40, 40) and not torch.equal(val.images,
                                                                    expanded["images"])


# --------------------------------------------------------------------------- affine set

def test_affine_ranges_zero_range_and_geometry(fashion_test):
    x = fashion_test.images[:200]
    img, p = affine.affine_set(x, seed=3)
    assert img.shape == (200, 1, 40, 40)
    assert p["rotation"].abs().max() <= 20 and p["shear"].abs().max() <= 0.2
    assert p["scale"].min() >= 0.8 and p["scale"].max() <= 1.2
    assert p["rotation"].abs().max() > 15 and p["translation"].abs().max() > 3  # they vary
    # nothing cut off: the ink's mass scales with the map's area factor
    det = torch.linalg.det(affine.affine_matrices(p["rotation"], p["shear"], p["scale"]))
    ratio = img.double().sum((1, 2, 3)) / (x.double().sum((1, 2, 3)) * det)
    assert ratio.min() > 0.97 and ratio.max() < 1.03
    # zero ranges: exactly the plain centred placement (affNIST's "just centred" version)
    still, _ = affine.affine_set(x, seed=3, ranges=affine.NONE)
    assert torch.equal(still, affine.pad_to(x))
    # a quarter turn counter-clockwise is torch.rot90, pixel for pixel
    n = len(x)
    turn = {"rotation": torch.full((n,), 90.0), "shear": torch.zeros(n),
            "scale": torch.ones(n, 2), "translation": torch.zeros(n, 2)}
    assert torch.equal(affine.warp(x, turn), torch.rot90(affine.pad_to(x), 1, (-2, -1)))


def test_expanded_placement():
    torch.manual_seed(1)
    x = dot_images([14] * 64, [14] * 64)
    placed = affine.random_placement(x)
    pos = placed.flatten(1).argmax(1)
    dy, dx = pos // 40 - 20, pos % 40 - 20
    assert placed.shape == (64, 1, 40, 40)
    assert dy.abs().max() <= 6 and dx.abs().max() <= 6 and dy.abs().max() >= 4


# --------------------------------------------------------------------------- baselines

def cnn_params(convs, pool, hidden, side, classes=10, first_k=5):
    """The count by hand: "same" convolutions (the first ``first_k`` wide, the others 5;
    optional 2x2 pooling, rounding up), fully connected layers, the output layer; weights
    + biases."""
    n, c = 0, 1
    for i, ch in enumerate(convs):
        k = first_k if i == 0 else 5
        n += c * ch * k * k + ch
        c = ch
        side = -(-side // 2) if pool else side
    width = side * side * c
    for h in (*hidden, classes):
        n += width * h + h
        width = h
    return n


def test_baseline_parameter_counts_shapes_and_objectives():
    assert objective("baseline-cnn") == "cross_entropy"
    assert objective("baseline-cnn-multi") == "sigmoid" and objective("capsnet") == "margin"
    cnn = dict(convs=(256, 256, 128), pool=False, hidden=(328, 192))
    multi_cnn = dict(convs=(512, 256), pool=True, hidden=(1024,), first_k=9)
    for name, shape, side in [("baseline-cnn", cnn, 28), ("baseline-cnn", cnn, 40),
                              ("baseline-cnn-multi", multi_cnn, 36),
                              ("baseline-cnn-multi", multi_cnn, 28)]:
        m = build_model(name, {"image_size": side})
        assert m.num_parameters() == cnn_params(side=side, **shape), (name, side)
    assert build_model("baseline-cnn").num_parameters() == 35_445_522  # the paper's 35.4M
    assert build_model("baseline-cnn-multi").num_parameters() == 24_563_978  # its 24.56M
    assert build_model("capsnet", {"image_size": 36}).num_parameters() == 11_361_808  # 11.36M
    small = build_model("baseline-cnn", {"conv_channels": [4, 4], "hidden": [8],
                                         "image_size": 12}).eval()
    out = small(torch.rand(3, 1, 12, 12))
    assert out.lengths.shape == out.logits.shape == (3, 10) and out.reconstructions is None
    assert torch.allclose(out.lengths.sum(1), torch.ones(3))  # softmax probabilities
    loss = model_loss("cross_entropy", out, torch.tensor([0, 1, 2]), None)
    assert loss.reconstruction == 0 and loss.total == loss.margin > 0
    # the capsule path is exactly the one it always was
    caps = build_model("capsnet").eval()
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([3, 4])
    o = caps(x, y)
    same = capsule_loss(o.lengths, y, o.reconstructions, x)
    assert all(torch.equal(a, b) for a, b in zip(model_loss("margin", o, y, x), same))


def test_pair_losses_and_scores_for_both_kinds_of_model():
    from capsnet.pairs import evaluate_pairs, pair_losses
    torch.manual_seed(0)
    labels = torch.tensor([[0, 1], [2, 3]])
    first, second = torch.rand(2, 1, 36, 36), torch.rand(2, 1, 36, 36)
    comp = multi.overlay(first, second)
    caps = build_model("capsnet", {"image_size": 36})
    r = pair_losses(caps, comp, first, second, labels)
    dec = caps.decoder(caps.capsules(comp), labels[:, 1])  # the second garment's own capsule
    assert torch.allclose(r.reconstructions[1], dec)
    assert r.total.shape == (2,) and (r.reconstruction > 0).all()
    sig = build_model("baseline-cnn-multi", {"conv_channels": [4], "hidden": [8]}).eval()
    r = pair_losses(sig, comp, first, second, labels)
    assert (r.reconstruction == 0).all() and r.reconstructions is None
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.9, 0.1, 0.8, 0.0]])
    assert multi.pair_correct(scores, torch.tensor([[1, 0], [2, 3]])).tolist() == [True, False]
    from capsnet.pairs import summarize_pairs
    s = summarize_pairs(scores, torch.tensor([[1, 0], [2, 3]]), list("abcd"))
    assert s["accuracy"] == 0.5 and s["per_class_n"] == {"a": 1, "b": 1, "c": 1, "d": 1}
    assert s["per_class"] == {"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.0}
    packed = torch.cat([comp, first, second], 1).mul(255).byte()
    res = evaluate_pairs(sig, ImageDataset(packed, labels, FASHION_CLASSES))
    assert res["pairs"] and res["n"] == 2 and res["reconstruction_sse"] == 0


# --------------------------------------------------------------------------- the commands

TINY = ["--train-size", "48", "--val-size", "16", "--test-size", "32", "--epochs", "1",
        "--batch-size", "16", "--eval-batch-size", "32", "--lr", "0.002", "--no-progress",
        "--log-every", "1"]


def test_refusals_are_one_line(capsys, tmp_path):
    from capsnet.cli import main
    for args, needle in [(["--dataset", "fashion-mnist-affine"], "test set only"),
                         (["--dataset", "multi-fashion-mnist", "--hflip"], "--hflip does not"),
                         (["--dataset", "fashion-mnist-expanded", "--rotate", "5"],
                          "--rotate does not"),
                         (["--dataset", "multi-fashion-mnist", "--arch", "baseline-cnn"],
                          "baseline-cnn-multi")]:
        code = main(["train", *args, "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert one_line_error(code, err) and needle in err, err
    assert not (tmp_path / "x").exists()
    (tmp_path / "notes.txt").write_text("a user's file")
    code = main(["train", "--out", str(tmp_path / "notes.txt")])
    err = capsys.readouterr().err
    assert one_line_error(code, err) and "a file, not a folder" in err, err
    assert (tmp_path / "notes.txt").read_text() == "a user's file"
    for flag in ("--test-size", "--batch-size", "--threads"):
        code = main(["evaluate", "fashion-mnist", flag, "0"])
        err = capsys.readouterr().err
        assert one_line_error(code, err) and f"{flag} must be positive, got 0" in err, err
    code = main(["predict", "--threads", "-1", str(tmp_path / "notes.txt")])
    err = capsys.readouterr().err
    assert one_line_error(code, err) and "--threads must be positive, got -1" in err, err
    for args, needle in [(["report", "fashion-mnist", "--samples", "0"], "--samples must be positive"),
                         (["report", "fashion-mnist", "--mistakes", "-1"],
                          "--mistakes must not be negative, got -1"),
                         (["export", "fashion-mnist", str(tmp_path / "m.onnx"), "--batch", "0"],
                          "--batch must be positive, got 0"),
                         (["bench", "--steps", "0"], "--steps must be positive, got 0"),
                         (["bench", "--warmup", "-2"], "--warmup must not be negative, got -2")]:
        code = main(args)
        err = capsys.readouterr().err
        assert one_line_error(code, err) and needle in err, (args, err)
    assert not (tmp_path / "m.onnx").exists()
    code = main(["evaluate", "fashion-mnist", "--threads", "two"])  # argparse's own refusal
    err = capsys.readouterr().err
    assert one_line_error(code, err) and err.startswith(
        "capsnet evaluate: error: argument --threads: invalid int value: 'two'"), err
    assert dataset_info("fashion-mnist-affine").image_shape == (1, 40, 40)


def test_capsnet_on_pairs_trains_evaluates_and_reports(fashion_dir, tmp_path, capsys,
                                                      monkeypatch):
    from capsnet.metrics import read_metrics
    from capsnet.cli import main
    out = tmp_path / "multi"
    assert main(["train", "--dataset", "multi-fashion-mnist", "--data-dir", str(fashion_dir),
                 *TINY, "--out", str(out)]) == 0  # TensorBoard on: the dashboards skip pairs
    assert "11,361,808 parameters" in capsys.readouterr().out
    row = read_metrics(out / "metrics.csv")[-1]
    assert row["val_recon"] > 0 and 0 <= row["val_acc"] <= 1 and (out / "best.ckpt").is_file()
    assert main(["evaluate", str(out / "best.ckpt"), "--test-size", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pairs"] and result["n"] == 32
    assert result["accuracy"] == pytest.approx(row["test_acc"], abs=1e-6)  # the same score
    assert result["loss"] == pytest.approx(row["test_loss"], rel=1e-4)
    assert main(["evaluate", str(out / "best.ckpt"), "--test-size", "8", "--predictions",
                 str(tmp_path / "pairs.csv")]) == 2  # per-image rows are for single labels
    assert "single-label" in capsys.readouterr().err and not (tmp_path / "pairs.csv").exists()
    # the pair report: the same pair accuracy as evaluate, and the paper's Figure 5
    assert main(["report", str(out), "--test-size", "32", "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    assert f"{100 * result['accuracy']:.1f}%" in page and "32 test pairs" in page
    from capsnet.report.pairs import PAIR_FILES
    shown = [f for f in PAIR_FILES if (tmp_path / "rep" / f).is_file()]
    assert shown and all(f in page for f in shown)  # at least one kind, each on the page
    # all pairs wrong, then all right: each figure left out with a sentence in its place
    from capsnet.data import multi
    for every, kept, sentence in ((False, PAIR_FILES[1], "No correct pairs among these"),
                                  (True, PAIR_FILES[0], "No failures on these test pairs")):
        monkeypatch.setattr(multi, "pair_correct",
                            lambda scores, labels, v=every: torch.full((len(labels),), v))
        rep = tmp_path / f"rep-{every}"
        assert main(["report", str(out), "--test-size", "8", "--out", str(rep)]) == 0
        page = (rep / "index.html").read_text()
        assert sentence in page and kept in page
        assert sorted(p.name for p in rep.glob("pair*.png")) == [kept]


def test_expanded_training_and_affine_evaluation(fashion_dir, tmp_path, capsys):
    from capsnet.cli import main
    out = tmp_path / "exp"
    assert main(["train", "--dataset", "fashion-mnist-expanded", "--data-dir", str(fashion_dir),
                 *TINY, "--val-size", "0", "--no-tensorboard", "--out", str(out)]) == 0
    assert "13,475,648 parameters" in capsys.readouterr().out
    assert main(["evaluate", str(out / "last.ckpt"), "--dataset", "fashion-mnist-affine",
                 "--test-size", "24", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 24 and len(result["confusion"]) == 10


def test_baseline_cnn_trains_evaluates_predicts(fashion_dir, tmp_path, capsys):
    from capsnet.cli import main
    out = tmp_path / "cnn"
    assert main(["train", "--arch", "baseline-cnn", "--data-dir", str(fashion_dir), *TINY,
                 "--train-size", "32", "--val-size", "0", "--out", str(out)]) == 0
    assert "baseline-cnn: 35,445,522 parameters" in capsys.readouterr().out
    assert main(["evaluate", str(out / "last.ckpt"), "--test-size", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["objective"] == "cross_entropy" and result["reconstruction_sse"] == 0
    assert result["n"] == 32 and 0 <= result["accuracy"] <= 1
    # a (small) baseline as a weights file: predict prints probabilities, the report (which
    # needs capsules) refuses it in one line
    from PIL import Image

    from capsnet.weights import save_weights
    small = build_model("baseline-cnn", {"conv_channels": [4], "hidden": [8]})
    weights = save_weights(small, tmp_path / "small.safetensors",
                           {"classes": list(FASHION_CLASSES), "dataset": "fashion-mnist"})
    image = tmp_path / "shirt.png"
    Image.fromarray(read_idx_dataset(fashion_dir, FASHION_CLASSES)[1].images[0, 0].numpy()
                    ).save(image)
    assert main(["predict", "-m", str(weights), str(image)]) == 0
    assert "class probabilities" in capsys.readouterr().out
    code = main(["report", str(weights), "--out", str(tmp_path / "rep")])
    err = capsys.readouterr().err
    assert one_line_error(code, err) and "CNN baseline" in err


def test_figure5_colours_each_garment_from_its_own_capsule():
    from capsnet.plots import two_colours
    from capsnet.report.pairs import decode_pairs
    a, b = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    a[..., 0, 0], b[..., 0, 0], b[..., 3, 3] = 1.0, 1.0, 0.5
    rgb = two_colours(a, b)
    assert rgb[0, :, 0, 0].tolist() == [1, 1, 0] and rgb[0, :, 3, 3].tolist() == [0, 0.5, 0]
    torch.manual_seed(0)
    model = build_model("capsnet", {"image_size": 36})
    packed = torch.randint(0, 256, (3, 3, 36, 36), dtype=torch.uint8)
    labels = torch.tensor([[0, 1], [2, 3], [4, 5]])
    comp, truth, top2_rgb, top2 = decode_pairs(model, packed, labels)
    assert comp.shape == (3, 1, 36, 36) and truth.shape == top2_rgb.shape == (3, 3, 36, 36)
    with torch.no_grad():  # red is the first class's capsule alone, decoded
        v = model.capsules(packed[:, :1].float() / 255)
        torch.testing.assert_close(truth[:, 0], model.decoder(v, labels[:, 0])[:, 0])
        torch.testing.assert_close(truth[:, 1], model.decoder(v, labels[:, 1])[:, 0])
    assert (top2 == v.norm(dim=-1).topk(2, dim=1).indices).all()


def _robustness_script():
    from conftest import load_script
    return load_script("robustness")


def test_equal_accuracy_match_uses_validation_accuracy():
    """scripts/robustness.py: the weaker model at its best validation epoch, the stronger at
    its first epoch reaching that accuracy (epochs counted from 1); test_acc is ignored."""
    script = _robustness_script()
    rows = lambda accs: [{"epoch": e, "val_acc": a, "test_acc": 1 - a}  # noqa: E731
                         for e, a in enumerate(accs)]
    curves = {"capsnet": rows([0.70, 0.80, 0.86, 0.90]), "baseline-cnn": rows([0.75, 0.85, 0.84])}
    assert script.match_epochs(curves) == ("baseline-cnn", {"baseline-cnn": 2, "capsnet": 3})
    curves = {"capsnet": rows([0.6, 0.7]), "baseline-cnn": rows([0.65, 0.9])}
    assert script.match_epochs(curves) == ("capsnet", {"capsnet": 2, "baseline-cnn": 2})


def test_fine_match_scores_files_in_order_and_stops_at_the_first_reaching():
    """scripts/robustness.py --fine: the first weights file at or above the target, none
    scored after it; None when no file reaches it."""
    from pathlib import Path
    script = _robustness_script()
    files = [Path(f"step-{s:06d}.safetensors") for s in (4, 8, 12, 16)]
    acc = dict(zip(files, (0.50, 0.53, 0.56, 0.60)))
    scored = []
    score = lambda w: scored.append(w) or acc[w]  # noqa: E731
    found, curve = script.first_reaching(files, score, 0.546)
    assert found == files[2] and scored == files[:3] and curve[-1] == (files[2], 0.56)
    assert script.step_of(found) == 12
    assert script.first_reaching(files, acc.get, 0.7) == (None, list(acc.items()))


def test_affine_paired_comparison_and_cached_fine_scores(tmp_path, monkeypatch):
    """scripts/robustness.py affine: the two chosen files compared image by image from their
    --predictions files; --fine scores each step file once, a re-run reads the cache."""
    from capsnet.evaluate import write_predictions
    script = _robustness_script()
    classes = [f"c{i}" for i in range(3)]
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    for arch, pred in (("capsnet", [0, 1, 2, 1, 1, 0]), ("baseline-cnn", [0, 2, 2, 0, 0, 0])):
        for dataset in script.AFFINE_SETS:
            lengths = torch.nn.functional.one_hot(torch.tensor(pred), 3).float()
            write_predictions(script.predictions(tmp_path, arch, dataset), lengths, labels,
                              classes)
    # capsnet right on 0,1,2,4; the CNN on 0,2,3: only capsnet on 1 and 4, only the CNN on 3
    vs = script.paired(tmp_path)
    assert set(vs) == set(script.AFFINE_SETS)
    assert all((v["gained"], v["lost"]) == (2, 1) and v["p_value"] == 1.0 for v in vs.values())
    scored = []
    monkeypatch.setattr(script, "evaluate",
                        lambda w, *a: scored.append(w.name) or {"accuracy": script.step_of(w) / 100})
    cache = tmp_path / "val-scores.json"
    files = [tmp_path / f"step-{s:06d}.safetensors" for s in (4, 8)]
    assert [script.cached_scores(cache)(w) for w in files] == [0.04, 0.08]
    assert [script.cached_scores(cache)(w) for w in files] == [0.04, 0.08]  # a re-run
    assert scored == [f.name for f in files]
