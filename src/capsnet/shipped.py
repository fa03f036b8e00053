"""Which models ship with capsnet, and how a model argument names a file.

No torch import here: the commands check their model or run argument with these functions
before importing torch, so a mistyped path is a one-line error in milliseconds, not after the
seconds torch takes to load.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CapsnetError

WEIGHTS_DIR = Path(__file__).parent / "weights"
# name -> file in WEIGHTS_DIR; `capsnet predict IMAGE` without a model uses DEFAULT_MODEL,
# the paper's CapsNet. Efficient-CapsNet ships beside it, trained on the same 55,000 images,
# so that the two can be evaluated as an ensemble or used as teachers without retraining.
SHIPPED = {"fashion-mnist": "fashion-mnist.safetensors",
           "fashion-mnist-efficient": "fashion-mnist-efficient.safetensors"}
DEFAULT_MODEL = "fashion-mnist"


def resolve(spec: str | Path) -> Path:
    """A shipped model's name or a path -> the file to load (one-line error if none)."""
    if str(spec) in SHIPPED:
        path = WEIGHTS_DIR / SHIPPED[str(spec)]
        if not path.is_file():
            raise CapsnetError(f"shipped model {spec!r}: {path} is missing from this install")
        return path
    if not str(spec).strip():  # Path("") is the current folder
        raise CapsnetError(f"an empty model name; give a weights file, a checkpoint or a "
                           f"shipped model's name ({', '.join(SHIPPED)})")
    path = Path(spec)
    if not path.exists():
        raise CapsnetError(f"{spec}: no such file, and not a shipped model (shipped: "
                           f"{', '.join(SHIPPED)})")
    if path.is_dir():
        raise CapsnetError(f"{spec}: is a folder; give a weights file, a checkpoint or a "
                           f"shipped model's name ({', '.join(SHIPPED)})")
    return path


def check_run_or_model(spec: str | Path) -> None:
    """One-line error unless ``spec`` is a run folder, a file or a shipped model's name
    (what `capsnet report` accepts)."""
    path = Path(spec)
    if not (path.is_dir() or path.is_file() or str(spec) in SHIPPED):
        raise CapsnetError(f"{spec}: no such run directory, weights file or shipped model "
                           f"({', '.join(SHIPPED)})")
