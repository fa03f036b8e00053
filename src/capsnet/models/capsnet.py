"""The CapsNet of the paper ("Dynamic Routing Between Capsules"), every size inferred from
the input shape."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..layers import Decoder, PrimaryCapsules, RoutingCapsules, conv_output_size
from ..paper import ROUTING_ITERATIONS
from .base import CapsuleModel, CapsuleOutput, ConfigBase


@dataclass(frozen=True)
class CapsNetConfig(ConfigBase):
    """Every size of the network. The defaults are the paper's model for 28x28x1, 10 classes."""

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

    @property
    def primary_grid(self) -> int:
        """Side of the PrimaryCaps grid (6 for 28x28 inputs)."""
        after_conv1 = conv_output_size(self.image_size, self.conv_kernel, 1)
        return conv_output_size(after_conv1, self.primary_kernel, self.primary_stride)

    @property
    def num_primary_capsules(self) -> int:
        """``I``: 6 * 6 * 32 = 1152 for the paper's model."""
        return self.primary_grid ** 2 * self.primary_types


CapsNetOutput = CapsuleOutput  # the name this output had before the registry


class CapsNet(CapsuleModel):
    """Conv1 -> PrimaryCaps -> DigitCaps (routing-by-agreement) -> lengths, plus the decoder.

    ``forward(x, target=None)``: ``x`` ``[B, C, H, W]`` with pixel values in [0, 1];
    ``target`` ``[B]`` selects the capsule fed to the decoder (the true class during
    training); without it the longest capsule is used.
    """

    def __init__(self, config: CapsNetConfig | None = None, **overrides):
        super().__init__()
        config = config or CapsNetConfig()
        if overrides:
            config = CapsNetConfig.from_dict({**config.to_dict(), **overrides})
        if config.primary_grid < 1:
            raise ValueError(f"images of {config.image_size}x{config.image_size} are too small "
                             "for the convolutions")
        self.config = c = config
        self.conv1 = nn.Conv2d(c.in_channels, c.conv_channels, c.conv_kernel)
        self.primary = PrimaryCapsules(c.conv_channels, c.primary_types, c.primary_dim,
                                       c.primary_kernel, c.primary_stride)
        self.digits = RoutingCapsules(c.num_primary_capsules, c.primary_dim, c.num_classes,
                                      c.class_dim, c.routing_iterations, c.detach_routing,
                                      impl=c.routing_impl)
        self.decoder = Decoder(c.num_classes, c.class_dim,
                               (c.in_channels, c.image_size, c.image_size), c.decoder_hidden)
        # Channels-last convolution weights make the activations channels-last, the layout
        # PrimaryCapsules' GEMM path reads without a copy (and faster for oneDNN on CPU).
        self.to(memory_format=torch.channels_last)

    def capsules(self, x: Tensor) -> Tensor:
        """Output capsules only: ``[B, C, H, W]`` -> ``v`` ``[B, O, D]``."""
        # ReLU in place: the convolution's backward needs its input, not its output.
        return self.digits(self.primary(F.relu(self.conv1(x), inplace=True)))

