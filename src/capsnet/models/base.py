"""What every architecture shares: the config round trip and the output of ``forward``."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import NamedTuple

from torch import Tensor


class ConfigBase:
    """Mixin for the frozen config dataclasses: plain-dict round trip for checkpoints and YAML."""

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name: f for f in fields(cls)}
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"unknown model settings: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class CapsuleOutput(NamedTuple):
    """What every model's ``forward(x, target=None)`` returns.

    ``lengths`` ``[B, O]`` (class scores |v_j|), ``poses`` ``[B, O, D]`` (the output capsules
    v_j), ``reconstructions`` ``[B, C, H, W]``, ``selected`` ``[B]`` (the class fed to the decoder).
    """

    lengths: Tensor
    poses: Tensor
    reconstructions: Tensor
    selected: Tensor
