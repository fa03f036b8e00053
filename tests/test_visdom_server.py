"""The Visdom dashboard serves offline and draws plots pushed by the client."""

import pathlib
import socket

import numpy as np
import pytest
from PIL import Image

from browser import chromium_dump_dom, chromium_screenshot
from capsnet.errors import CapsnetError
from capsnet.visdom_server import serve
from conftest import start_visdom_server

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = "capsnet_test"
TITLES = ("capsnet loss", "capsnet heatmap")


@pytest.fixture
def server(tmp_path):
    port, stop = start_visdom_server(tmp_path)
    yield port
    stop()


def windows(dom: str) -> dict:
    """Map each dashboard window's title to its HTML."""
    found = {}
    for chunk in dom.split('class="react-grid-item')[1:]:
        for title in TITLES:
            if f'<div class="pull-right">{title}</div>' in chunk:
                found[title] = chunk
    return found


@pytest.mark.filterwarnings("ignore:The .warn. method is deprecated:DeprecationWarning")
def test_dashboard_draws_plots_offline(server, tmp_path, artifacts_dir):
    import visdom

    viz = visdom.Visdom(server="http://127.0.0.1", port=server, env=ENV,
                        raise_exceptions=True, use_incoming_socket=False)
    assert viz.check_connection(timeout_seconds=10)
    x = np.arange(20)
    viz.line(X=x, Y=np.exp(-x / 5.0), opts={"title": TITLES[0]})
    viz.heatmap(X=np.outer(np.arange(10), np.arange(10)), opts={"title": TITLES[1]})

    url = f"http://127.0.0.1:{server}/env/{ENV}"
    wins = windows(chromium_dump_dom(url, tmp_path))
    assert set(wins) == set(TITLES), f"windows in page: {sorted(wins)}"
    for title, html in wins.items():
        assert "js-plotly-plot" in html and "main-svg" in html, f"{title!r} not drawn by plotly"
    assert 'class="js-line"' in wins["capsnet loss"]
    assert "heatmaplayer" in wins["capsnet heatmap"]

    png = chromium_screenshot(url, artifacts_dir / "visdom_dashboard.png", tmp_path)
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == (1400, 1000)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50, "screenshot is (nearly) a single colour"
    assert max(n for n, _ in colours) < 0.95 * 1400 * 1000


def test_serve_reports_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(CapsnetError, match="already in use"):
            serve(port=port, env_path=str(tmp_path))
