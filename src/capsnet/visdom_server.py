"""Run the Visdom dashboard server offline, bound to one address.

The server's JS/CSS normally come from CDNs on first start; ``make setup``
(scripts/visdom_assets.sh) installs them from npm instead, and ``serve`` refuses
to start without them rather than showing a blank page.
"""

import asyncio
import errno
import logging
import os
import re
import time
import urllib.error
import urllib.request

from capsnet.errors import CapsnetError


def _missing_assets(visdom) -> list:
    """Static files the page loads (per index.html) that are absent, plus a stale build stamp."""
    static = os.path.join(os.path.dirname(visdom.__file__), "static")
    with open(os.path.join(static, "index.html")) as f:
        wanted = re.findall(r"""static_url\(\s*["']([^"']+)["']""", f.read())
    missing = [p for p in wanted
               if not p.startswith("..") and not os.path.isfile(os.path.join(static, p))]
    try:
        with open(os.path.join(static, "version.built")) as f:
            built = f.read().strip()
    except OSError:
        built = None
    if built != visdom.__version__:
        missing.append("version.built")
    return missing


def serve(host: str = "127.0.0.1", port: int = 8097, env_path: str | None = None) -> None:
    """Serve the dashboard on http://host:port/ in the foreground until interrupted.

    env_path is where environments are saved (visdom's default ``~/.visdom/`` when None).
    Login is disabled, so bind to a non-local address only on a trusted network.
    """
    try:
        import tornado.web
        import visdom
        from visdom.server import app as visdom_app
        from visdom.server.defaults import DEFAULT_ENV_PATH
    except ImportError as exc:
        raise CapsnetError(f"visdom is not installed ({exc}); run `make setup`") from exc
    missing = _missing_assets(visdom)
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise CapsnetError(f"visdom's web assets are missing ({shown}); run `make setup`")

    class StaticFiles(tornado.web.StaticFileHandler):
        @classmethod
        def make_static_url(cls, settings, path, include_version=True):
            # index.html links "../user/style.css" (served by visdom's /user/ handler);
            # tornado >= 6.5 refuses to hash a file outside static/ and the page 403s.
            if path.startswith("../"):
                return settings.get("static_url_prefix", "/static/") + path
            return super().make_static_url(settings, path, include_version)

    # visdom passes this module-level dict to tornado; it turns on debug, whose
    # autoreload would restart the server whenever an imported .py file changes.
    visdom_app.tornado_settings.update(static_handler_class=StaticFiles, autoreload=False)
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("tornado.access").setLevel(logging.WARNING)

    async def run() -> None:
        app = visdom_app.Application(
            port=port, base_url="", env_path=env_path or DEFAULT_ENV_PATH, user_credential=None
        )
        try:
            app.listen(port, address=host, max_buffer_size=1024**3)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CapsnetError(f"port {port} on {host} is already in use") from exc
            raise CapsnetError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        print(f"Visdom dashboard: http://{host}:{port}/", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


def wait_until_up(host: str = "127.0.0.1", port: int = 8097, timeout: float = 30.0) -> bool:
    """Poll http://host:port/ until it answers (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/", timeout=2):
                return True
        except urllib.error.HTTPError:  # an error page still means the server answers
            return True
        except (urllib.error.URLError, OSError):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
