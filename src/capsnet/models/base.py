"""What every architecture shares: the config round trip and the output of ``forward``."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import NamedTuple

import torch
from torch import Tensor, nn


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
    v_j), ``reconstructions`` ``[B, C, H, W]``, ``selected`` ``[B]`` (the class fed to the
    decoder; multi-label: ``[B, O]``, 1 for each capsule fed to it).

    The CNN baselines (:mod:`capsnet.models.baseline_cnn`, ``objective`` other than
    ``"margin"``) return their class probabilities as ``lengths``, no ``poses`` and no
    ``reconstructions`` (None), the predicted class as ``selected`` and their ``logits``
    ``[B, O]`` (None for capsule models), from which their loss is computed.
    """

    lengths: Tensor
    poses: Tensor | None
    reconstructions: Tensor | None
    selected: Tensor
    logits: Tensor | None = None


PRESENT = 0.5  # a class is present when its capsule is longer than this (multi-label)


def present(lengths: Tensor) -> Tensor:
    """Classes taken as present: ``[B, O]`` lengths -> ``[B, O]`` 0/1, the longest always 1."""
    keep = lengths > PRESENT
    keep[torch.arange(lengths.shape[0], device=lengths.device), lengths.argmax(dim=1)] = True
    return keep.to(torch.uint8)


class CapsuleModel(nn.Module):
    """What every architecture shares after its own ``capsules(x)``: class scores are the
    capsule lengths, and the decoder redraws the image from one capsule.

    ``forward(x, target=None)``: ``x`` ``[B, C, H, W]`` in [0, 1]; ``target`` ``[B]`` picks the
    capsule fed to the decoder (the true class during training); without it the longest.
    Multi-label models (``config.multi_label``) take k-hot targets ``[B, O]`` and feed the
    decoder every present class; without a target, every capsule longer than
    :data:`PRESENT` (and always the longest one, so the decoder never sees nothing).
    Subclasses define ``capsules(x)`` -> ``v`` ``[B, O, D]`` and ``decoder``.

    ``objective`` names the training loss (:func:`capsnet.losses.model_loss`): ``"margin"``
    (margin loss on the capsule lengths plus the weighted reconstruction error) for every
    capsule model; the CNN baselines say ``"cross_entropy"`` or ``"sigmoid"``.
    """

    objective = "margin"

    def forward(self, x: Tensor, target: Tensor | None = None) -> CapsuleOutput:
        v = self.capsules(x)
        lengths = v.norm(dim=-1)
        if target is not None:
            selected = target
        elif getattr(self.config, "multi_label", False):
            selected = present(lengths)
        else:
            selected = lengths.argmax(dim=1)
        return CapsuleOutput(lengths, v, self.decoder(v, selected), selected)

    def num_parameters(self, decoder: bool = True) -> int:
        """Trainable parameters (batch norm's running statistics are buffers, not counted)."""
        return sum(p.numel() for name, p in self.named_parameters()
                   if decoder or not name.startswith("decoder."))
