"""capsnet: Capsule Networks (Sabour, Frosst & Hinton, 2017) and Efficient-CapsNet.

The names below load on first use (PEP 562), so ``capsnet --help`` does not import torch.
"""

from importlib import import_module

__version__ = "0.2.0"

_EXPORTS = {
    "ARCHITECTURES": "models", "build_model": "models", "CapsNet": "models",
    "CapsNetConfig": "models", "CapsuleOutput": "models", "EfficientCapsNet": "models",
    "EfficientCapsNetConfig": "models", "Decoder": "layers", "PrimaryCapsules": "layers",
    "RoutingCapsules": "layers", "route_reference": "routing", "squash": "routing",
    "capsule_loss": "losses", "margin_loss": "losses", "reconstruction_loss": "losses",
    "load_model": "checkpoints",
}

__all__ = sorted([*_EXPORTS, "CapsNetOutput"])


def __getattr__(name: str):
    if name == "CapsNetOutput":
        name = "CapsuleOutput"
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'capsnet' has no attribute {name!r}")
