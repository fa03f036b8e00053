"""Efficient-CapsNet (Mazzia, Salvetti & Chiaberge, 2021, "Efficient-CapsNet: capsule network
with self-attention routing"), every size inferred from the input shape.

Four convolutions with batch norm -> depthwise PrimaryCaps (16 capsules of 8D from a 9x9
depthwise convolution over the whole 9x9 grid) -> FCCaps, a non-iterative self-attention
routing to one 16D capsule per class -> lengths, plus the paper's decoder.

Names: ``u`` ``[B, I, K]`` primary capsules; ``u_hat_{j|i} = W_ij u_i`` ``[B, O, I, D]``;
``A = u_hat u_hat^T / sqrt(D)`` per output capsule ``[B, O, I, I]``; the routing weight of
input ``i`` is ``C_ji = softmax_j(sum_k A_jik)`` (over the OUTPUT capsules, as in the authors'
code) plus a learned bias ``B_ji``; ``s_j = sum_i u_hat_{j|i} (C_ji + B_ji)``;
``v_j = squash_e(s_j)`` with ``squash_e(s) = (1 - 1/e^|s|) s/|s|``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..layers import Decoder, conv_output_size
from .base import CapsuleModel, ConfigBase


BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # Keras' BatchNormalization defaults (momentum 0.99)


def squash_exp(s: Tensor, dim: int = -1, eps: float = 1e-20) -> Tensor:
    """Efficient-CapsNet's squash ``(1 - 1/e^|s|) s/|s|``: length in [0, 1), finite at 0.

    Shapes: ``[..., D]`` -> ``[..., D]``.
    """
    norm = torch.sqrt((s * s).sum(dim=dim, keepdim=True) + eps)
    return (1 - torch.exp(-norm)) * s / norm


def self_attention_routing(u_hat: Tensor, bias: Tensor) -> Tensor:
    """The routing of FCCaps: ``u_hat`` ``[B, O, I, D]``, ``bias`` ``[O, I]`` ->
    ``s`` ``[B, O, D]``.

    ``A[b, o, i, k] = u_hat[b, o, i] . u_hat[b, o, k] / sqrt(D)``; ``C = softmax_o(sum_k A)``;
    ``s = sum_i u_hat (C + bias)``. The sum over ``k`` is taken first (one matrix-vector
    product: ``sum_k u_hat_i . u_hat_k = u_hat_i . sum_k u_hat_k``), so the ``I x I`` matrix
    is never formed.
    """
    logits = torch.einsum("boid,bod->boi", u_hat, u_hat.sum(dim=2)) / math.sqrt(u_hat.shape[-1])
    c = torch.softmax(logits, dim=1) + bias  # softmax over the output capsules o
    return torch.einsum("boi,boid->bod", c, u_hat)


@dataclass(frozen=True)
class EfficientCapsNetConfig(ConfigBase):
    """Every size of the network. The defaults are the authors' MNIST model (28x28x1, 10 classes).

    ``primary_kernel`` None means the whole grid the convolutions leave (9 for 28x28), so the
    depthwise convolution yields one ``primary_caps x primary_dim`` vector per image.
    """

    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    conv_channels: tuple[int, ...] = (32, 64, 64, 128)
    conv_kernels: tuple[int, ...] = (5, 3, 3, 3)
    conv_strides: tuple[int, ...] = (1, 1, 1, 2)
    primary_caps: int = 16
    primary_dim: int = 8
    primary_kernel: int | None = None
    class_dim: int = 16
    decoder_hidden: tuple[int, int] = (512, 1024)
    multi_label: bool = False  # k-hot targets; see models.base.CapsuleModel

    @property
    def grid(self) -> int:
        """Side of the grid after the convolutions (9 for 28x28 inputs)."""
        size = self.image_size
        for k, s in zip(self.conv_kernels, self.conv_strides):
            size = conv_output_size(size, k, s)
        return size


class FCCaps(nn.Module):
    """Fully connected capsules with self-attention routing (:func:`self_attention_routing`).

    ``weight`` ``[I, K, O, D]`` (one ``K x D`` matrix per pair), ``bias`` ``[O, I]`` (zeros at
    first). Shapes: ``u`` ``[B, I, K]`` -> ``v`` ``[B, O, D]``.
    """

    def __init__(self, in_caps: int, in_dim: int, out_caps: int, out_dim: int):
        super().__init__()
        # He-normal over the fan-in Keras computes for this 4-D weight (as the authors' code).
        std = math.sqrt(2.0 / (in_caps * in_dim * out_caps))
        self.weight = nn.Parameter(std * torch.randn(in_caps, in_dim, out_caps, out_dim))
        self.bias = nn.Parameter(torch.zeros(out_caps, in_caps))

    def predictions(self, u: Tensor) -> Tensor:
        """``u`` ``[B, I, K]`` -> ``u_hat`` ``[B, O, I, D]``."""
        return torch.einsum("bik,ikod->boid", u, self.weight)

    def forward(self, u: Tensor) -> Tensor:
        return squash_exp(self_attention_routing(self.predictions(u), self.bias))


class EfficientCapsNet(CapsuleModel):
    """Convs + BN -> depthwise PrimaryCaps -> FCCaps -> lengths, plus the decoder.

    ``forward(x, target=None)`` as :class:`capsnet.models.capsnet.CapsNet`: ``x``
    ``[B, C, H, W]`` in [0, 1]; ``target`` ``[B]`` picks the capsule fed to the decoder.
    """

    def __init__(self, config: EfficientCapsNetConfig | None = None, **overrides):
        super().__init__()
        config = config or EfficientCapsNetConfig()
        if overrides:
            config = EfficientCapsNetConfig.from_dict({**config.to_dict(), **overrides})
        c = self.config = config
        if c.grid < 1:
            raise ValueError(f"images of {c.image_size}x{c.image_size} are too small for the "
                             "convolutions")
        if c.conv_channels[-1] != c.primary_caps * c.primary_dim:
            raise ValueError("the last convolution must have primary_caps * primary_dim "
                             f"channels, got {c.conv_channels[-1]}")
        layers, channels = [], c.in_channels
        for out, k, s in zip(c.conv_channels, c.conv_kernels, c.conv_strides):
            # Conv -> ReLU -> BN, in the authors' order, with Keras' batch-norm defaults as
            # their code has them (moving average 0.99 = PyTorch momentum 0.01, eps 1e-3).
            layers += [nn.Conv2d(channels, out, k, s), nn.ReLU(inplace=True),
                       nn.BatchNorm2d(out, eps=BN_EPS, momentum=BN_MOMENTUM)]
            channels = out
        self.features = nn.Sequential(*layers)
        kernel = c.primary_kernel or c.grid
        self.primary = nn.Conv2d(channels, channels, kernel, groups=channels)  # depthwise
        n_primary = conv_output_size(c.grid, kernel, 1) ** 2 * c.primary_caps
        self.digits = FCCaps(n_primary, c.primary_dim, c.num_classes, c.class_dim)
        self.decoder = Decoder(c.num_classes, c.class_dim,
                               (c.in_channels, c.image_size, c.image_size), c.decoder_hidden)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def capsules(self, x: Tensor) -> Tensor:
        """Output capsules only: ``[B, C, H, W]`` -> ``v`` ``[B, O, D]``."""
        h = self.primary(self.features(x))  # [B, T*K, H', W']
        u = h.permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.config.primary_dim)
        return self.digits(squash_exp(u))

