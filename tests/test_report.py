"""`capsnet report`: the perturbation tools and the offline HTML page of a short real run."""

import html.parser
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from browser import chromium_dump_dom, chromium_screenshot
from capsnet.checkpoints import load_model
from capsnet.cli import main
from capsnet.data.datasets import load_dataset
from capsnet.report import (REPORT_FILES, dimension_effect, perturbation_grid,
                            perturbation_offsets, save_sweep_gif)


class _Images(html.parser.HTMLParser):
    """Collects <img src>, <script> tags and every href/src of a page."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.scripts = [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src"))
        if tag == "script":
            self.scripts += 1
        self.links += [v for k, v in attrs if k in ("src", "href") and v]


@pytest.fixture(scope="module")
def model_and_test(trained_run, fashion_dir):
    model, meta = load_model(trained_run / "last.ckpt")
    _, test = load_dataset("fashion-mnist", fashion_dir)
    return model, meta, test


@pytest.fixture(scope="module")
def report(trained_run, fashion_dir, tmp_path_factory):
    """The report of the shared short real run on 500 test images, and how long it took
    (written outside the run's folder, which other tests read at the same time)."""
    out = tmp_path_factory.mktemp("report")
    t0 = time.perf_counter()
    code = main(["report", str(trained_run), "--test-size", "500", "--out", str(out),
                 "--data-dir", str(fashion_dir)])
    seconds = time.perf_counter() - t0
    assert code == 0
    return out / "index.html", seconds


def test_offsets_are_the_papers():
    o = perturbation_offsets()
    assert o.shape == (11,)
    assert torch.allclose(o, torch.linspace(-0.25, 0.25, 11), atol=1e-7)
    assert o[5].item() == 0.0  # exact: the middle column is the plain reconstruction


def test_perturbation_grid(model_and_test):
    model, _, test = model_and_test
    x = test.images[0].float() / 255  # [1, 28, 28]
    grid = perturbation_grid(model, x)
    assert grid.shape == (16, 11, 1, 28, 28)  # [D, S, C, H, W]
    assert grid.min() >= 0 and grid.max() <= 1
    with torch.no_grad():
        plain = model(x.unsqueeze(0)).reconstructions[0]
    for d in range(16):  # offset 0 = the reconstruction, in every row
        torch.testing.assert_close(grid[d, 5], plain, atol=1e-5, rtol=0)
    # the ends of the sweep differ from the middle: the dimensions do something
    assert dimension_effect(grid).shape == (16,)
    assert dimension_effect(grid).max() > 1e-4
    # another capsule (target) decodes to something else
    other = perturbation_grid(model, x, target=int(model(x[None]).lengths.argmin()))
    assert not torch.allclose(other[:, 5], grid[:, 5])
    with pytest.raises(ValueError):
        perturbation_grid(model, torch.zeros(2, 1, 28, 28))


def test_sweep_gif(model_and_test, tmp_path):
    model, _, test = model_and_test
    dims = save_sweep_gif(model, test.images[1].float() / 255, tmp_path / "s.gif", top=2)
    assert len(dims) == 2
    with Image.open(tmp_path / "s.gif") as im:
        assert im.format == "GIF" and im.n_frames == 2 * 20  # 0 -> + -> - -> 0 per dimension
        assert im.info.get("loop") == 0  # forever


def test_report_files_and_page(report):
    index, seconds = report
    print(f"report on 500 test images: {seconds:.1f} s")
    assert index.is_file()
    page = index.read_text()
    p = _Images()
    p.feed(page)
    assert p.scripts == 0  # no JS
    assert not [u for u in p.links if "://" in u or u.startswith("//")]  # no CDN, offline
    assert sorted(p.images) == sorted(REPORT_FILES)
    for src in p.images:
        path = index.parent / src
        assert path.is_file(), src
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == ("GIF" if src.endswith(".gif") else "PNG"), src
            assert im.width > 100 and im.height > 100, src
            if im.format == "GIF":
                assert im.n_frames > 1
    for heading in ("Training curves", "Confusion matrix", "Reconstructions",
                    "Most confident mistakes", "Figure 4", "animated"):
        assert heading in page
    for name in ("T-shirt/top", "Trouser", "Ankle boot"):
        assert name in page  # the per-class table
    assert "test accuracy" in page and "%" in page
    acc, low, high = map(float, re.search(r"<span class=big>([\d.]+)%</span> \(95% interval "
                                          r"([\d.]+)%-([\d.]+)%", page).groups())
    assert low <= acc <= high and 4 < high - low < 10  # 500 test images: +-2.5 to 4.5 points


def test_perturbation_png_holds_16x11_tiles(report):
    """The Figure 4 panel: 16 rows x 11 columns of tiles, separated by grey gaps."""
    index, _ = report
    with Image.open(index.parent / "perturbation.png") as im:
        a = np.asarray(im.convert("L"), dtype=np.int16)
    # The first panel: find the runs of grey gap rows/columns (value 0.35 * 255 = 89).
    left = a[:, : a.shape[1] // 3]
    gap_rows = np.where((np.abs(left - 89) <= 1).mean(axis=1) > 0.6)[0]
    gap_cols = np.where((np.abs(left - 89) <= 1).mean(axis=0) > 0.6)[0]

    def runs(idx):
        return 0 if len(idx) == 0 else 1 + int((np.diff(idx) > 1).sum())

    assert runs(gap_rows) == 16 - 1
    assert runs(gap_cols) == 11 - 1


def test_chromium_renders_the_report(report, tmp_path):
    index, _ = report
    url = index.resolve().as_uri()
    dom = chromium_dump_dom(url, tmp_path)
    for src in REPORT_FILES:
        assert f'src="{src}"' in dom
    # Did Chromium decode every picture? A probe copy of the page reports naturalWidth.
    probe = index.parent / "_probe.html"
    probe.write_text(index.read_text().replace("</body>", """<script>
window.addEventListener('load', () => { for (const i of document.images)
  i.setAttribute('data-w', i.complete ? i.naturalWidth : -1); });
</script></body>"""))
    try:
        dom = chromium_dump_dom(probe.resolve().as_uri(), tmp_path)
    finally:
        probe.unlink()
    widths = [int(w) for w in re.findall(r'data-w="(-?\d+)"', dom)]
    assert len(widths) == len(REPORT_FILES) and min(widths) > 100, widths
    shot = chromium_screenshot(url, tmp_path / "report.png", tmp_path, size="1200,2400")
    with Image.open(shot) as im:
        a = np.asarray(im.convert("L"), dtype=np.float32)
    assert a.std() > 20  # not a blank page
    assert (a < 128).mean() > 0.02  # dark pixels: text and the figures


def test_bad_run_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err
    assert main(["report", str(tmp_path)]) == 2  # a folder, but no run
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a capsnet run directory" in err
    (tmp_path / "config.yaml").write_text("dataset: fashion-mnist\n")
    (tmp_path / "best.ckpt").write_bytes(b"not a checkpoint")
    assert main(["report", str(tmp_path)]) == 2  # unreadable checkpoint
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "best.ckpt" in err
    assert main(["report", str(tmp_path), "--checkpoint", "last"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_bad_run_dir_real_command(tmp_path):
    exe = pathlib.Path(sys.executable).with_name("capsnet")
    done = subprocess.run([str(exe), "report", str(tmp_path / "nope")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("capsnet: error:")
    assert done.stdout == ""


def test_page_agrees_with_evaluate(report, trained_run, fashion_dir, capsys):
    """The page's accuracy, per-class counts (the confusion diagonal) and the mistakes it
    lists are those `capsnet evaluate` computes for the same checkpoint and images."""
    import json
    import re
    page = report[0].read_text()
    assert main(["evaluate", str(trained_run / "best.ckpt"), "--test-size", "500", "--json",
                 "--data-dir", str(fashion_dir)]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert f"{100 * ev['accuracy']:.1f}%</span>" in page
    assert f"{ev['loss']:.4f}" in page  # the same loss, with the run's reconstruction weight
    rows = re.findall(r"<tr><td>([^<]+)</td><td class=num>(\d+)</td><td class=num>(\d+)</td>",
                      page)
    assert len(rows) == 10
    for i, (name, n, correct) in enumerate(rows):
        assert html.unescape(name) == ev["classes"][i]
        assert int(n) == sum(ev["confusion"][i]) and int(correct) == ev["confusion"][i][i]
    classes = ev["classes"]
    mistakes = re.findall(r"<tr><td class=num>(\d+)</td><td>([^<]+)</td><td>([^<]+)</td>", page)
    assert mistakes, "the page lists mistakes"
    for idx, true, pred in mistakes:
        t, p = classes.index(html.unescape(true)), classes.index(html.unescape(pred))
        assert t != p and ev["confusion"][t][p] > 0
        _, test = load_dataset("fashion-mnist", fashion_dir)
        assert int(test.labels[int(idx)]) == t


def test_report_of_a_model_alone(trained_run, tmp_path, fashion_dir):
    st = tmp_path / "m.safetensors"
    assert main(["export", str(trained_run / "best.ckpt"), str(st)]) == 0
    out = tmp_path / "page"
    assert main(["report", str(st), "--out", str(out), "--test-size", "200",
                 "--data-dir", str(fashion_dir)]) == 0
    page = (out / "index.html").read_text()
    assert "m.safetensors" in page and "Figure 4" in page


def test_report_of_a_stereo_model(tmp_path):
    """smallNORB's images have two channels (a stereo pair), which no picture format has:
    the report and the dashboards show the two side by side as grey images."""
    from test_readers import write_norb

    from capsnet.dashboards import recon_grid
    from capsnet.data.smallnorb import CLASSES
    from capsnet.models import build_model
    from capsnet.weights import save_weights
    folder, _ = write_norb(tmp_path / "norb", n=10)
    model = build_model("capsnet", {"conv_channels": 8, "primary_types": 2, "in_channels": 2,
                                    "image_size": 32, "num_classes": 5})
    save_weights(model, weights := tmp_path / "norb.safetensors",
                 {"classes": list(CLASSES), "dataset": "smallnorb"})
    out = tmp_path / "page"
    assert main(["report", str(weights), "--data-dir", str(folder), "--out", str(out)]) == 0
    assert "Figure 4" in (out / "index.html").read_text()
    assert recon_grid(torch.rand(4, 2, 32, 32), torch.rand(4, 2, 32, 32)).shape[0] == 3
    from capsnet.plots import perturbation_panels
    ax = perturbation_panels(torch.zeros(1, 3, 4, 2, 8, 8), ["x"], torch.zeros(4)).axes[0]
    assert ax.images[0].get_array().shape == (3 * 8 + 2 * 2, 4 * 16 + 3 * 2)
    assert list(ax.get_xticks()) == [k * 18 + 7.5 for k in range(4)]  # tile centres, 16 wide


def test_a_report_leaves_no_earlier_report_picture(tmp_path, fashion_dir):
    """A folder that held a report of pairs: its pictures go (the new page must not sit
    beside them as if they were its own), a file of the user's stays, and a page of the
    user's is never replaced."""
    from capsnet.data.registry import FASHION_CLASSES
    from capsnet.models import build_model
    from capsnet.report.pairs import PAIR_FILES
    from capsnet.weights import save_weights
    save_weights(build_model("capsnet", {"conv_channels": 8, "primary_types": 2}),
                 weights := tmp_path / "m.safetensors",
                 {"classes": list(FASHION_CLASSES), "dataset": "fashion-mnist"})
    out = tmp_path / "page"
    out.mkdir()
    for name in (*PAIR_FILES, "notes.txt"):
        (out / name).write_text("earlier")
    # without the page they belong to, those pictures may be the user's: refused
    code = main(["report", str(weights), "--test-size", "20", "--data-dir", str(fashion_dir),
                 "--out", str(out)])
    assert code == 2 and all((out / name).read_text() == "earlier" for name in PAIR_FILES)
    (out / "index.html").write_text('<meta name="generator" content="capsnet report">')
    assert main(["report", str(weights), "--test-size", "20", "--data-dir", str(fashion_dir),
                 "--out", str(out)]) == 0
    assert not any((out / name).exists() for name in PAIR_FILES)
    assert (out / "notes.txt").read_text() == "earlier"
    assert main(["report", str(weights), "--test-size", "20", "--data-dir", str(fashion_dir),
                 "--out", str(out)]) == 0  # its own page is replaced
    # a user's own page is not: one line, and the folder as it was
    mine = tmp_path / "site"
    mine.mkdir()
    (mine / "index.html").write_text("<html>my page</html>")
    code = main(["report", str(weights), "--test-size", "20", "--data-dir", str(fashion_dir),
                 "--out", str(mine)])
    assert code == 2 and (mine / "index.html").read_text() == "<html>my page</html>"
    assert [p.name for p in mine.iterdir()] == ["index.html"]


def test_an_interrupted_report_is_replaced_by_the_next(tmp_path, fashion_dir, monkeypatch):
    """A report stopped while it draws (Ctrl-C, a killed job) leaves its pictures beside
    an unfinished capsnet page, not beside nothing: the next report replaces them instead of
    refusing them as a user's files."""
    from capsnet import plots
    from capsnet.data.registry import FASHION_CLASSES
    from capsnet.models import build_model
    from capsnet.weights import save_weights
    save_weights(build_model("capsnet", {"conv_channels": 8, "primary_types": 2}),
                 weights := tmp_path / "m.safetensors",
                 {"classes": list(FASHION_CLASSES), "dataset": "fashion-mnist"})
    out = tmp_path / "page"
    args = ["report", str(weights), "--test-size", "20", "--data-dir", str(fashion_dir),
            "--out", str(out)]

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(plots, "mistakes", interrupted)  # after curves, confusion, per-class
        assert main(args) == 130  # "capsnet: interrupted"
    assert (out / "curves.png").is_file() and not (out / "mistakes.png").exists()
    assert "Unfinished report" in (out / "index.html").read_text()
    assert main(args) == 0
    page = (out / "index.html").read_text()
    assert "Unfinished" not in page and (out / "mistakes.png").is_file()


def test_a_damaged_metrics_csv_is_one_line(tmp_path):
    """A run's metrics.csv edited by hand or damaged: one line naming it (report, resume
    and the scripts read it), not a ValueError or UnicodeDecodeError."""
    from capsnet.errors import CapsnetError
    from capsnet.metrics import read_metrics
    path = tmp_path / "metrics.csv"
    for content in (b"epoch,val_acc\n0,abc\n", b"\xc6\x00\xff garbage", b"epoch,val_acc\n0,1,2\n"):
        path.write_bytes(content)
        with pytest.raises(CapsnetError, match="not a readable metrics.csv"):
            read_metrics(path)
    path.write_text("epoch,val_acc\n0,0.5\n1,\n")
    assert read_metrics(path) == [{"epoch": 0, "val_acc": 0.5}, {"epoch": 1}]
