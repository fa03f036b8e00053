"""The model registry: architecture name -> (config dataclass, module).

Every model takes ``forward(x, target=None)`` with ``x`` ``[B, C, H, W]`` in [0, 1] and returns
a :class:`~capsnet.models.base.CapsuleOutput`; it has ``config`` (with ``in_channels``,
``image_size``, ``num_classes``), ``capsules(x)``, ``decoder`` and ``num_parameters()``.
Adding an architecture: one file here and one entry in :data:`ARCHITECTURES`.

The paper's CNN baselines (``baseline-cnn``, ``baseline-cnn-multi``) are registered too but
are not capsule models: they have no ``capsules``/``decoder``, return class probabilities as
``lengths`` and no reconstructions, and say so by their class attribute ``objective``
(:func:`objective`: ``"margin"`` for capsule models, ``"cross_entropy"`` or ``"sigmoid"``).
"""

from __future__ import annotations

from torch import nn

from .base import CapsuleOutput, ConfigBase
from .baseline_cnn import BaselineCNN, BaselineCNNConfig, BaselineCNNMulti, BaselineCNNMultiConfig
from .capsnet import CapsNet, CapsNetConfig
from .efficient_capsnet import EfficientCapsNet, EfficientCapsNetConfig

ARCHITECTURES: dict[str, tuple[type, type]] = {
    "capsnet": (CapsNetConfig, CapsNet),
    "efficient-capsnet": (EfficientCapsNetConfig, EfficientCapsNet),
    "baseline-cnn": (BaselineCNNConfig, BaselineCNN),
    "baseline-cnn-multi": (BaselineCNNMultiConfig, BaselineCNNMulti),
}


def architecture(name: str) -> tuple[type, type]:
    """``(config class, module class)`` of an architecture; ValueError naming the choices."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r} (choices: "
                         f"{', '.join(ARCHITECTURES)})") from None


def build_model(name: str = "capsnet", config: dict | None = None) -> nn.Module:
    """A fresh model of architecture ``name`` from a (partial) config dict."""
    config_cls, model_cls = architecture(name)
    return model_cls(config_cls.from_dict(config or {}))


def arch_name(model: nn.Module) -> str:
    """The registry name of a model instance."""
    for name, (_, cls) in ARCHITECTURES.items():
        if type(model) is cls:
            return name
    raise ValueError(f"{type(model).__name__} is not a registered architecture")


def objective(model_or_name: nn.Module | str) -> str:
    """How a model (or a registered architecture, by name) is trained: ``"margin"`` (a
    capsule model: margin loss and reconstruction), ``"cross_entropy"`` (softmax) or
    ``"sigmoid"`` (one sigmoid per class)."""
    cls = architecture(model_or_name)[1] if isinstance(model_or_name, str) else model_or_name
    return getattr(cls, "objective", "margin")


def is_capsule_model(model_or_name: nn.Module | str) -> bool:
    """True for capsule models (capsules, a decoder, reconstructions); False for the CNN
    baselines."""
    return objective(model_or_name) == "margin"


__all__ = ["ARCHITECTURES", "architecture", "build_model", "arch_name", "objective",
           "is_capsule_model", "CapsuleOutput", "ConfigBase", "CapsNet", "CapsNetConfig",
           "EfficientCapsNet", "EfficientCapsNetConfig", "BaselineCNN", "BaselineCNNConfig",
           "BaselineCNNMulti", "BaselineCNNMultiConfig"]
