"""A naive CapsNet, written the way most public implementations are: the benchmark's baseline.

Used only by ``capsnet bench`` to measure the common practice under the same conditions as
:class:`capsnet.CapsNet` (same sizes, same math, same loss and optimizer); the library never
uses it. What makes it typical (and slow):

- PrimaryCaps as a Python list of ``dim`` (8) separate convolutions with ``num_types`` (32)
  channels each, whose outputs are stacked;
- prediction vectors from a broadcast matmul of ``[1, B, I, 1, K]`` with ``[O, 1, I, K, D]``,
  giving a 5-D ``[O, B, I, 1, D]`` tensor;
- routing by broadcast-multiply-and-sum over that 5-D tensor, with softmax over the classes
  (the correct axis), gradients flowing through every iteration;
- default (NCHW) memory layout.

Axis letters: B batch, I input capsules, O output capsules, K = 8, D = 16.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..layers import Decoder
from ..models.base import CapsuleOutput as CapsNetOutput
from ..models.capsnet import CapsNetConfig


def _squash(s: Tensor, dim: int = -1) -> Tensor:
    """squash as public implementations write it (two full-size products with ``s``); kept
    apart from :func:`capsnet.squash` so that the measured baseline stays the common form."""
    sq = (s ** 2).sum(dim=dim, keepdim=True)
    return sq / (1 + sq) * s / torch.sqrt(sq + 1e-8)


class NaiveCapsNet(nn.Module):
    """Same network and outputs as :class:`capsnet.CapsNet`, in the common style."""

    def __init__(self, config: CapsNetConfig | None = None):
        super().__init__()
        self.config = c = config or CapsNetConfig()
        self.conv1 = nn.Conv2d(c.in_channels, c.conv_channels, c.conv_kernel)
        # one convolution per capsule dimension
        self.primary = nn.ModuleList(
            nn.Conv2d(c.conv_channels, c.primary_types, c.primary_kernel, c.primary_stride)
            for _ in range(c.primary_dim))
        # W: [O, I, K, D]
        self.W = nn.Parameter(0.01 * torch.randn(c.num_classes, c.num_primary_capsules,
                                                 c.primary_dim, c.class_dim))
        self.decoder = Decoder(c.num_classes, c.class_dim,
                               (c.in_channels, c.image_size, c.image_size), c.decoder_hidden)

    def forward(self, x: Tensor, target: Tensor | None = None) -> CapsNetOutput:
        b = x.shape[0]
        h = F.relu(self.conv1(x))
        u = [conv(h) for conv in self.primary]  # dim x [B, T, H', W']
        u = torch.stack(u, dim=-1).view(b, -1, self.config.primary_dim)  # [B, I, K]
        u = _squash(u)
        # priors: [1, B, I, 1, K] @ [O, 1, I, K, D] -> [O, B, I, 1, D]
        priors = u[None, :, :, None, :] @ self.W[:, None, :, :, :]
        logits = torch.zeros_like(priors)  # b_ij, broadcast along D
        iterations = self.config.routing_iterations
        for it in range(iterations):
            probs = F.softmax(logits, dim=0)  # over the classes
            outputs = _squash((probs * priors).sum(dim=2, keepdim=True))  # [O, B, 1, 1, D]
            if it < iterations - 1:
                logits = logits + (priors * outputs).sum(dim=-1, keepdim=True)
        v = outputs.squeeze(2).squeeze(2).transpose(0, 1)  # [B, O, D]
        lengths = v.norm(dim=-1)
        selected = lengths.argmax(dim=1) if target is None else target
        return CapsNetOutput(lengths, v, self.decoder(v, selected), selected)
