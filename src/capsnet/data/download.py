"""Downloads: a file from the first mirror that delivers it, checksum-verified, moved into place
atomically; a folder a failed download created is removed again; safe tar extraction.

The network call is :func:`_urlopen` alone (tests replace it, or ``urllib.request.urlopen``
which it calls), so everything else here runs in the tests: temporary files, checksums,
renames, clean-up.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from ..errors import CapsnetError

DEFAULT_TIMEOUT = 30.0  # seconds without data before a mirror counts as unreachable


def _urlopen(url: str, timeout: float):
    """The one network call: a readable, closable response for ``url``."""
    return urllib.request.urlopen(url, timeout=timeout)


def file_digest(path: str | Path, algorithm: str = "md5") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _matches(path: Path, md5: str | None, sha256: str | None) -> bool:
    if sha256 is not None:
        return file_digest(path, "sha256") == sha256.lower()
    return file_digest(path, "md5") == md5.lower()


def fetch(urls: str | Sequence[str], dest: str | Path, md5: str | None = None,
          timeout: float = DEFAULT_TIMEOUT, *, sha256: str | None = None) -> Path:
    """Download ``dest`` from the first of ``urls`` (mirrors, tried in order) that delivers
    a file with the expected checksum (``md5`` or ``sha256``, one of them required).

    The bytes go to a temporary ``.<name>.*.part`` file in ``dest``'s folder, which is
    renamed onto ``dest`` (``os.replace``, atomic) only once its checksum matches, so
    ``dest`` is either absent or complete and verified. A ``dest`` that already holds the
    right bytes is kept without a download. The folder must exist. Raises
    :class:`CapsnetError` (one line: each mirror's failure) when no mirror delivers.
    """
    if md5 is None and sha256 is None:
        raise ValueError("fetch needs an md5 or a sha256 checksum")
    dest = Path(dest)
    urls = [urls] if isinstance(urls, str) else list(urls)
    if dest.is_file() and _matches(dest, md5, sha256):
        return dest
    errors = []
    for url in urls:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, _urlopen(url, timeout) as response:
                shutil.copyfileobj(response, out, 1 << 20)
            if not _matches(Path(tmp), md5, sha256):
                errors.append(f"{url}: checksum mismatch")
                continue
            os.replace(tmp, dest)
            return dest
        except (OSError, http.client.HTTPException, ValueError) as e:
            errors.append(f"{url}: {getattr(e, 'reason', None) or e}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise CapsnetError(f"could not download {dest.name}: " + "; ".join(errors))


@contextlib.contextmanager
def new_folder(target: str | Path) -> Iterator[Path]:
    """Create ``target`` (and missing parents) for a download; if the block fails, remove the
    folders this created, so a mistyped ``--data-dir`` leaves nothing behind. Folders that
    existed before are never removed."""
    target = Path(target)
    top = None  # the outermost folder this call creates
    for p in (target, *target.parents):
        if p.exists():
            break
        top = p
    target.mkdir(parents=True, exist_ok=True)
    try:
        yield target
    except BaseException:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        raise


def extract_members(archive: str | Path, target: str | Path, members: Iterable[str]) -> None:
    """Extract exactly ``members`` (regular files, paths inside the archive) of a tar archive
    into ``target``, keeping their relative paths.

    Nothing else in the archive is touched; extraction uses ``filter="data"`` (no absolute
    paths, links or devices; on Pythons without it the member's bytes are copied to the
    expected name) into a temporary folder inside ``target``, whose top-level
    entries are then renamed into place, so a failed extraction leaves no partial folder.
    Raises :class:`CapsnetError` naming the archive when it is unreadable or lacks a member.
    """
    archive, target = Path(archive), Path(target)
    tmp = Path(tempfile.mkdtemp(dir=target, prefix=".extract."))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                by_name = {m.name.removeprefix("./"): m for m in tar.getmembers()}
                for name in members:
                    m = by_name.get(name)
                    if m is None or not m.isfile():
                        raise CapsnetError(f"{archive}: the archive has no file {name}")
                    if hasattr(tarfile, "data_filter"):
                        tar.extract(m, tmp, filter="data")
                    else:  # Python < 3.10.12 / 3.11.4: write the regular file ourselves
                        out = tmp / name
                        out.parent.mkdir(parents=True, exist_ok=True)
                        with tar.extractfile(m) as src, open(out, "wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 20)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise CapsnetError(f"{archive}: cannot extract ({e})") from None
        for entry in sorted(tmp.iterdir()):
            try:
                os.replace(entry, target / entry.name)
            except OSError as e:
                raise CapsnetError(f"{target / entry.name}: cannot move the extracted files "
                                   f"into place ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
