"""Headless Chromium helpers for tests that look at a page as a person would.

Chromium is run with a fresh profile, no background traffic, and every host
except the loopback one mapped to "not found", so pages must work offline.
A missing browser raises RuntimeError: tests that need it fail, not skip.
"""

import os
import shutil
import subprocess
import tempfile

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
    "--virtual-time-budget=10000",
]


def chromium_path() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        raise RuntimeError("chromium is not installed (apt-get install -y chromium)")
    return path


def _run_chromium(args: list, tmp_dir, timeout: float = 60) -> str:
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_dir)
    cmd = [chromium_path(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def chromium_dump_dom(url: str, tmp_dir) -> str:
    """The page's DOM after its scripts ran (up to 10 s of virtual time)."""
    return _run_chromium(["--dump-dom", url], tmp_dir)


def chromium_screenshot(url: str, png_path, tmp_dir, size: str = "1400,1000") -> str:
    """Save a PNG screenshot of the page to png_path and return that path."""
    png_path = os.fspath(png_path)
    if os.path.exists(png_path):
        os.remove(png_path)
    _run_chromium([f"--screenshot={png_path}", f"--window-size={size}", url], tmp_dir)
    if not os.path.isfile(png_path):
        raise RuntimeError(f"chromium wrote no screenshot to {png_path}")
    return png_path
