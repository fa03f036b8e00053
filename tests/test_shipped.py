"""The shipped Fashion-MNIST model: loads by name, scores what the README says, to the image."""

import json
import re
from pathlib import Path

from capsnet.cli import main
from capsnet.shipped import SHIPPED, WEIGHTS_DIR

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_figure(lead: str) -> int:
    """The correct test images the README quotes after ``lead`` (e.g. 'The shipped model')."""
    m = re.search(re.escape(lead) + r" \(.{0,400}?\*\*[\d.]+%\*\* "
                  r"\(([\d,]+) of 10,000 test images\)", README.read_text(), re.S)
    assert m, f"README: no '{lead} (... **NN.NN%** (N of 10,000 test images)'"
    return int(m.group(1).replace(",", ""))


def test_shipped_weights_score_the_readme_figures(fashion_dir, capsys):
    """Both shipped files and their ensemble, on the full test set, to the image: one
    ensemble evaluation gives each member's accuracy alone and the ensemble's."""
    for name in ("fashion-mnist", "fashion-mnist-efficient"):
        assert (WEIGHTS_DIR / SHIPPED[name]).is_file()
    assert main(["evaluate", "fashion-mnist", "fashion-mnist-efficient", "--json",
                 "--data-dir", str(fashion_dir)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 10000
    capsnet, efficient = (round(a * 10000) for a in result["member_accuracy"])
    assert capsnet == readme_figure("The shipped model")
    assert efficient == readme_figure("The shipped Efficient-CapsNet")
    ensemble = sum(result["confusion"][i][i] for i in range(10))
    assert ensemble == readme_figure("The two shipped models as an ensemble")


def test_predict_without_a_model_uses_the_shipped_one(fashion_dir, tmp_path, capsys):
    from PIL import Image

    from capsnet.data import load_dataset
    _, test = load_dataset("fashion-mnist", fashion_dir)
    paths = []
    for i in range(20):
        path = tmp_path / f"{i}.png"
        Image.fromarray(test.images[i, 0].numpy()).save(path)
        paths.append(str(path))
    assert main(["predict", "--json", *paths]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in rows] == paths
    hits = sum(r["index"] == int(test.labels[i]) for i, r in enumerate(rows))
    assert hits >= 17  # a 93% model on 20 real test images
    assert rows[0]["class"] in ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    # --tta: the lengths evaluate --tta gives for the same images (uint8 in, as a PNG holds)
    import torch

    from capsnet.checkpoints import load_model
    from capsnet.inference import infer
    assert main(["predict", "--json", "--tta", "shift+hflip", *paths[:4]]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    model, _ = load_model("fashion-mnist")
    expected = infer(model, test.images[:4], test.labels[:4], tta="shift+hflip").lengths
    plain = infer(model, test.images[:4], test.labels[:4]).lengths
    assert torch.allclose(torch.tensor([r["lengths"] for r in rows]), expected, atol=1e-5)
    assert not torch.allclose(plain, expected, atol=1e-4)


def test_shipped_model_knows_its_runs_validation_split(fashion_dir, capsys):
    """The shipped file records its run's split, so the shipped model can be compared with a
    new run on the same validation images."""
    import torch

    from capsnet.checkpoints import load_model
    from capsnet.data.datamodule import ImageDataModule
    from capsnet.evaluate import evaluation_data
    model, meta = load_model("fashion-mnist")
    assert meta["val_size"] == 5000
    val = evaluation_data("fashion-mnist", model, meta, "val", data_dir=str(fashion_dir))
    dm = ImageDataModule("fashion-mnist", str(fashion_dir), val_size=5000)
    dm.setup("fit")
    assert torch.equal(val.images, dm.val.images) and torch.equal(val.labels, dm.val.labels)
    assert main(["evaluate", "fashion-mnist", "--split", "val", "--test-size", "500", "--json",
                 "--data-dir", str(fashion_dir)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 500 and result["split"] == "val" and result["accuracy"] > 0.88


def test_shipped_models_share_their_runs_split():
    """Both shipped files were trained on the same 55,000 images (the same validation
    split carved from the same pool), so their ensemble on `--split val` and their use as
    teachers of one run are honest."""
    from capsnet.checkpoints import load_model
    capsnet, meta = load_model("fashion-mnist")
    efficient, meta_e = load_model("fashion-mnist-efficient")
    assert meta_e["arch"] == "efficient-capsnet" and meta["arch"] == "capsnet"
    assert meta_e["val_size"] == meta["val_size"] == 5000
    assert meta_e["train_pool"] == meta["train_pool"]
    assert efficient.num_parameters() == 1_573_168
