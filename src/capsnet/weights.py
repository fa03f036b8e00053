"""Weights files: a model as safetensors (no pickle, no code) with its architecture and config.

A weights file holds the tensors of one model and, in its safetensors metadata, one JSON
entry ``capsnet``: ``{"arch", "config", "classes", "dataset", "source", "sha256", ...}``
(:data:`RECORDED` lists the rest, e.g. ``val_size``: the run's validation split), where
``sha256`` is the digest of every tensor's name, dtype, shape and bytes and ``meta_sha256``
that of the rest of the entry (class names, config, ...), both checked on load, so a
truncated or altered file is refused with one line (files written before 2026-12-05, the
shipped one among them, carry ``sha256`` alone). Shipped models live in
``capsnet/weights/`` and are found by name (:mod:`capsnet.shipped`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from .errors import CapsnetError, first_line

def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # reshape(-1): a 0-d tensor (batch norm's step counter) cannot be viewed as bytes
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    """The digest of a model's weights as loaded (names, dtypes, shapes, bytes)."""
    return _digest({k: v.detach().cpu() for k, v in model.state_dict().items()})


def _meta_digest(info: dict) -> str:
    """The digest of a weights file's ``capsnet`` entry without its two digests."""
    rest = {k: v for k, v in info.items() if k not in ("sha256", "meta_sha256")}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def save_weights(model: nn.Module, path: str | Path, meta: dict,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write ``model``'s state (floats cast to ``dtype``) and ``meta`` (arch, classes, ...)."""
    from .checkpoints import atomic_write, refuse_non_finite
    from .models import arch_name
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    refuse_non_finite(tensors, path)  # also catches an fp16 overflow
    info = {"arch": arch_name(model), "config": model.config.to_dict(), **meta,
            "sha256": _digest(tensors)}
    info["meta_sha256"] = _meta_digest(info)
    path = Path(path)
    atomic_write(path, lambda f: f.write(_serialize(tensors, info)))
    return path


# What a weights file records beside the architecture, its config and the checksum: written
# by describe(), read back by load_weights(). ``val_size``: the size of the run's validation
# split (its seed is fixed), so that `evaluate --split val` can carve it again from the file
# alone; None in files written before it was recorded. ``train_pool``: what that split was
# carved from (capsnet.data.datasets.split_fingerprint), None in files before 2026-12-05.
RECORDED = ("source", "classes", "dataset", "epoch", "recon_weight", "data_options",
            "val_size", "train_pool")


def describe(meta: dict, source: str) -> dict:
    """The :data:`RECORDED` fields of ``meta`` (a checkpoint's metadata or a run's
    hyper-parameters), with ``source``: the file the weights came from."""
    return {**{k: meta.get(k) for k in RECORDED}, "source": source}


def _serialize(tensors: dict, info: dict) -> bytes:
    from safetensors.torch import save
    return save(tensors, metadata={"capsnet": json.dumps(info, sort_keys=True)})


def load_weights(path: str | Path, device: str | torch.device = "cpu"
                 ) -> tuple[nn.Module, dict]:
    """A model (eval mode, fp32) and its metadata from a safetensors weights file."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    from .models import build_model
    path = Path(path)
    try:
        data = path.read_bytes()
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        info = json.loads(header.get("__metadata__", {})["capsnet"])
    except OSError as e:
        raise CapsnetError(f"{path}: cannot read ({e.strerror})") from None
    except KeyError:  # a safetensors file, but not one capsnet wrote
        raise CapsnetError(f"{path}: not a capsnet weights file (a safetensors file without "
                           "capsnet's metadata: architecture, classes, checksum)") from None
    except (SafetensorError, ValueError, TypeError) as e:
        raise CapsnetError(f"{path}: not a capsnet weights file "
                           f"({first_line(e)[:160]})") from None
    if not isinstance(info, dict) or _digest(tensors) != info.get("sha256"):
        raise CapsnetError(f"{path}: the tensors do not match the file's checksum (truncated "
                           "or altered); get the file again")
    if "meta_sha256" in info and _meta_digest(info) != info["meta_sha256"]:
        raise CapsnetError(f"{path}: its metadata (class names, config, ...) do not match "
                           "the file's checksum (altered); get the file again")
    try:
        model = build_model(info["arch"], info["config"])
        model.load_state_dict({k: v.float() if v.is_floating_point() else v
                               for k, v in tensors.items()})
    except (ValueError, TypeError, KeyError, RuntimeError) as e:  # all of the message's lines
        raise CapsnetError(f"{path}: weights do not fit the model they name "
                           f"({' '.join(str(e).split())[:200]})") from None
    meta = {k: info.get(k) for k in RECORDED}
    meta["data_options"] = meta["data_options"] or {}
    meta["arch"] = info["arch"]
    # ints 0..n-1 when the file names no classes (evaluate then checks no names)
    meta["classes"] = list(meta["classes"] or range(model.config.num_classes))
    return model.to(device).eval(), meta
