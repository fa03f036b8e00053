"""The paper's affine-robustness protocol (section 5.2) applied to Fashion-MNIST.

The paper trains on "expanded MNIST": each digit placed at a random position on a 40x40
black background (the authors' generator pads by 6 and shifts by up to 6 pixels,
``tensorflow/models`` ``research/capsules/README.md``), and tests on affNIST, whose digits
are transformed by random affine maps on a 40x40 canvas. Here:

- ``fashion-mnist-expanded``: training garments placed at a random position on the 40x40
  canvas, drawn per batch on the device (:func:`random_placement`: pad 6, then a shift
  uniform in ``-6 .. 6`` in each direction); the validation and test garments each at a
  fixed, seeded random position (:func:`fixed_placement`).
- ``fashion-mnist-affine``: the 10,000 test garments, each under its own seeded random affine
  map in affNIST's ranges (:data:`AFFNIST`, :func:`affine_set`), on the 40x40 canvas.

affNIST's ranges (Tijmen Tieleman, https://www.cs.toronto.edu/~tijmen/affNIST/, the section
on how the transformations were chosen): rotation up to 20 degrees either way; shearing
factor up to 0.2 either way; vertical and horizontal scaling, independently, by factors
between 0.8 and 1.2; translation such that the object stays inside the 40x40 image. NOTE:
these numbers were recalled, not read: the copy of that page available when this was
written holds only its introduction (40x40 images, "significant translations"); check them
against the page before publishing results (docs/robustness.md says the same).

How a map is built and applied (:func:`affine_matrices`, :func:`warp`): in pixel
coordinates (``x`` right, ``y`` down, pixel ``(i, j)`` centred at ``(j + 0.5, i + 0.5)``),
``A = R(rotation) @ Shear(shear) @ diag(scale_x, scale_y)`` with
``R(t) = [[cos t, sin t], [-sin t, cos t]]`` (positive angles turn the garment
counter-clockwise as displayed) and ``Shear(s) = [[1, s], [0, 1]]``; a garment point ``q``
lands at ``p = (20, 20) + t + A (q - (14, 14))``. Each canvas pixel is sampled bilinearly
(zero outside the garment) at ``q = (14, 14) + A^-1 (p - (20, 20) - t)``, in float64, and
rounded to uint8. The translation ``t`` is drawn uniformly among those that keep the
transformed box around the garment's ink inside the canvas (centred where none does).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from .augment import random_shift
from .multi import bounding_boxes, place

EXPANDED = 40  # canvas side of the expanded and the affine sets
GARMENT = 28


def pad_to(x: Tensor, canvas: int = EXPANDED) -> Tensor:
    """Centre ``[B, C, H, W]`` images on a ``canvas x canvas`` black canvas."""
    h, w = x.shape[-2:]
    top, left = (canvas - h) // 2, (canvas - w) // 2
    return F.pad(x, (left, canvas - w - left, top, canvas - h - top))


def random_placement(x: Tensor, canvas: int = EXPANDED) -> Tensor:
    """Training batches of the expanded set: each image at its own random position on the
    canvas (centred, then shifted by up to ``(canvas - side) / 2`` pixels each way; the
    global torch random generator of ``x``'s device).

    Shapes: ``[B, C, 28, 28]`` -> ``[B, C, canvas, canvas]``.
    """
    return random_shift(pad_to(x, canvas), (canvas - x.shape[-1]) // 2)


def fixed_placement(images: Tensor, seed: int, canvas: int = EXPANDED
                    ) -> tuple[Tensor, Tensor]:
    """Each image at a seeded random position (the same draw as :func:`random_placement`,
    but fixed): ``[N, C, 28, 28]`` -> ``(placed [N, C, canvas, canvas], shifts [N, 2]
    (dy, dx))``."""
    g = torch.Generator().manual_seed(seed)
    m = (canvas - images.shape[-1]) // 2
    shifts = torch.randint(-m, m + 1, (images.shape[0], 2), generator=g)
    return place(images, shifts[:, 0], shifts[:, 1], m), shifts


# --------------------------------------------------------------------------- affine maps

@dataclass(frozen=True)
class AffineRanges:
    """Bounds of the random affine maps: ``rotation`` (degrees, either way), ``shear``
    (shear factor, either way), ``scale`` (``(low, high)`` factor, drawn independently for
    the horizontal and the vertical axis), ``translate`` (True: uniform over the positions
    that keep the garment inside the canvas; False: centred)."""

    rotation: float = 20.0
    shear: float = 0.2
    scale: tuple[float, float] = (0.8, 1.2)
    translate: bool = True

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


AFFNIST = AffineRanges()  # affNIST's ranges (see the module docstring)
NONE = AffineRanges(rotation=0.0, shear=0.0, scale=(1.0, 1.0), translate=False)


def affine_matrices(rotation: Tensor, shear: Tensor, scale: Tensor) -> Tensor:
    """``A = R(rotation) @ Shear(shear) @ diag(scale)`` (see the module docstring).

    Shapes: ``rotation`` ``[N]`` degrees, ``shear`` ``[N]``, ``scale`` ``[N, 2]`` (x, y) ->
    ``[N, 2, 2]`` float64, acting on ``(x, y)`` column vectors.
    """
    t = torch.deg2rad(rotation.double())
    c, s = torch.cos(t), torch.sin(t)
    rot = torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    sh = torch.stack([torch.stack([one, shear.double()], -1), torch.stack([zero, one], -1)], -2)
    return rot @ sh @ torch.diag_embed(scale.double())


def _transformed_extent(boxes: Tensor, a: Tensor, source: int) -> tuple[Tensor, Tensor]:
    """Lowest and highest ``(x, y)`` of the garments' ink boxes after ``A``, relative to the
    canvas centre: boxes ``[N, 4]`` (top, left, bottom, right) -> ``([N, 2], [N, 2])``."""
    top, left, bottom, right = (boxes[:, k].double() for k in range(4))
    corners = torch.stack([torch.stack([left, top], -1), torch.stack([right, top], -1),
                           torch.stack([left, bottom], -1), torch.stack([right, bottom], -1)],
                          1) - source / 2  # [N, 4, 2]
    moved = corners @ a.transpose(1, 2)  # [N, 4, 2]
    return moved.amin(dim=1), moved.amax(dim=1)


def draw_affine(images: Tensor, ranges: AffineRanges, seed: int, canvas: int = EXPANDED
                ) -> dict[str, Tensor]:
    """Seeded random maps in ``ranges`` for ``images`` ``[N, C, 28, 28]``: ``rotation``
    ``[N]`` (degrees), ``shear`` ``[N]``, ``scale`` ``[N, 2]`` (x, y) and ``translation``
    ``[N, 2]`` (x, y pixels), all float64 on the CPU."""
    n = images.shape[0]
    u = torch.rand(n, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    lo, hi = ranges.scale
    params = {"rotation": (2 * u[:, 0] - 1) * ranges.rotation,
              "shear": (2 * u[:, 1] - 1) * ranges.shear,
              "scale": lo + u[:, 2:4] * (hi - lo)}
    if ranges.translate:
        a = affine_matrices(params["rotation"], params["shear"], params["scale"])
        low, high = _transformed_extent(bounding_boxes(images.cpu()), a, images.shape[-1])
        t_min, t_max = -canvas / 2 - low, canvas / 2 - high  # keeps [low, high] + t inside
        fits = t_min <= t_max
        t = torch.where(fits, t_min + u[:, 4:6] * (t_max - t_min), (t_min + t_max) / 2)
    else:
        t = torch.zeros(n, 2, dtype=torch.float64)
    params["translation"] = t
    return params


def warp(images: Tensor, params: dict[str, Tensor], canvas: int = EXPANDED) -> Tensor:
    """Apply the maps ``params`` (as :func:`draw_affine` returns) to ``images``: bilinear,
    zero outside the garment, float64 on the CPU, rounded.

    Shapes: ``[N, C, h, w]`` uint8 -> ``[N, C, canvas, canvas]`` uint8.
    """
    n, c, h, w = images.shape
    a = affine_matrices(params["rotation"], params["shear"], params["scale"])
    inv = torch.linalg.inv(a)  # [N, 2, 2]
    centres = torch.arange(canvas, dtype=torch.float64) + 0.5 - canvas / 2
    py, px = torch.meshgrid(centres, centres, indexing="ij")
    p = torch.stack([px, py], -1).view(1, -1, 2) - params["translation"].double().view(n, 1, 2)
    q = p @ inv.transpose(1, 2)  # [N, canvas^2, 2]: garment coordinates around its centre
    grid = torch.stack([q[..., 0] * 2 / w, q[..., 1] * 2 / h], -1).view(n, canvas, canvas, 2)
    out = F.grid_sample(images.double(), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def affine_set(images: Tensor, seed: int, ranges: AffineRanges = AFFNIST,
               canvas: int = EXPANDED, chunk: int = 2000) -> tuple[Tensor, dict[str, Tensor]]:
    """The affine test set: every image under its own seeded random map in ``ranges``.

    Shapes: ``[N, C, 28, 28]`` uint8 -> ``([N, C, canvas, canvas] uint8, the maps as
    :func:`draw_affine` returns them)``. Deterministic: the same images, seed and ranges
    give the same bytes (float64 on the CPU, in fixed chunks).
    """
    params = draw_affine(images, ranges, seed, canvas)
    out = [warp(images[i:i + chunk].cpu(), {k: v[i:i + chunk] for k, v in params.items()},
                canvas) for i in range(0, images.shape[0], chunk)]
    return torch.cat(out) if out else images.new_zeros(0, images.shape[1], canvas, canvas), \
        params
