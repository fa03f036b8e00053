"""Shared fixtures: the real Fashion-MNIST files and one short real training run."""

import os
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

def _fashion_dir() -> pathlib.Path:
    """Where the suite finds the real files: ``$CAPSNET_DATA`` (the folder or its
    ``fashion-mnist/``), as capsnet itself looks, else the Debian package's folder."""
    env = os.environ.get("CAPSNET_DATA")
    for d in ([pathlib.Path(env), pathlib.Path(env) / "fashion-mnist"] if env else []):
        if (d / "train-images-idx3-ubyte.gz").is_file():
            return d
    return pathlib.Path("/usr/share/datasets/fashion-mnist")


if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each,
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # set before torch is imported (and for the
    # commands the tests start); two threads each would oversubscribe the cores.

ROOT = pathlib.Path(__file__).resolve().parents[1]  # the repository
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))  # the shipped recipes
FASHION_DIR = _fashion_dir()

# A short real run: 1 epoch on the first 4,096 real training images, tested on 1,000 real
# test images. Shared by every end-to-end test (train, evaluate, predict, resume, report).
TINY_RUN_FLAGS = ["--train-size", "4096", "--val-size", "500", "--test-size", "1000",
                  "--epochs", "1",
                  "--batch-size", "64", "--lr", "0.002", "--seed", "1", "--no-progress",
                  "--log-every", "8"]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """Under pytest-xdist, the tests that use the shared short run come first (otherwise in
    their order). ``--dist worksteal`` hands each worker a contiguous half of the list, so
    one worker trains the run and then uses it while the other works through the rest,
    instead of waiting for the run in a fixture. (``--dist loadgroup`` would say this with
    marks, but with pytest 9.2 it ignores them: pytest-xdist issue #1386.)"""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: "trained_run" not in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def fashion_dir():
    assert (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(), (
        "real Fashion-MNIST missing: `make setup` installs dataset-fashion-mnist")
    return FASHION_DIR


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, fashion_dir):
    """Directory of a finished short real run (last.ckpt, best.ckpt, metrics.csv, ...).

    Tests only read it (or copy it). Under pytest-xdist (``make test`` runs two workers) the
    workers share one run: the first to ask trains it while holding a file lock, the other
    waits and reuses it (the pattern of pytest-xdist's documentation)."""
    import shutil

    from filelock import FileLock

    from capsnet.cli import main
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this session's folder, common to its workers
    out, done = root / "tiny-run", root / "tiny-run.done"
    with FileLock(str(root / "tiny-run.lock")):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # a failed earlier attempt
            assert main(["train", *TINY_RUN_FLAGS, "--data-dir", str(fashion_dir),
                         "--out", str(out)]) == 0
            done.touch()
    return out


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory):
    """Where tests keep screenshots to look at: ``$CAPSNET_TEST_ARTIFACTS`` if set, else a
    temporary folder (never the source tree)."""
    env = os.environ.get("CAPSNET_TEST_ARTIFACTS")
    path = pathlib.Path(env) if env else tmp_path_factory.mktemp("artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def one_line_error(code, err) -> bool:
    """A command failed the way bad input must: exit code 2 and one line, no traceback."""
    return code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def exports_agree(ckpt, tmp_path, capsys, fashion_dir) -> None:
    """``capsnet export`` of a training checkpoint to safetensors and on to ONNX: the weights
    file evaluates exactly like the checkpoint; ONNX Runtime on real test images gives the
    same classes, and lengths and poses within 1e-4, at any batch size."""
    import json

    import numpy as np
    import onnxruntime as ort
    import torch

    from capsnet.checkpoints import load_model
    from capsnet.cli import main
    from capsnet.data import load_dataset, to_unit
    st = tmp_path / "m.safetensors"
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(ckpt), str(st)]) == 0
    assert main(["export", str(st), str(onnx_path)]) == 0
    capsys.readouterr()
    results = []
    for spec in (ckpt, st):
        assert main(["evaluate", str(spec), "--json", "--test-size", "500",
                     "--data-dir", str(fashion_dir)]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["accuracy"] == results[1]["accuracy"]
    assert results[0]["confusion"] == results[1]["confusion"]
    model, _ = load_model(st)
    _, test = load_dataset("fashion-mnist", fashion_dir)
    x = to_unit(test.images[:64])
    with torch.inference_mode():
        out = model(x)
    session = ort.InferenceSession(str(onnx_path))
    lengths, poses = session.run(None, {"images": x.numpy()})
    assert np.abs(lengths - out.lengths.numpy()).max() < 1e-4
    assert np.abs(poses - out.poses.numpy()).max() < 1e-4
    assert (lengths.argmax(1) == out.lengths.argmax(1).numpy()).all()
    assert session.run(None, {"images": x[:1].numpy()})[0].shape == (1, 10)  # dynamic batch


def free_port() -> int:
    """A loopback TCP port nothing listens on (at the time of asking)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_visdom_server(tmp_dir):
    """Start ``capsnet.visdom_server.serve`` in a subprocess on a free port.

    Returns ``(port, stop)``; ``stop()`` ends the process. Fails the test if the server does
    not answer within 30 s (with its log in the message).
    """
    import os
    import subprocess
    import time

    from capsnet.visdom_server import wait_until_up

    tmp_dir = pathlib.Path(tmp_dir)
    port = free_port()
    code = ("from capsnet.visdom_server import serve; "
            f"serve(port={port}, env_path={str(tmp_dir / 'envs')!r})")
    path = [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))
    log = open(tmp_dir / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log,
                            stderr=subprocess.STDOUT, env=env)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()

    deadline = time.monotonic() + 30
    while not wait_until_up("127.0.0.1", port, timeout=0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            text = log.read()
            stop()
            pytest.fail(f"visdom server did not come up:\n{text}")
    return port, stop


@pytest.fixture(scope="module")
def visdom_port(tmp_path_factory):
    """Port of a Visdom server (``capsnet.visdom_server.serve``) running for the module."""
    port, stop = start_visdom_server(tmp_path_factory.mktemp("visdom"))
    yield port
    stop()


def load_script(name: str):
    """``scripts/NAME.py`` as a module (the scripts are not a package)."""
    import importlib.util
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
