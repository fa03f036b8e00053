"""Training and scoring on overlapping pairs (MultiFashion, :mod:`capsnet.data.multi`), as the
paper does on MultiMNIST (section 6).

- Loss of a capsule model: the margin loss with both classes present (the k-hot target
  ``[B, O]`` :func:`capsnet.losses.margin_loss` takes), plus ``recon_weight`` times the sum
  of the two reconstruction errors, each garment redrawn from its OWN capsule (the other
  capsules masked, :meth:`capsnet.layers.Decoder.mask`) against its own shifted image. The
  paper feeds the decoder the true classes in training, and at test time too: "we pick one
  digit at a time and use the activity vector of the chosen digit capsule to reconstruct
  the image of the chosen digit (we know this image because we used it to generate the
  composite image)".
- Loss of the sigmoid CNN baseline (``baseline-cnn-multi``): binary cross-entropy of both
  classes (:func:`capsnet.losses.classification_loss`); no reconstruction.
- Score: a pair is correct when its two highest class scores are its two classes
  (:func:`capsnet.data.multi.pair_correct`), logged as ``{split}/acc``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .data.batches import to_unit
from .data.multi import pair_correct, pair_k_hot, split_packed
from .errors import CapsnetError
from .inference import check_fits
from .losses import CapsuleLoss, margin_loss, reconstruction_loss
from .paper import RECON_WEIGHT


class PairLoss(NamedTuple):
    """Per pair (not averaged): ``total``, ``margin`` (the classification term),
    ``reconstruction`` (sum of both garments' squared errors) ``[B]``; the class ``scores``
    ``[B, O]`` (capsule lengths or probabilities); ``correct`` ``[B]`` bool; and the two
    ``reconstructions`` ``([B, C, H, W], [B, C, H, W])`` (None for the CNN baseline)."""

    total: Tensor
    margin: Tensor
    reconstruction: Tensor
    scores: Tensor
    correct: Tensor
    reconstructions: tuple[Tensor, Tensor] | None


def pair_losses(model: nn.Module, composite: Tensor, first: Tensor, second: Tensor,
                labels: Tensor, recon_weight: float = RECON_WEIGHT) -> PairLoss:
    """Losses and scores of ``model`` on pairs (see the module docstring).

    Shapes: ``composite``, ``first``, ``second`` ``[B, C, H, W]`` in [0, 1], ``labels``
    ``[B, 2]`` (the classes of ``first`` and ``second``) -> :class:`PairLoss`.
    """
    from .models import objective
    kind = objective(model)
    if kind == "margin":
        v = model.capsules(composite)  # [B, O, D]
        lengths = v.norm(dim=-1)
        margin = margin_loss(lengths, pair_k_hot(labels, lengths.shape[1]))
        recon_1 = model.decoder(v, labels[:, 0])
        recon_2 = model.decoder(v, labels[:, 1])
        recon = reconstruction_loss(recon_1, first) + reconstruction_loss(recon_2, second)
        return PairLoss(margin + recon_weight * recon, margin, recon, lengths,
                        pair_correct(lengths, labels), (recon_1, recon_2))
    if kind == "sigmoid":
        out = model(composite)
        target = pair_k_hot(labels, out.logits.shape[1]).to(out.logits.dtype)
        cls = torch.nn.functional.binary_cross_entropy_with_logits(
            out.logits, target, reduction="none").sum(dim=1)
        return PairLoss(cls, cls, torch.zeros_like(cls), out.lengths,
                        pair_correct(out.lengths, labels), None)
    raise CapsnetError(f"a model trained with {kind} scores one class per image; pairs need "
                       "a capsule model or baseline-cnn-multi")


def mean_pair_loss(loss: PairLoss, valid: Tensor | None = None):
    """Batch means of ``total``, ``margin``, ``reconstruction`` and ``correct`` over the
    ``valid`` ``[B]`` pairs (all when None); a :class:`capsnet.losses.CapsuleLoss` and the
    accuracy."""
    w = torch.ones_like(loss.total) if valid is None else valid.to(loss.total.dtype)
    n = w.sum().clamp(min=1)
    mean = lambda t: (t * w).sum() / n  # noqa: E731
    return (CapsuleLoss(mean(loss.total), mean(loss.margin), mean(loss.reconstruction)),
            mean(loss.correct.to(loss.total.dtype)))


def summarize_pairs(scores: Tensor, labels: Tensor, classes: list[str]) -> dict:
    """Pair accuracy (both classes are the two highest scores) and, per class, the share of
    the pairs holding it whose two highest scores include it (``per_class``), and how many
    pairs hold it (``per_class_n``). Shapes: ``scores`` ``[N, O]``, ``labels`` ``[N, 2]``."""
    if len(labels) == 0:
        return {"pairs": True, "n": 0, "classes": list(classes), "accuracy": 0.0,
                "per_class": {name: 0.0 for name in classes},
                "per_class_n": {name: 0 for name in classes}}
    top2 = scores.topk(2, dim=1).indices
    per_class, per_class_n = {}, {}
    for k, name in enumerate(classes):
        holds = (labels == k).any(dim=1)
        found = (top2 == k).any(dim=1) & holds
        per_class_n[name] = int(holds.sum())
        per_class[name] = float(found.sum()) / max(per_class_n[name], 1)
    return {"pairs": True, "n": len(labels), "classes": list(classes),
            "accuracy": float(pair_correct(scores, labels).double().mean()),
            "per_class": per_class, "per_class_n": per_class_n}


@torch.inference_mode()
def score_pairs(model: nn.Module, data, batch_size: int = 512,
                device: str | torch.device = "cpu", recon_weight: float = RECON_WEIGHT
                ) -> tuple[Tensor, dict]:
    """Class scores of a packed pair set (``data.images`` ``[N, 3C, H, W]`` uint8,
    ``data.labels`` ``[N, 2]``): ``scores`` ``[N, O]`` on the CPU and the mean ``loss``,
    ``margin_loss`` and ``reconstruction_sse`` (both garments) per pair."""
    c = data.images.shape[1] // 3
    check_fits(model, (c, *data.images.shape[2:]), len(data.classes), "the pair set")
    model = model.to(device).eval()
    dev = next(model.parameters()).device
    scores, totals = [], torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(data.labels), batch_size):
        x = to_unit(data.images[i:i + batch_size].to(dev))
        y = data.labels[i:i + batch_size].to(dev)
        composite, first, second = split_packed(x)
        res = pair_losses(model, composite.contiguous(), first, second, y, recon_weight)
        totals += torch.stack([res.total.sum(), res.margin.sum(),
                               res.reconstruction.sum()]).double().cpu()
        scores.append(res.scores.float().cpu())
    n = max(1, len(data.labels))
    scores = torch.cat(scores) if scores else torch.zeros(0, len(data.classes))
    loss, margin, recon = (totals / n).tolist()
    return scores, {"loss": loss, "margin_loss": margin, "reconstruction_sse": recon}


def evaluate_pairs(model: nn.Module, data, batch_size: int = 512,
                   device: str | torch.device = "cpu", recon_weight: float = RECON_WEIGHT
                   ) -> dict:
    """:func:`capsnet.evaluate.evaluate` for a packed pair set: :func:`summarize_pairs`
    plus the losses of :func:`score_pairs`."""
    scores, losses = score_pairs(model, data, batch_size, device, recon_weight)
    return {**summarize_pairs(scores, data.labels, list(data.classes)), **losses}
