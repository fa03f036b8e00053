"""`capsnet export`: a model as an ONNX inference graph or as a safetensors weights file.

ONNX: the graph takes images ``[B, C, H, W]`` in [0, 1] and returns the capsule lengths
``[B, O]`` and the output capsules (poses) ``[B, O, D]``, with a dynamic batch axis. It is
traced from the reference routing (:func:`capsnet.routing.route_reference`) and PyTorch's own
convolution, so it holds only standard operators (the fused kernels' custom autograd
functions are training-time engines; the function is the same).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import CapsnetError, check_positive


class _Inference(nn.Module):
    """``x`` -> ``(lengths, poses)``: the part of a model an ONNX user runs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        v = self.model.capsules(x)
        return v.norm(dim=-1), v


def for_export(model: nn.Module) -> nn.Module:
    """The same model (same weights) running on standard operators only."""
    from .layers import PrimaryCapsules, RoutingCapsules
    for m in model.modules():
        if isinstance(m, RoutingCapsules):
            m.impl = "reference"
        if isinstance(m, PrimaryCapsules):
            m.algorithm = "torch"
    return model.to(memory_format=torch.contiguous_format).eval()


def export_onnx(model: nn.Module, out: Path, batch: int = 1) -> Path:
    from .models import is_capsule_model
    if not is_capsule_model(model):
        raise CapsnetError("ONNX export covers capsule models (lengths and poses); a CNN "
                           "baseline can be written as .safetensors")
    import importlib.util
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None:
        raise CapsnetError("ONNX export needs the onnx packages: pip install "
                           "'capsnet[onnx]' (onnx, onnxscript)")
    import warnings

    from .checkpoints import atomic_write
    c = model.config
    # torch.export specializes a dimension of size 1, so trace with at least 2 images.
    x = torch.rand(max(2, batch), c.in_channels, c.image_size, c.image_size,
                   device=next(model.parameters()).device)
    wrapped = _Inference(for_export(model))
    tmp = out.with_name(out.name + ".export.tmp.onnx")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (x,), str(tmp), input_names=["images"],
                              output_names=["lengths", "poses"],
                              dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                              dynamo=True, external_data=False, verbose=False)
        data = tmp.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write(out, lambda f: f.write(data))
    return out


def _is_safetensors(path: Path) -> bool:
    """Whether ``path`` reads as a safetensors file (an export may replace one)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt"):
            return True
    except Exception:  # noqa: BLE001 - any failure to read it: not one
        return False


def _is_onnx(path: Path) -> bool:
    """Whether ``path`` reads as an ONNX model (an export may replace one)."""
    try:
        import onnx
        onnx.load(str(path), load_external_data=False)
        return True
    except Exception:  # noqa: BLE001 - onnx missing or the file not a model: not one
        return False


def export(spec: str, out: str | Path, dtype: str = "float32", batch: int = 1) -> Path:
    """Write the model ``spec`` (name, weights file or checkpoint) to ``out`` (.onnx or
    .safetensors)."""
    from .checkpoints import load_model
    from .weights import describe, save_weights
    if not str(out).strip():
        raise CapsnetError("an empty output file name; give one ending in .onnx or .safetensors")
    out = Path(out)
    if out.suffix not in (".onnx", ".safetensors"):
        raise CapsnetError(f"{out}: the output must end in .onnx or .safetensors")
    check_positive(("--batch", batch))
    if dtype not in ("float32", "float16"):
        raise CapsnetError(f"--dtype must be float32 or float16, got {dtype!r}")
    if out.suffix == ".onnx" and dtype != "float32":
        raise CapsnetError("--dtype float16 applies to .safetensors files; the ONNX graph "
                           "is written in float32")
    from .checkpoints import output_file
    onnx = out.suffix == ".onnx"
    target = output_file(out, _is_onnx if onnx else _is_safetensors,
                         "an ONNX file" if onnx else "a safetensors file")
    if not target.parent.is_dir():  # unlike --predictions, export makes no folders
        raise CapsnetError(f"{out.parent}: no such folder")
    model, meta = load_model(spec)
    try:
        if onnx:
            export_onnx(model, target, batch)
        else:
            save_weights(model, target, describe(meta, Path(str(spec)).name),
                         getattr(torch, dtype))
    except OSError as e:  # a read-only folder, a full disk
        raise CapsnetError(f"{out}: cannot write ({e.strerror or e})") from None
    return out
