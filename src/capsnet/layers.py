"""The building blocks of a CapsNet (Sabour, Frosst & Hinton, 2017).

Names from the paper, explained once:

- *capsule*: a group of neurons whose activity vector's length is the probability that an
  entity is present and whose orientation encodes its pose ("instantiation parameters").
- ``u_i``: the output of capsule ``i`` of the lower (primary) layer.
- ``u_hat_{j|i} = W_ij u_i``: the *prediction vector*, what input capsule ``i`` predicts for
  output capsule ``j``.
- ``b_ij``: routing logits, start at 0; ``c_ij = softmax_j(b_ij)``: *coupling coefficients*,
  a softmax over the OUTPUT capsules ``j``, so each input capsule distributes a total weight
  of 1 over the classes.
- ``s_j = sum_i c_ij u_hat_{j|i}``, ``v_j = squash(s_j)``: the output capsules.
- *agreement* ``u_hat_{j|i} . v_j`` is added to ``b_ij`` after every iteration
  (routing-by-agreement, Procedure 1 of the paper).

Axis letters used in shapes below: B batch, I input capsules, O output capsules,
K input capsule dimension, D output capsule dimension.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def squash(s: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """Shrink a vector to a length in [0, 1) without changing its direction.

    ``squash(s) = |s|^2 / (1 + |s|^2) * s / |s|``, with ``eps`` inside the square root so that
    the value and the gradient are finite (zero) at ``s = 0``.

    Shapes: ``s`` is ``[..., D]`` (capsule vectors along ``dim``); the result has the same shape.
    """
    sq = (s * s).sum(dim=dim, keepdim=True)
    return s * (sq / ((1.0 + sq) * torch.sqrt(sq + eps)))


def conv_output_size(size: int, kernel_size: int, stride: int) -> int:
    """Spatial size after an unpadded convolution."""
    return (size - kernel_size) // stride + 1


class PrimaryCapsules(nn.Module):
    """PrimaryCaps: ONE convolution with ``num_types * dim`` channels, regrouped into capsules.

    Every position of the output grid holds ``num_types`` capsules of dimension ``dim``
    (channel ``t * dim + k`` is dimension ``k`` of capsule type ``t``), then ``squash``.

    Shapes: ``x`` ``[B, C, H, W]`` -> ``u`` ``[B, I, K]`` with ``I = H' * W' * num_types``,
    ``K = dim``; capsules are ordered (row, column, type).
    """

    def __init__(self, in_channels: int, num_types: int = 32, dim: int = 8,
                 kernel_size: int = 9, stride: int = 2):
        super().__init__()
        self.num_types, self.dim = num_types, dim
        self.conv = nn.Conv2d(in_channels, num_types * dim, kernel_size, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)  # [B, T*K, H', W']
        # [B, H', W', T*K] is free when `out` is channels_last and a small copy otherwise.
        u = out.permute(0, 2, 3, 1).reshape(out.shape[0], -1, self.dim)
        return squash(u)


class RoutingCapsules(nn.Module):
    """DigitCaps: prediction vectors ``u_hat = W_ij u_i`` and routing-by-agreement.

    ``weight`` holds one ``K x D`` matrix per (input capsule i, output capsule j), stored as
    ``[I, K, O*D]`` so that all predictions come from one batched matrix multiply.

    ``iterations`` is the number ``r`` of routing iterations (1 means uniform coupling).
    With ``detach_routing`` the intermediate iterations (not the last) see detached
    predictions, a cheaper variant; the paper's authors let gradients flow through all of them,
    which is the default here.

    Shapes: ``u`` ``[B, I, K]`` -> ``v`` ``[B, O, D]``.
    """

    def __init__(self, in_caps: int, in_dim: int, out_caps: int, out_dim: int,
                 iterations: int = 3, detach_routing: bool = False, init_std: float = 0.01):
        super().__init__()
        if iterations < 1:
            raise ValueError("routing needs at least one iteration")
        self.in_caps, self.in_dim, self.out_caps, self.out_dim = in_caps, in_dim, out_caps, out_dim
        self.iterations, self.detach_routing = iterations, detach_routing
        self.weight = nn.Parameter(init_std * torch.randn(in_caps, in_dim, out_caps * out_dim))

    def predictions(self, u: Tensor) -> Tensor:
        """``u`` ``[B, I, K]`` -> ``u_hat`` ``[B, O, I, D]``.

        Laid out so that each (b, j) pair owns a contiguous ``[I, D]`` matrix: both routing
        contractions below are then plain batched matrix multiplies over that matrix.
        """
        b = u.shape[0]
        u_hat = torch.bmm(u.transpose(0, 1), self.weight)  # [I, B, O*D]
        u_hat = u_hat.view(self.in_caps, b, self.out_caps, self.out_dim)
        return u_hat.permute(1, 2, 0, 3).contiguous()  # [B, O, I, D]

    def forward(self, u: Tensor) -> Tensor:
        return self.route(self.predictions(u))

    def route(self, u_hat: Tensor) -> Tensor:
        """Procedure 1 of the paper. ``u_hat`` ``[B, O, I, D]`` -> ``v`` ``[B, O, D]``."""
        v, _ = self.route_with_couplings(u_hat)
        return v

    def route_with_couplings(self, u_hat: Tensor) -> tuple[Tensor, Tensor]:
        """Like :meth:`route`, also returning the last coupling coefficients ``c`` ``[B, O, I]``."""
        bsz, n_out, n_in, _ = u_hat.shape
        # Iteration 1: b = 0, so c_ij = 1/O for every pair (softmax of zeros over outputs).
        c = u_hat.new_full((bsz, n_out, n_in), 1.0 / n_out)
        logits = None
        routed = u_hat.detach() if (self.detach_routing and self.iterations > 1) else u_hat
        for it in range(self.iterations):
            last = it == self.iterations - 1
            preds = u_hat if last else routed
            if it > 0:
                c = F.softmax(logits, dim=1)  # over OUTPUT capsules j
            # s_j = sum_i c_ij u_hat_{j|i}: [B*O, 1, I] @ [B*O, I, D]
            s = torch.matmul(c.unsqueeze(2), preds).squeeze(2)  # [B, O, D]
            v = squash(s)
            if not last:
                # agreement a_ij = u_hat_{j|i} . v_j: [B*O, I, D] @ [B*O, D, 1]
                a = torch.matmul(preds, v.unsqueeze(3)).squeeze(3)  # [B, O, I]
                logits = a if logits is None else logits + a
        return v, c


class Decoder(nn.Module):
    """Reconstruction network: FC 512 ReLU -> FC 1024 ReLU -> FC (C*H*W) sigmoid.

    It is fed the output capsules with every capsule but the selected one set to zero
    (the true class during training, the longest capsule at inference).

    Shapes: ``v`` ``[B, O, D]``, ``selected`` ``[B]`` (class indices) -> ``[B, C, H, W]``.
    """

    def __init__(self, num_caps: int, caps_dim: int, out_shape: tuple[int, int, int],
                 hidden: tuple[int, int] = (512, 1024)):
        super().__init__()
        self.out_shape = tuple(out_shape)
        n_out = out_shape[0] * out_shape[1] * out_shape[2]
        self.net = nn.Sequential(
            nn.Linear(num_caps * caps_dim, hidden[0]), nn.ReLU(inplace=True),
            nn.Linear(hidden[0], hidden[1]), nn.ReLU(inplace=True),
            nn.Linear(hidden[1], n_out), nn.Sigmoid(),
        )

    @staticmethod
    def mask(v: Tensor, selected: Tensor) -> Tensor:
        """Zero all capsules except ``selected``: ``[B, O, D]`` -> ``[B, O*D]``."""
        keep = F.one_hot(selected, v.shape[1]).to(v.dtype).unsqueeze(-1)  # [B, O, 1]
        return (v * keep).flatten(1)

    def forward(self, v: Tensor, selected: Tensor) -> Tensor:
        return self.net(self.mask(v, selected)).view(v.shape[0], *self.out_shape)
