"""One inference loop and one confusion matrix, shared by evaluate, report and the dashboards."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.batches import to_unit
from .errors import CapsnetError
from .losses import model_loss
from .paper import RECON_WEIGHT
from .settings import TTA


class Inference(NamedTuple):
    """``lengths`` ``[N, O]`` (float32, CPU) and the mean losses over the ``N`` images."""

    lengths: Tensor
    loss: float
    margin_loss: float
    reconstruction_sse: float


def check_fits(model: nn.Module, shape: tuple, n_classes: int, what: str = "the data") -> None:
    """One-line error unless ``model`` takes images of ``shape`` ``(C, H, W)`` and has
    ``n_classes`` classes."""
    c = model.config
    expected = (c.in_channels, c.image_size, c.image_size)
    if tuple(shape) != expected:
        raise CapsnetError(f"the model expects images of shape {expected}, {what} has "
                           f"{tuple(shape)}")
    if n_classes != c.num_classes:
        raise CapsnetError(f"the model has {c.num_classes} classes, {what} {n_classes}")


def tta_views(x: Tensor, tta: str) -> Iterator[Tensor]:
    """The views of a batch ``x`` ``[B, C, H, W]`` whose capsule lengths test-time
    augmentation averages, each ``[B, C, H, W]``, ``x`` itself first; made one at a time, so
    that 50 views of a batch of large images never sit in memory together. Shifts are
    zero-filled like the training shifts (:func:`capsnet.data.augment.random_shift`); mirror
    images (``hflip``) only where a mirror keeps the class (the caller checks).

    - ``hflip``: ``x`` and its mirror image;
    - ``shift``: ``x`` and its four one-pixel shifts (right, left, down, up);
      ``shift+hflip``: ``x``, its mirror image and the four shifts (six views);
    - ``gridR``: the ``(2R+1)^2`` shifts by ``-R..R`` pixels along each axis (``grid1``: 9,
      ``grid2``: 25, the training shifts' own range); ``gridR+hflip``: those and the mirror
      image of each (18, 50).
    """
    if tta not in TTA:
        raise CapsnetError(f"--tta must be one of {', '.join(TTA)}, not {tta!r}")
    kind, mirror = tta.split("+")[0], tta.endswith("hflip")
    grid = kind.startswith("grid")
    r = int(kind[4:]) if grid else int(kind == "shift")  # the largest shift, in pixels
    if grid:
        offsets = [(dx, dy) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dx or dy]
    else:
        offsets = [(1, 0), (-1, 0), (0, 1), (0, -1)] if r else []
    h, w = x.shape[-2:]
    padded = F.pad(x, (r, r, r, r)) if r else x

    def shifted(dx: int, dy: int) -> Tensor:  # content moved right by dx, down by dy
        return padded[..., r - dy:r - dy + h, r - dx:r - dx + w]

    def views() -> Iterator[Tensor]:
        yield x
        if mirror and not grid:
            yield x.flip(-1)
        yield from (shifted(dx, dy) for dx, dy in offsets)
        if mirror and grid:
            yield x.flip(-1)
            yield from (shifted(dx, dy).flip(-1) for dx, dy in offsets)
    return views()


@contextmanager
def evaluating(model: nn.Module):
    """``model`` in eval mode inside (batch norm on its running statistics, which stay as
    they are), back in the mode it was in afterwards (a model being trained stays so)."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def tta_lengths(model: nn.Module, x: Tensor, tta: str, plain: Tensor | None = None) -> Tensor:
    """Capsule lengths ``[B, O]`` (float32) of a batch ``x`` ``[B, C, H, W]`` in [0, 1]: the
    mean over its :func:`tta_views`, the model in eval mode. ``plain``: ``x``'s own lengths
    where the caller has already computed them (the first view is then not run again)."""
    views = tta_views(x, tta)
    first = next(views)
    with evaluating(model):
        plain = model(first).lengths if plain is None else plain
        rest = [model(v).lengths.float() for v in views]  # [B, O] each
    return (plain.float() + sum(rest)) / (1 + len(rest))


@torch.inference_mode()
def infer(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512,
          recon_weight: float = RECON_WEIGHT, tta: str = "none") -> Inference:
    """Run ``model`` (on its own device) over uint8 ``images`` ``[N, C, H, W]``.

    The losses are those of training (:func:`capsnet.losses.capsule_loss`) with the run's
    ``recon_weight``; the decoder is fed the longest capsule, as at test time. For the CNN
    baselines ``lengths`` are their class probabilities and the losses their own
    (:func:`capsnet.losses.model_loss`: the classification loss as ``margin_loss``, no
    reconstruction).

    ``tta``: test-time augmentation, one of :data:`TTA`; ``lengths`` are then the mean over
    the image's :func:`tta_views` (the losses stay those of the images as given).
    """
    from .models import objective as objective_of
    objective = objective_of(model)
    device = next(model.parameters()).device
    lengths, totals = [], torch.zeros(3, dtype=torch.float64)
    with evaluating(model):
        for i in range(0, len(labels), batch_size):
            x = to_unit(images[i:i + batch_size].to(device))
            y = labels[i:i + batch_size].to(device)
            out = model(x)
            loss = model_loss(objective, out, y, x, recon_weight)
            totals += torch.tensor([loss.total.item(), loss.margin.item(),
                                    loss.reconstruction.item()], dtype=torch.float64) * len(y)
            lengths.append(tta_lengths(model, x, tta, plain=out.lengths).cpu())
    mean = (totals / max(1, len(labels))).tolist()
    return Inference(torch.cat(lengths) if lengths else torch.zeros(0), *mean)


def confusion_matrix(true: Tensor, pred: Tensor, num_classes: int) -> Tensor:
    """Counts ``[true class, predicted class]``: ``[O, O]`` int64."""
    idx = true.long().cpu() * num_classes + pred.long().cpu()
    return torch.bincount(idx, minlength=num_classes ** 2).view(num_classes, num_classes)


def accuracy_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy of ``correct`` out of ``n`` images.

    It covers only the binomial noise of which images the set holds (about +-0.5 points
    at 93% on 10,000 images, +-0.7 on 5,000), not the spread between training runs of one
    recipe (docs/results.md). Wilson's, not the normal approximation's, because it
    stays inside [0, 1] near 0% and 100% and for small ``n``.
    """
    if n == 0:
        return 0.0, 1.0
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_comparison(right: Tensor, first_right: Tensor) -> dict:
    """How a model differs from another on the same images: ``right``, ``first_right``
    ``[N]`` bool, which images each classifies correctly.

    ``gained``: images only this model gets right, ``lost``: images only the other one
    does. ``p_value``: the exact two-sided McNemar test of equal accuracy (a binomial test
    of ``gained`` among the ``gained + lost`` images on which they differ), which sees
    more than two separate accuracies and their intervals do: the images both get right or
    both wrong say nothing about which is better. It does not know how either model was
    chosen: a model picked as the best of many on these images is optimistic on them.
    """
    from scipy.stats import binomtest
    gained = int((right & ~first_right).sum())
    lost = int((~right & first_right).sum())
    p = binomtest(gained, gained + lost).pvalue if gained + lost else 1.0
    return {"gained": gained, "lost": lost, "p_value": float(p)}


def summarize(lengths: Tensor, labels: Tensor, classes: list[str]) -> dict:
    """Accuracy (with its 95% :func:`accuracy_interval`), per-class accuracy and the
    confusion matrix of capsule lengths ``[N, O]``."""
    pred = lengths.argmax(dim=1)
    confusion = confusion_matrix(labels, pred, len(classes))
    per_class = confusion.diagonal() / confusion.sum(dim=1).clamp(min=1)
    hits = pred == labels
    return {"accuracy": float(hits.float().mean()), "n": len(labels),
            "accuracy_interval": list(accuracy_interval(int(hits.sum()), len(labels))),
            "per_class": dict(zip(classes, per_class.tolist())),
            "confusion": confusion.tolist(), "classes": list(classes)}


# --------------------------------------------------------------------------- multi-label

def f_beta_per_image(pred: Tensor, target: Tensor, beta: float = 2.0) -> Tensor:
    """F-beta of each image's predicted label set against its true one: ``[N, K]`` 0/1 x2 ->
    ``[N]``. beta = 2 (recall counts more) is the Planet competition's score, averaged over
    images. An image with no true and no predicted label scores 1."""
    pred, target = pred.bool(), target.bool()
    tp = (pred & target).sum(1).double()
    fp = (pred & ~target).sum(1).double()
    fn = (~pred & target).sum(1).double()
    b2 = beta * beta
    denom = (1 + b2) * tp + b2 * fn + fp
    return torch.where(denom > 0, (1 + b2) * tp / denom.clamp(min=1e-12),
                       torch.ones_like(denom))


def average_precision(scores: Tensor, target: Tensor) -> float:
    """Area under one label's precision-recall curve: ``scores`` ``[N]``, ``target`` ``[N]``
    0/1; NaN without positives. The sum over the distinct scores, taken as thresholds, of
    the precision there times the recall it adds (as scikit-learn's
    ``average_precision_score``): tied scores form one threshold, so the result does not
    depend on the images' order (saturated lengths or sigmoids tie often). Without ties it
    is the mean of the precision at each true image's rank."""
    order = scores.argsort(descending=True, stable=True)
    ranked, hits = scores[order], target.bool()[order].double()
    positives = hits.sum()
    if positives == 0:
        return float("nan")
    last = torch.ones(len(hits), dtype=torch.bool)  # the last image of each tied group
    last[:-1] = ranked[1:] != ranked[:-1]
    tp = hits.cumsum(0)[last]
    precision = tp / torch.arange(1, len(hits) + 1, dtype=torch.float64)[last]
    added = torch.diff(tp / positives, prepend=torch.zeros(1, dtype=torch.float64))
    return float((added * precision).sum())


def summarize_multilabel(lengths: Tensor, targets: Tensor, classes: list[str]) -> dict:
    """Scores of multi-label predictions (a class is present when its capsule is longer
    than 0.5, ``models.base.PRESENT``): per label precision, recall and F1; over images the
    mean F2 and the exact-match ratio (``accuracy``); over labels the mean average precision
    of the lengths as scores (``mAP``, labels without a true image left out).
    Shapes: ``lengths`` ``[N, K]``, ``targets`` ``[N, K]`` 0/1."""
    from .models.base import PRESENT
    pred, true = lengths > PRESENT, targets.bool()
    tp = (pred & true).sum(0).double()
    precision = tp / pred.sum(0).clamp(min=1)
    recall = tp / true.sum(0).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    ap = [average_precision(lengths[:, k], true[:, k]) for k in range(len(classes))]
    known = [a for a in ap if a == a]
    per_label = {c: {"precision": float(p), "recall": float(r), "f1": float(f), "ap": a,
                     "support": int(n)}
                 for c, p, r, f, a, n in zip(classes, precision, recall, f1, ap, true.sum(0))}
    return {"multi_label": True, "n": len(targets), "classes": list(classes),
            "accuracy": float((pred == true).all(1).double().mean()) if len(true) else 0.0,
            "f2": float(f_beta_per_image(pred, true).mean()) if len(true) else 0.0,
            "mAP": sum(known) / len(known) if known else float("nan"),
            "per_label": per_label}
