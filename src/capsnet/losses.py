"""Losses of the paper: the margin loss on capsule lengths and the reconstruction loss."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor
from torch.nn import functional as F

from .paper import LAMBDA, M_NEG, M_POS, RECON_WEIGHT


def margin_loss(lengths: Tensor, target: Tensor, m_pos: float = M_POS, m_neg: float = M_NEG,
                lam: float = LAMBDA) -> Tensor:
    """Margin loss of the paper, summed over classes (not averaged).

    ``L_k = T_k max(0, m+ - |v_k|)^2 + lam (1 - T_k) max(0, |v_k| - m-)^2``

    It is defined on the capsule lengths themselves (no softmax in between), one term per
    class, so it takes several present classes as they come (multi-label data, overlapping
    objects): ``T_k`` is 1 for each of them.
    Shapes: ``lengths`` ``[B, O]`` in [0, 1), ``target`` ``[B]`` class indices or ``[B, O]``
    k-hot -> ``[B]``.
    """
    t = as_k_hot(target, lengths.shape[1]).to(lengths.dtype)
    present = t * F.relu(m_pos - lengths).pow(2)
    absent = lam * (1.0 - t) * F.relu(lengths - m_neg).pow(2)
    return (present + absent).sum(dim=1)


def as_k_hot(target: Tensor, num_classes: int) -> Tensor:
    """Targets as ``[B, O]`` 0/1: class indices ``[B]`` are one-hot encoded, k-hot passes."""
    return target if target.dim() == 2 else F.one_hot(target, num_classes)


def reconstruction_target(images: Tensor, size) -> Tensor:
    """What a decoder of side ``size`` (``(h, w)``) reconstructs: ``images`` ``[B, C, H, W]``
    itself at its own size, else area-averaged to ``[B, C, h, w]`` (a decoder with
    ``recon_size``; see :mod:`capsnet.models.capsnet`)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=tuple(size), mode="area")


def reconstruction_loss(recon: Tensor, images: Tensor) -> Tensor:
    """Sum of squared pixel differences per image: ``recon`` ``[B, C, h, w]``, ``images``
    ``[B, C, H, W]`` (compared at the reconstruction's size) -> ``[B]``."""
    target = reconstruction_target(images, recon.shape[-2:])
    return (recon - target).pow(2).flatten(1).sum(dim=1)


def distillation_loss(lengths: Tensor, teacher: Tensor) -> Tensor:
    """Squared distance between the capsule lengths and a teacher's, summed over classes
    (as the margin loss is): ``lengths``, ``teacher`` ``[B, O]`` -> ``[B]``
    (:mod:`capsnet.distill`)."""
    return (lengths - teacher.to(lengths.dtype)).pow(2).sum(dim=1)


class CapsuleLoss(NamedTuple):
    """Batch means of the total loss and of its two parts (all scalars)."""

    total: Tensor
    margin: Tensor
    reconstruction: Tensor


def capsule_loss(lengths: Tensor, target: Tensor, recon: Tensor, images: Tensor,
                 recon_weight: float = RECON_WEIGHT) -> CapsuleLoss:
    """``margin + recon_weight * reconstruction``, averaged over the batch.

    Shapes: ``lengths`` ``[B, O]``, ``target`` ``[B]`` (or ``[B, O]`` k-hot), ``recon`` and
    ``images`` ``[B, C, H, W]``.
    """
    margin = margin_loss(lengths, target).mean()
    recon_sse = reconstruction_loss(recon, images).mean()
    return CapsuleLoss(margin + recon_weight * recon_sse, margin, recon_sse)


def classification_loss(logits: Tensor, target: Tensor, objective: str) -> Tensor:
    """The CNN baselines' loss, averaged over the batch (a scalar).

    ``"cross_entropy"``: softmax cross-entropy, ``target`` ``[B]`` class indices.
    ``"sigmoid"``: binary cross-entropy of one sigmoid per class, summed over the classes
    (as the margin loss is), ``target`` ``[B]`` indices or ``[B, O]`` k-hot.
    Shapes: ``logits`` ``[B, O]``.
    """
    if objective == "cross_entropy":
        if target.dim() != 1:
            raise ValueError("a softmax baseline takes one class per image")
        return F.cross_entropy(logits, target)
    if objective == "sigmoid":
        t = as_k_hot(target, logits.shape[1]).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, t, reduction="none").sum(1).mean()
    raise ValueError(f"unknown objective {objective!r}")


def model_loss(objective: str, out, target: Tensor, images: Tensor,
               recon_weight: float = RECON_WEIGHT) -> CapsuleLoss:
    """The training loss of any registered model, from its ``forward`` output ``out``
    (:class:`~capsnet.models.base.CapsuleOutput`).

    ``"margin"`` (capsule models): exactly :func:`capsule_loss`. The CNN baselines
    (``"cross_entropy"``, ``"sigmoid"``): :func:`classification_loss` on ``out.logits`` as both
    ``total`` and ``margin`` (the classification term), ``reconstruction`` 0 (no decoder).
    """
    if objective == "margin":
        return capsule_loss(out.lengths, target, out.reconstructions, images, recon_weight)
    cls = classification_loss(out.logits, target, objective)
    return CapsuleLoss(cls, cls, cls.new_zeros(()))
