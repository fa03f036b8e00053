"""Checkpoints that are written atomically and read without executing any code.

Writing: to a temporary file in the same folder, flushed to disk, then renamed over the
target, so a run killed at any moment leaves either the old or the new checkpoint, never a
partial one. Reading: ``torch.load(weights_only=True)``, PyTorch's restricted unpickler that
accepts only tensors and plain containers; anything else is refused with a one-line error.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CapsnetError, first_line


def non_finite(state: dict) -> str | None:
    """The name of the first floating-point tensor of ``state`` holding NaN or infinity."""
    return next((k for k, v in state.items()
                 if v.is_floating_point() and not bool(v.isfinite().all())), None)


def refuse_non_finite(state: dict, path: str | Path) -> None:
    """One-line error when a floating-point tensor of ``state`` holds NaN or infinity: a
    diverged model is never written over good weights (checkpoints and weights files)."""
    bad = non_finite(state)
    if bad is not None:
        raise CapsnetError(f"{path}: not saved, the weights are not finite ({bad})")


def output_file(path: str | Path, ours, what: str) -> Path:
    """The file a command is told to write (``--predictions``, ``export``'s output), after
    refusing in one line what writing there would destroy or could not do: an empty name,
    a folder, a device or pipe (a file is written beside it and renamed over it), a path
    through a file, and an existing file for which ``ours(path)`` is false (not ``what``,
    e.g. the model being evaluated given as the CSV). A link is followed, not replaced."""
    if not str(path).strip():
        raise CapsnetError("an empty output file name")
    target = Path(os.path.realpath(path))
    folder = next(p for p in target.parents if p.exists())  # "/" exists
    if not folder.is_dir():
        raise CapsnetError(f"{path}: {folder} is a file, not a folder")
    if target.is_dir():
        raise CapsnetError(f"{path}: a folder, not a file name")
    if target.exists():
        if not target.is_file():
            raise CapsnetError(f"{path}: not a regular file (a device or a pipe); give a "
                               "file's name")
        if not ours(target):
            raise CapsnetError(f"{path} is not {what} and would be replaced; choose another "
                               "name or move the file")
    return target


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    except OSError as e:  # name the file asked for, not the temporary one
        why = "a file is in the way of its folder" if isinstance(e, FileExistsError) else e.strerror
        raise OSError(e.errno, why, str(path)) from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the file private
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:  # a failed write names no file: name the one being written
            raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def safe_load(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint file as plain data; one-line :class:`CapsnetError` on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CapsnetError(f"{path}: no such checkpoint file")
    try:  # is_zipfile says False for a file it cannot open: say why instead
        open(path, "rb").close()
    except OSError as e:
        raise CapsnetError(f"{path}: cannot read ({e.strerror})") from None
    if not zipfile.is_zipfile(path):  # every torch.save since PyTorch 1.6 writes a zip archive
        raise CapsnetError(f"{path}: not a readable checkpoint (not a PyTorch checkpoint file)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CapsnetError(f"{path}: refused to load (it holds more than plain tensors and "
                           f"data: {_refusal_reason(str(e))})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CapsnetError(f"{path}: not a readable checkpoint ({first_line(e)[:200]})"
                           ) from None
    if not isinstance(ckpt, dict):
        raise CapsnetError(f"{path}: not a capsnet checkpoint (holds a {type(ckpt).__name__})")
    return ckpt


def _refusal_reason(message: str) -> str:
    """The line of PyTorch's weights-only refusal that names what was refused."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    for line in message.splitlines():
        line = line.strip()
        if line and not line.startswith(boilerplate):
            return line[:200]
    return "unpickling refused"


def load_checkpoint_model(path: str | Path, device: str | torch.device = "cpu"
                          ) -> tuple[torch.nn.Module, dict]:
    """A trained model (in eval mode) and its metadata from a training checkpoint.

    The checkpoint names its architecture (``hyper_parameters.arch``; checkpoints from before
    the registry hold the paper's CapsNet). With weight averaging (``--ema``) the averaged
    weights are the model, as they were the ones evaluated during training. ``val_size`` (the
    run's validation split, which a weights file exported from it records) comes from the
    run's ``config.yaml`` beside the checkpoint, None without one.
    """
    from .models import build_model
    from .settings import settings_beside
    ckpt = safe_load(path)
    hp = ckpt.get("hyper_parameters")
    state = ckpt.get("state_dict")
    if not isinstance(hp, dict) or not isinstance(state, dict) or "model" not in hp:
        raise CapsnetError(f"{path}: not a capsnet checkpoint (no model settings or weights)")
    arch = hp.get("arch", "capsnet")
    prefix = "ema.module." if any(k.startswith("ema.module.") for k in state) else "model."
    try:
        model = build_model(arch, hp["model"] or {})
        model.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                               if k.startswith(prefix)})
    except (ValueError, TypeError, RuntimeError) as e:
        raise CapsnetError(f"{path}: weights do not fit a {arch} "
                           f"({' '.join(str(e).split())[:200]})") from None
    n = model.config.num_classes
    classes = list(hp.get("classes") or range(n))  # ints: no names recorded
    meta = {"classes": classes, "dataset": hp.get("dataset", "fashion-mnist"),
            "epoch": ckpt.get("epoch"), "arch": arch,
            "recon_weight": hp.get("recon_weight"),
            "data_options": hp.get("data_options") or {},
            "val_size": settings_beside(path).get("val_size"),
            "train_pool": hp.get("train_pool")}
    return model.to(device).eval(), meta


def load_model(spec: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[torch.nn.Module, dict]:
    """A model from a shipped model's name, a ``.safetensors`` weights file or a checkpoint.

    Returns the model in eval mode and its metadata (``arch``, ``classes``, ``dataset``,
    ``epoch`` where known). Nothing is unpickled beyond plain tensors and data.
    """
    from .shipped import resolve
    from .weights import load_weights
    path = resolve(spec)
    if path.suffix == ".safetensors":
        model, meta = load_weights(path, device)
    else:
        model, meta = load_checkpoint_model(path, device)
    from .settings import check_record
    check_record(meta, path)
    bad = non_finite(model.state_dict())
    if bad is not None:  # a diverged or damaged model would score every image as NaN
        raise CapsnetError(f"{path}: its weights are not finite ({bad}); not a usable model")
    n = model.config.num_classes
    if len(meta["classes"]) != n:  # predict and report name classes by the model's index
        raise CapsnetError(f"{path}: records {len(meta['classes'])} class names for a model "
                           f"of {n} classes")
    return model, meta
