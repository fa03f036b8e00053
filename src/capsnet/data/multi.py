"""MultiFashion: the paper's MultiMNIST protocol applied to Fashion-MNIST.

The protocol (Sabour, Frosst & Hinton 2017, section 6): "overlaying a digit on top of
another digit from the same set (training or test) but different class. Each digit is
shifted up to 4 pixels in each direction resulting in a 36x36 image." Here: each 28x28
garment is placed at the centre of a 36x36 black canvas (4 pixels of padding) and shifted by
its own ``(dy, dx)``, each uniform in ``-4 .. 4``; the two shifted garments are added pixel by
pixel and the sum clipped at 255 (1.0 for float images), as the authors' generator does
(``tensorflow/models``, ``research/capsules/input_data/mnist/mnist_shift.py``).

- Training pairs are made on the fly, per batch, on the batch's device (:func:`make_pairs`):
  every garment of the batch gets a partner of another class drawn from the same batch and
  both get fresh shifts, from the global torch random generator (so a seed, and a
  checkpoint's saved random state, reproduce them).
- Validation and test pairs are fixed sets (:func:`pair_table`, :func:`compose_pairs`): each
  garment of the split is the base of ``partners`` pairs, its partners drawn (seeded) from
  the garments of the other classes of the same split.

A fixed pair set is stored like any split (:class:`~capsnet.data.datasets.ImageDataset`)
but packed: ``images`` ``[N, 3C, 36, 36]`` uint8 holds, along the channels, the composite
(what the model sees), then the first and the second shifted garment (each one's target for
its own reconstruction); ``labels`` ``[N, 2]`` int64 the two classes (:func:`is_pair_set`,
:func:`split_packed`). Packed, the pairs go through the batch loaders, the data-parallel
sharding and ``--test-size`` unchanged.

Scoring, as in the paper: a pair is correct when the two highest class scores (the two
longest capsules) are exactly its two classes (:func:`pair_correct`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

GARMENT = 28
MAX_SHIFT = 4  # pixels, in each direction: the paper's
CANVAS = GARMENT + 2 * MAX_SHIFT  # 36


# --------------------------------------------------------------------------- placing

def translate(x: Tensor, dy: Tensor, dx: Tensor, bound: int) -> Tensor:
    """Move each image by its own whole-pixel ``(dy, dx)`` (down, right), zero-filled.

    Shapes: ``x`` ``[B, C, H, W]`` (any dtype, any device), ``dy``/``dx`` ``[B]`` integers
    with ``|dy|, |dx| <= bound`` -> ``[B, C, H, W]``. Deterministic: the shifts are given.
    """
    b, _, h, w = x.shape
    if bound <= 0:
        return x
    padded = F.pad(x, (bound, bound, bound, bound))
    rows = torch.arange(h, device=x.device) + bound - dy.to(x.device).view(b, 1)  # [B, H]
    cols = torch.arange(w, device=x.device) + bound - dx.to(x.device).view(b, 1)  # [B, W]
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [B,H,W,C]
    return out.permute(0, 3, 1, 2).contiguous()


def place(x: Tensor, dy: Tensor, dx: Tensor, pad: int = MAX_SHIFT) -> Tensor:
    """Centre each image on a canvas ``pad`` pixels larger on every side, then move it by
    ``(dy, dx)`` (``|dy|, |dx| <= pad``, so nothing is cut off).

    Shapes: ``[B, C, H, W]``, ``[B]``, ``[B]`` -> ``[B, C, H + 2 pad, W + 2 pad]``.
    """
    return translate(F.pad(x, (pad, pad, pad, pad)), dy, dx, pad)


def overlay(a: Tensor, b: Tensor) -> Tensor:
    """Pixel-wise sum clipped at white: 255 for uint8 images, 1.0 for floats in [0, 1].

    Shapes: ``[..., H, W]`` x2 -> the same.
    """
    if a.dtype == torch.uint8:
        return (a.to(torch.int16) + b.to(torch.int16)).clamp_(max=255).to(torch.uint8)
    return (a + b).clamp(max=1.0)


# --------------------------------------------------------------------------- training pairs

class PairBatch(NamedTuple):
    """Pairs made from one batch: ``composite`` ``[B, C, 36, 36]``, ``first`` and ``second``
    (each garment shifted on its own canvas, the reconstruction targets) ``[B, C, 36, 36]``,
    ``labels`` ``[B, 2]`` (the classes of ``first`` and ``second``), ``valid`` ``[B]`` bool
    (False where the batch held no garment of another class: that row pairs a garment with
    itself and must not count)."""

    composite: Tensor
    first: Tensor
    second: Tensor
    labels: Tensor
    valid: Tensor


def choose_partners(labels: Tensor, generator: torch.Generator | None = None
                    ) -> tuple[Tensor, Tensor]:
    """For each item, a partner of another class drawn uniformly from the same batch.

    Shapes: ``labels`` ``[B]`` -> ``(partner [B] indices, valid [B] bool)``; where no item
    of another class exists the partner is the item itself and ``valid`` False. Uses
    ``generator`` (default: the global generator of ``labels``' device).
    """
    b = labels.shape[0]
    other = labels[None, :] != labels[:, None]  # [B, B]: j may partner i
    scores = torch.rand(b, b, device=labels.device, generator=generator)
    partner = scores.masked_fill(~other, -1.0).argmax(dim=1)
    valid = other.any(dim=1)
    return torch.where(valid, partner, torch.arange(b, device=labels.device)), valid


def make_pairs(x: Tensor, y: Tensor, max_shift: int = MAX_SHIFT) -> PairBatch:
    """A training batch of garments -> a batch of overlaid pairs, on ``x``'s device, drawn
    from the global torch random generator: partners (:func:`choose_partners`), then one
    ``(dy, dx)`` per garment of each pair, uniform in ``-max_shift .. max_shift``.

    Shapes: ``x`` ``[B, C, 28, 28]`` floats in [0, 1], ``y`` ``[B]`` -> :class:`PairBatch`
    of ``[B, C, 28 + 2 max_shift, ...]`` images.
    """
    partner, valid = choose_partners(y)
    s = torch.randint(-max_shift, max_shift + 1, (x.shape[0], 2, 2), device=x.device)
    first = place(x, s[:, 0, 0], s[:, 0, 1], max_shift)
    second = place(x[partner], s[:, 1, 0], s[:, 1, 1], max_shift)
    return PairBatch(overlay(first, second), first, second,
                     torch.stack([y, y[partner]], dim=1), valid)


# --------------------------------------------------------------------------- fixed pair sets

def pair_table(labels: Tensor, partners: int, seed: int, max_shift: int = MAX_SHIFT
               ) -> dict[str, Tensor]:
    """Which garments make which fixed pair, and their shifts (seeded, CPU, deterministic).

    Every item is the base (first garment) of ``partners`` pairs; pair ``k * N + i`` is
    item ``i``'s ``k``-th. Its partner is drawn uniformly from the items of the other
    classes. Returns ``first`` ``[M]``, ``second`` ``[M]`` indices into the split and
    ``shifts`` ``[M, 2, 2]`` (garment, (dy, dx)), ``M = partners * N``.
    """
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    first = torch.arange(len(labels)).repeat(partners)
    second = torch.empty_like(first)
    for c in labels.unique().tolist():  # ascending: a fixed order of draws
        mine = (labels[first] == c).nonzero().flatten()
        pool = (labels != c).nonzero().flatten()
        if len(pool) == 0:
            raise ValueError("fixed pairs need garments of at least two classes")
        second[mine] = pool[torch.randint(len(pool), (len(mine),), generator=g)]
    shifts = torch.randint(-max_shift, max_shift + 1, (len(first), 2, 2), generator=g)
    return {"first": first, "second": second, "shifts": shifts}


def compose_pairs(images: Tensor, labels: Tensor, table: dict[str, Tensor],
                  max_shift: int = MAX_SHIFT) -> tuple[Tensor, Tensor]:
    """The packed pair images and their labels from a :func:`pair_table` (integer
    arithmetic only: the same table always gives the same bytes).

    Shapes: ``images`` ``[N, C, 28, 28]`` uint8, ``labels`` ``[N]`` -> ``(packed
    [M, 3C, 36, 36] uint8: composite, first, second; pair labels [M, 2] int64)``.
    """
    i, j, s = table["first"], table["second"], table["shifts"]
    first = place(images[i], s[:, 0, 0], s[:, 0, 1], max_shift)
    second = place(images[j], s[:, 1, 0], s[:, 1, 1], max_shift)
    packed = torch.cat([overlay(first, second), first, second], dim=1).contiguous()
    return packed, torch.stack([labels[i], labels[j]], dim=1).long()


def is_pair_set(ds) -> bool:
    """True for a packed pair split (labels ``[N, 2]`` int64; multi-label data has uint8
    k-hot labels)."""
    return ds.labels.dim() == 2 and ds.labels.dtype == torch.int64


def split_packed(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``[B, 3C, H, W]`` -> ``(composite, first, second)``, each ``[B, C, H, W]`` (views)."""
    c = x.shape[1] // 3
    return x[:, :c], x[:, c:2 * c], x[:, 2 * c:]


def pair_correct(scores: Tensor, labels: Tensor) -> Tensor:
    """The paper's scoring: the two highest scores are exactly the pair's two classes.

    Shapes: ``scores`` ``[B, O]`` (capsule lengths or class probabilities), ``labels``
    ``[B, 2]`` -> ``[B]`` bool.
    """
    top2 = scores.topk(2, dim=1).indices.sort(dim=1).values
    return (top2 == labels.to(top2.device).sort(dim=1).values).all(dim=1)


def pair_k_hot(labels: Tensor, num_classes: int) -> Tensor:
    """``[B, 2]`` class pairs -> ``[B, O]`` 0/1 targets with both classes set."""
    return F.one_hot(labels, num_classes).amax(dim=1)


# --------------------------------------------------------------------------- overlap

def bounding_boxes(images: Tensor, threshold: int | float = 0) -> Tensor:
    """The box around each image's pixels above ``threshold`` (any channel):
    ``[N, C, H, W]`` -> ``[N, 4]`` int64 ``(top, left, bottom, right)``, bottom and right
    exclusive; an empty image gets ``(0, 0, 0, 0)``."""
    ink = (images > threshold).any(dim=1)  # [N, H, W]
    rows, cols = ink.any(dim=2), ink.any(dim=1)  # [N, H], [N, W]

    def span(m: Tensor) -> tuple[Tensor, Tensor]:
        n = m.shape[1]
        lo = m.int().argmax(dim=1)
        hi = n - m.flip(1).int().argmax(dim=1)
        has = m.any(dim=1)
        return torch.where(has, lo, 0), torch.where(has, hi, 0)

    top, bottom = span(rows)
    left, right = span(cols)
    return torch.stack([top, left, bottom, right], dim=1).long()


def _areas(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Intersection, area of ``a`` and area of ``b`` of boxes ``[N, 4]`` -> ``[N]`` each."""
    h = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    w = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    area = lambda r: (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])  # noqa: E731
    return (h * w).double(), area(a).double(), area(b).double()


def box_overlap(a: Tensor, b: Tensor) -> Tensor:
    """Overlap of two boxes as the paper counts it for equal boxes: the intersection's area
    over the smaller box's area (1: one box lies inside the other; 0: disjoint or empty).

    Shapes: ``[N, 4]`` x2 ``(top, left, bottom, right)`` -> ``[N]`` float64.
    """
    inter, area_a, area_b = _areas(a, b)
    smaller = torch.minimum(area_a, area_b)
    return torch.where(smaller > 0, inter / smaller.clamp(min=1), torch.zeros_like(inter))


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over union of two boxes: ``[N, 4]`` x2 -> ``[N]`` float64."""
    inter, area_a, area_b = _areas(a, b)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def pair_overlap(packed: Tensor) -> dict[str, float]:
    """Mean bounding-box overlap of a packed pair set's two garments (the paper reports
    80% for MultiMNIST): ``overlap`` (:func:`box_overlap`) and ``iou`` (:func:`box_iou`),
    over the ``n`` pairs. Shapes: ``packed`` ``[N, 3C, H, W]``."""
    _, first, second = split_packed(packed)
    a, b = bounding_boxes(first), bounding_boxes(second)
    return {"overlap": float(box_overlap(a, b).mean()), "iou": float(box_iou(a, b).mean()),
            "n": int(packed.shape[0])}
