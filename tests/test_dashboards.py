"""Live dashboards: a real short training streams to Visdom (checked in headless Chromium),
keeps going without a server, and writes reconstruction images to TensorBoard."""

import re

import numpy as np
import pytest
from PIL import Image

from browser import chromium_dump_dom, chromium_screenshot
from capsnet.cli import main
from conftest import free_port

ENV = "capsnet_training_test"
NOTICE = "not reachable; training continues without the dashboard"
# Window titles the dashboard must show, and what each must contain once drawn.
WINDOWS = {"loss (total and margin part)": 'class="js-line"',
           "reconstruction error (sum of squares per image)": 'class="js-line"',
           "accuracy": 'class="js-line"',
           "learning rate": 'class="js-line"',
           "test confusion matrix": "heatmaplayer",
           "test reconstructions": 'src="data:image/png;base64,'}

pytestmark = pytest.mark.filterwarnings(
    "ignore:The .warn. method is deprecated:DeprecationWarning")


def train_args(out, *extra) -> list:
    return ["train", "--train-size", "512", "--val-size", "128", "--test-size", "256",
            "--epochs", "2", "--batch-size", "64", "--out", str(out), "--no-progress",
            "--log-every", "2", *extra]


@pytest.fixture(scope="module")
def visdom_run(visdom_port, fashion_dir, tmp_path_factory):
    """A short real training run streamed to the module's Visdom server (env ENV)."""
    out = tmp_path_factory.mktemp("dash") / "run"
    assert main(train_args(out, "--visdom", "--visdom-port", str(visdom_port),
                           "--visdom-env", ENV, "--data-dir", str(fashion_dir))) == 0
    return out


def windows(dom: str) -> dict:
    """Each dashboard window's title -> its HTML."""
    found = {}
    for chunk in dom.split('class="react-grid-item')[1:]:
        m = re.search(r'<div class="pull-right">([^<]*)</div>', chunk)
        if m:
            found[m.group(1)] = chunk
    return found


def test_visdom_dashboard_renders_in_browser(visdom_run, visdom_port, fashion_dir, tmp_path,
                                            artifacts_dir):
    url = f"http://127.0.0.1:{visdom_port}/env/{ENV}"
    wins = windows(chromium_dump_dom(url, tmp_path))
    assert set(WINDOWS) <= set(wins), f"windows in page: {sorted(wins)}"
    for title, drawn in WINDOWS.items():
        assert drawn in wins[title], f"{title!r} is not drawn"
        if drawn != WINDOWS["test reconstructions"]:
            assert "main-svg" in wins[title], f"{title!r} has no plotly svg"
    # Train traces every --log-every steps plus per-epoch train and test points.
    loss = wins["loss (total and margin part)"]
    for trace in ("train loss", "train margin", "test loss", "test margin"):
        assert f">{trace}<" in loss, f"no {trace!r} trace in the loss plot"
    for name in ("T-shirt/top", "Ankle boot"):  # class names on the confusion axes
        assert f">{name}<" in wins["test confusion matrix"]
    png = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', wins["test reconstructions"])
    assert png and len(png.group(1)) > 5000, "reconstruction grid image is missing or tiny"

    shot = chromium_screenshot(url, artifacts_dir / "visdom_training.png", tmp_path)
    with Image.open(shot) as img:
        assert img.format == "PNG" and img.size == (1400, 1000)
        pixels = np.asarray(img.convert("RGB"))
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 200, "screenshot has almost no colours: nothing drawn"
    # The plots (white panes) cover a good part of the page, not just the blue background.
    white = (pixels > 245).all(axis=2).mean()
    assert white > 0.2, f"only {white:.0%} of the screenshot is plot area"


def test_tensorboard_gets_reconstruction_images(visdom_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(visdom_run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert "test/reconstructions" in acc.Tags()["images"]
    events = acc.Images("test/reconstructions")
    assert len(events) == 2, "one reconstruction grid per epoch"
    assert events[0].width > 4 * 28 and events[0].height > 2 * 28
    assert {"train/loss_step", "test/loss", "test/acc"} <= set(acc.Tags()["scalars"])


def test_training_continues_without_visdom_server(fashion_dir, tmp_path, capsys):
    port = free_port()  # nothing listens there
    args = ["train", "--train-size", "64", "--val-size", "0", "--test-size", "64", "--epochs", "1",
            "--batch-size", "32", "--no-tensorboard", "--no-progress", "--log-every", "1",
            "--visdom", "--visdom-port", str(port), "--data-dir", str(fashion_dir),
            "--out", str(tmp_path / "run")]
    assert main(args) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    line = f"capsnet: Visdom server at http://127.0.0.1:{port} {NOTICE}"
    assert text.count(NOTICE) == 1 and line in text.splitlines(), text
    assert "lost the Visdom server" not in text
    assert (tmp_path / "run" / "last.ckpt").is_file()


def test_server_going_away_is_reported_once(visdom_port, capsys):
    """A client that loses its server mid-run: one notice, then the dashboard stays quiet."""
    from capsnet.dashboards import EvalSamples, VisdomDashboard, _connect
    dash = VisdomDashboard(EvalSamples(2), ["a", "b"], port=visdom_port, env=ENV + "_gone")
    dash.vis = _connect(dash.server, visdom_port, dash.env)
    dash._point("loss", "train loss", 1, 0.5)  # works while the server is there
    dash.vis.port = free_port()  # the server is gone: connections are refused
    for step in (2, 3):
        dash._point("loss", "train loss", step, 0.4)
    assert dash.vis is None
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, (out, err)
    assert err.startswith(f"capsnet: lost the Visdom server at {dash.url} (ConnectionError); "
                          "training continues without the dashboard"), err


def test_confusion_sums_every_process_share():
    """Under DDP each process evaluates its own share of the test set; the dashboards'
    confusion matrix is the sum over the processes (a reduce that every rank runs)."""
    from types import SimpleNamespace

    import torch

    from capsnet.dashboards import EvalSamples
    shares = [(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0])),  # (true, predicted)
              (torch.tensor([2, 2]), torch.tensor([2, 1]))]
    ranks = [EvalSamples(num_classes=3) for _ in shares]
    for samples, (true, pred) in zip(ranks, shares):
        samples.targets, samples.preds = [true], [pred]
    local = [s.local_confusion() for s in ranks]
    total = sum(local)
    for k, samples in enumerate(ranks):
        reduce = lambda t, reduce_op: t + local[1 - k]  # noqa: E731 - the other rank's share
        trainer = SimpleNamespace(sanity_checking=False, world_size=2,
                                  strategy=SimpleNamespace(reduce=reduce))
        samples.on_validation_epoch_end(trainer, SimpleNamespace(device="cpu"))
        assert (samples.confusion() == total.numpy()).all()
    assert total.sum() == 5 and total[2, 1] == 1 and total[1, 0] == 1
    one = EvalSamples(num_classes=3)  # one process: its own counts
    one.targets, one.preds = [shares[0][0]], [shares[0][1]]
    one.on_validation_epoch_end(SimpleNamespace(sanity_checking=False, world_size=1), None)
    assert (one.confusion() == local[0].numpy()).all()
