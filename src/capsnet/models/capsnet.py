"""The CapsNet of the paper ("Dynamic Routing Between Capsules"), every size inferred from
the input shape, with an optional downsampling stem for larger images.

Why a stem: Conv1 (9x9, stride 1) and PrimaryCaps (9x9, stride 2) shrink the image by 16
pixels and then halve it, so the PrimaryCaps grid, the number ``I`` of primary capsules and
with it the prediction vectors ``u_hat`` ``[B, O, I, D]`` and DigitCaps' ``W`` ``[I, K, O*D]``
grow with the square of the image side: 1,152 capsules at 28 px, 18,432 at 64 px, 346,112
(a 104x104x32 grid) at 224 px, where ``W`` alone is 443M parameters. ``stem`` strided
convolutions in front of Conv1 each halve the side, so a 224 px image reaches Conv1 as 28x28
after three of them and the capsule layers cost what they cost at 28 px.

The design (``stem`` stages, each ``Conv2d(3x3, stride 2, padding 1)`` + ReLU, all
``stem_channels`` wide):

- *3x3, stride 2, padding 1*: the cheapest convolution that halves the side (``ceil(n/2)``)
  and sees every pixel; the padding keeps the border pixels and makes the arithmetic simple.
- *one width for every stage* (not doubled per stage as in classification networks): the
  stem only has to shrink the image, while Conv1 and PrimaryCaps stay the paper's feature
  extractors. Conv1's 9x9 kernel multiplies its input width by 81, so doubling (64, 128,
  256) would make Conv1 four times costlier at 224 px (2.1 vs 0.53 GMAC per image) and the
  stem three times (0.48 vs 0.17 GMAC), for the same capsule layers.
- *explicit, not automatic*: ``stem=0`` (the default) is the paper's model exactly, with the
  parameter names and counts of every checkpoint and shipped weights file; a config saved
  without the two fields loads as ``stem=0``. :func:`suggest_stem` gives the number of stages
  for an image size (halve until the side is at most 32).

The decoder reconstructs the full-size input (``C x H x W``) by default; at large sizes its
last layer, ``1024 x (C*H*W)`` weights (154M at 224x224x3, with Adam's two moments and the
gradient 2.5 GB), becomes the biggest part of the model. ``recon_size`` (``--recon-size``)
makes it reconstruct a smaller copy instead, ``C x r x r``, the input area-averaged to
``r x r`` (:func:`capsnet.losses.reconstruction_target`): 64 px costs 12.6M weights at
224x224x3. The reconstruction loss is still the sum of squared errors per image, now over
``C*r*r`` pixels, so the same ``recon_weight`` weighs it less; 0 (the default) is the paper's
full-size decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..layers import Decoder, PrimaryCapsules, RoutingCapsules, conv_output_size
from ..paper import ROUTING_ITERATIONS
from .base import CapsuleModel, CapsuleOutput, ConfigBase

STEM_KERNEL, STEM_STRIDE, STEM_PADDING = 3, 2, 1
STEM_MAX_SIDE = 32  # suggest_stem halves the image until its side is at most this


def stem_output_size(size: int, stages: int) -> int:
    """Side after ``stages`` stem convolutions (3x3, stride 2, padding 1): ``ceil`` halvings."""
    for _ in range(stages):
        size = conv_output_size(size + 2 * STEM_PADDING, STEM_KERNEL, STEM_STRIDE)
    return size


def suggest_stem(image_size: int, max_side: int = STEM_MAX_SIDE) -> int:
    """The number of stem stages for ``image_size``: halve until the side is at most ``max_side``.

    With the default 32: 0 up to 32 px (the paper's model), 1 for 64, 2 for 96 and 128, 3 for
    224. Conv1 then sees a 17..32 side (only an image of at most 32 px arrives smaller), so the
    PrimaryCaps grid is 1x1 to 8x8 (32 to 2,048 primary capsules) whatever the image size.
    Nothing picks it automatically: pass it as ``CapsNetConfig(stem=...)``
    (``capsnet train --stem``, ``capsnet bench --stem``).
    """
    if image_size < 1 or max_side < 1:
        raise ValueError("image_size and max_side must be positive")
    stages = 0
    while stem_output_size(image_size, stages) > max_side:
        stages += 1
    return stages


@dataclass(frozen=True)
class CapsNetConfig(ConfigBase):
    """Every size of the network. The defaults are the paper's model for 28x28x1, 10 classes.

    ``stem`` strided 3x3 convolutions of ``stem_channels`` channels each run before Conv1
    (0, the default: none, the paper's model; see the module docstring and
    :func:`suggest_stem`).
    """

    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    conv_channels: int = 256
    conv_kernel: int = 9
    primary_types: int = 32
    primary_dim: int = 8
    primary_kernel: int = 9
    primary_stride: int = 2
    class_dim: int = 16
    routing_iterations: int = ROUTING_ITERATIONS
    detach_routing: bool = False
    decoder_hidden: tuple[int, int] = (512, 1024)
    routing_impl: str = "fused"  # how to run the routing (same function): fused | reference
    # Last, with defaults: configs saved before the stem existed load as stem=0.
    stem: int = 0
    stem_channels: int = 64
    multi_label: bool = False  # k-hot targets; see models.base.CapsuleModel
    recon_size: int = 0  # side of the decoder's output (0: the image's; see the module doc)

    @property
    def decoder_size(self) -> int:
        """Side of the reconstructions: ``recon_size``, or the image side when it is 0."""
        return self.recon_size or self.image_size

    @property
    def stem_output_size(self) -> int:
        """Side of what Conv1 sees: the image side halved (rounding up) ``stem`` times."""
        return stem_output_size(self.image_size, self.stem)

    @property
    def primary_grid(self) -> int:
        """Side of the PrimaryCaps grid (6 for 28x28 inputs; 6 for 224x224 with ``stem=3``)."""
        after_conv1 = conv_output_size(self.stem_output_size, self.conv_kernel, 1)
        return conv_output_size(after_conv1, self.primary_kernel, self.primary_stride)

    @property
    def num_primary_capsules(self) -> int:
        """``I``: 6 * 6 * 32 = 1152 for the paper's model."""
        return self.primary_grid ** 2 * self.primary_types


CapsNetOutput = CapsuleOutput  # the name this output had before the registry


class CapsNet(CapsuleModel):
    """[stem ->] Conv1 -> PrimaryCaps -> DigitCaps (routing-by-agreement) -> lengths, plus the
    decoder.

    ``forward(x, target=None)``: ``x`` ``[B, C, H, W]`` with pixel values in [0, 1];
    ``target`` ``[B]`` selects the capsule fed to the decoder (the true class during
    training); without it the longest capsule is used. The reconstructions are
    ``[B, C, r, r]``, ``r`` = ``config.decoder_size`` (the input's own size unless
    ``recon_size`` is set), with or without a stem.

    Shapes with a stem of ``s`` stages (``n = ceil(H / 2^s)``): ``x`` ``[B, C, H, H]`` ->
    stem ``[B, stem_channels, n, n]`` -> Conv1 ``[B, conv_channels, n - 8, n - 8]`` ->
    PrimaryCaps ``u`` ``[B, I, K]`` -> DigitCaps ``v`` ``[B, O, D]``.
    """

    def __init__(self, config: CapsNetConfig | None = None, **overrides):
        super().__init__()
        config = config or CapsNetConfig()
        if overrides:
            config = CapsNetConfig.from_dict({**config.to_dict(), **overrides})
        if config.stem < 0 or config.stem_channels < 1:
            raise ValueError(f"stem must be >= 0 and stem_channels >= 1, got stem="
                             f"{config.stem}, stem_channels={config.stem_channels}")
        if not 0 <= config.recon_size <= config.image_size:
            raise ValueError(f"recon_size must be between 0 (the image size) and the image "
                             f"size {config.image_size}, got {config.recon_size}")
        if config.primary_grid < 1:
            after = (f" after a {config.stem}-stage stem ({config.stem_output_size}x"
                     f"{config.stem_output_size})" if config.stem else "")
            raise ValueError(f"images of {config.image_size}x{config.image_size} are too small "
                             f"for the convolutions{after}")
        self.config = c = config
        # No stem: an empty Sequential, which is the identity and adds no parameters, so the
        # paper model's state_dict (names, order, count) is unchanged.
        layers, channels = [], c.in_channels
        for _ in range(c.stem):
            layers += [nn.Conv2d(channels, c.stem_channels, STEM_KERNEL, STEM_STRIDE,
                                 STEM_PADDING), nn.ReLU(inplace=True)]
            channels = c.stem_channels
        self.stem = nn.Sequential(*layers)
        self.conv1 = nn.Conv2d(channels, c.conv_channels, c.conv_kernel)
        self.primary = PrimaryCapsules(c.conv_channels, c.primary_types, c.primary_dim,
                                       c.primary_kernel, c.primary_stride)
        self.digits = RoutingCapsules(c.num_primary_capsules, c.primary_dim, c.num_classes,
                                      c.class_dim, c.routing_iterations, c.detach_routing,
                                      impl=c.routing_impl)
        self.decoder = Decoder(c.num_classes, c.class_dim,
                               (c.in_channels, c.decoder_size, c.decoder_size), c.decoder_hidden)
        # Channels-last convolution weights make the activations channels-last, the layout
        # PrimaryCapsules' GEMM path reads without a copy (and faster for oneDNN on CPU).
        self.to(memory_format=torch.channels_last)

    def capsules(self, x: Tensor) -> Tensor:
        """Output capsules only: ``[B, C, H, W]`` -> ``v`` ``[B, O, D]``."""
        # ReLU in place (also in the stem): a convolution's backward needs its input, not its
        # output, and ReLU's backward needs only its output.
        return self.digits(self.primary(F.relu(self.conv1(self.stem(x)), inplace=True)))
