"""Data augmentation on whole batches of image tensors, a different draw for every image.

Everything here works on ``[B, C, H, W]`` float tensors on any device and uses the global
torch random generator (so a seed, and a checkpointed RNG state, reproduce it); under DDP
training draws inside :func:`process_draws`, so that the processes' draws differ.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from torch import Tensor
from torch.nn import functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation settings. The default is the paper's: shifts of up to 2 pixels only.

    ``rotate`` and ``shear`` are maximum angles in degrees, ``scale`` the maximum relative
    change of size (0.1 means 0.9x..1.1x), ``translate`` the maximum affine shift as a fraction
    of the image side, ``erase`` the probability of blanking a random rectangle
    (:func:`random_erase`); all draws are uniform and independent per image.
    """

    shift: int = 2
    rotate: float = 0.0
    scale: float = 0.0
    shear: float = 0.0
    translate: float = 0.0
    hflip: bool = False
    erase: float = 0.0
    crop: int = 0  # random crop x crop patches (data served larger, e.g. smallNORB); 0: off

    @property
    def affine(self) -> bool:
        return any(v > 0 for v in (self.rotate, self.scale, self.shear, self.translate))


# The user's augmentation settings (train flags and config keys); crop is the dataset's.
AUGMENT_FLAGS = tuple(f.name for f in fields(AugmentConfig) if f.name != "crop")


def _uniform(n: int, bound: float, like: Tensor) -> Tensor:
    return (torch.rand(n, device=like.device, dtype=like.dtype) * 2 - 1) * bound


def random_shift(x: Tensor, max_shift: int) -> Tensor:
    """Shift each image by its own integer (dy, dx) in [-max_shift, max_shift], zero-filled.

    Shapes: ``[B, C, H, W]`` -> ``[B, C, H, W]``.
    """
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    m = max_shift
    padded = F.pad(x, (m, m, m, m))
    dy = torch.randint(-m, m + 1, (b, 1), device=x.device)
    dx = torch.randint(-m, m + 1, (b, 1), device=x.device)
    rows = torch.arange(h, device=x.device) + m - dy  # [B, H]: source row of each output row
    cols = torch.arange(w, device=x.device) + m - dx  # [B, W]
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def random_affine(x: Tensor, cfg: AugmentConfig) -> Tensor:
    """Per-image random rotation, scale, shear and translation (bilinear, zero-filled)."""
    b = x.shape[0]
    angle = _uniform(b, math.radians(cfg.rotate), x)
    shear = _uniform(b, math.radians(cfg.shear), x)
    scale = 1 + _uniform(b, cfg.scale, x)
    t = _uniform(2 * b, 2 * cfg.translate, x).view(b, 2)  # grid units span 2 per side
    cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
    # Inverse map output -> input coordinates: rotation @ shear, divided by scale.
    a11, a12 = cos / scale, (cos * tan - sin) / scale
    a21, a22 = sin / scale, (sin * tan + cos) / scale
    theta = torch.stack([torch.stack([a11, a12, t[:, 0]], 1),
                         torch.stack([a21, a22, t[:, 1]], 1)], 1)  # [B, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_hflip(x: Tensor, p: float = 0.5) -> Tensor:
    """Mirror each image left-right with probability ``p``."""
    flip = torch.rand(x.shape[0], device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_erase(x: Tensor, p: float, area: tuple[float, float] = (0.02, 0.4),
                 aspect: float = 0.3) -> Tensor:
    """Random erasing (Zhong et al., 2017), per image: with probability ``p`` a rectangle
    covering ``area`` (a fraction drawn uniformly) of the image, with height/width ratio
    drawn log-uniformly in [``aspect``, 1/``aspect``], is set to 0.

    Zero, not the paper's random values: a capsule model's decoder reconstructs its input,
    and noise cannot be reconstructed; on Fashion-MNIST's black background a zero patch is
    an occlusion. Shapes: ``[B, C, H, W]`` -> ``[B, C, H, W]``.
    """
    if p <= 0:
        return x
    b, _, h, w = x.shape
    dev = x.device
    share = torch.empty(b, device=dev).uniform_(*area)
    ratio = torch.exp(torch.empty(b, device=dev).uniform_(math.log(aspect), -math.log(aspect)))
    eh = (torch.sqrt(share * h * w * ratio)).round().clamp(1, h)  # [B]
    ew = (torch.sqrt(share * h * w / ratio)).round().clamp(1, w)
    top = (torch.rand(b, device=dev) * (h - eh + 1)).floor()
    left = (torch.rand(b, device=dev) * (w - ew + 1)).floor()
    rows = torch.arange(h, device=dev)[None, :]  # [1, H]
    cols = torch.arange(w, device=dev)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])  # [B, H]
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # [B, W]
    hit = (torch.rand(b, device=dev) < p)[:, None, None]
    box = in_rows[:, :, None] & in_cols[:, None, :] & hit  # [B, H, W]
    return x.masked_fill(box[:, None], 0.0)


def random_crop(x: Tensor, size: int) -> Tensor:
    """A ``size x size`` patch of each image at its own random place.

    Shapes: ``[B, C, H, W]`` -> ``[B, C, size, size]``.
    """
    b, _, h, w = x.shape
    top = torch.randint(0, h - size + 1, (b, 1), device=x.device)
    left = torch.randint(0, w - size + 1, (b, 1), device=x.device)
    steps = torch.arange(size, device=x.device)
    rows, cols = top + steps, left + steps  # [B, size]
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [B, s, s, C]
    return out.permute(0, 3, 1, 2).contiguous()


@contextmanager
def process_draws(rank: int, world: int, device: torch.device) -> Iterator[None]:
    """Random draws of its own for each data-parallel process, inside the block.

    Under DDP every process seeds the global generator alike, and it must stay alike: a
    checkpoint keeps process 0's state and a resume gives it to every process. Drawn from
    it, augmentation would repeat the same shifts and flips at the same batch position in
    every process. Inside this block each process draws from a stream seeded by one draw
    of the shared one (the same in every process, which keeps them alike) plus its rank;
    the shared generator's state is restored afterwards, so a resume stays exact. With one
    process (``world == 1``) nothing changes: the global generator draws, as before.
    """
    if world == 1:
        yield
        return
    base = int(torch.randint(0, 2 ** 62, (1,)).item())
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(base + rank)
        yield


def augment(x: Tensor, cfg: AugmentConfig) -> Tensor:
    """Apply the configured augmentations to a training batch ``[B, C, H, W]``
    (``[B, C, crop, crop]`` out when ``cfg.crop``)."""
    if cfg.crop:
        x = random_crop(x, cfg.crop)
    if cfg.hflip:
        x = random_hflip(x)
    if cfg.affine:
        x = random_affine(x, cfg)
    x = random_shift(x, cfg.shift)
    return random_erase(x, cfg.erase)
