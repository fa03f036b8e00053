"""Routing-by-agreement (Procedure 1 of the paper) in plain PyTorch: the reference.

This is the readable specification of the routing. :mod:`capsnet.kernels.routing` computes
the same function faster, with a hand-written backward; the tests check it against this
module (values and gradients). ``RoutingCapsules(impl="reference")`` runs this one, and
``capsnet export`` uses it for ONNX (a graph of standard operators, no custom autograd).

Axis letters, as in the einsums below: b batch, i input capsules, o output capsules,
h output capsule dimension.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .paper import ROUTING_ITERATIONS


def squash(s: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """Shrink a vector to a length in [0, 1) without changing its direction.

    ``squash(s) = |s|^2 / (1 + |s|^2) * s / |s|``, with ``eps`` inside the square root so that
    the value and the gradient are finite (zero) at ``s = 0``.

    Shapes: ``s`` is ``[..., D]`` (capsule vectors along ``dim``); the result has the same shape.
    """
    sq = (s * s).sum(dim=dim, keepdim=True)
    return s * (sq / ((1.0 + sq) * torch.sqrt(sq + eps)))


def route_reference(u_hat: Tensor, iterations: int = ROUTING_ITERATIONS,
                    detach: bool = False) -> tuple[Tensor, Tensor]:
    """Procedure 1. ``u_hat`` ``[b, o, i, h]`` -> ``(v [b, o, h], c [b, o, i])``.

    ``b_ij = 0``; ``r`` times: ``c_i = softmax_j(b_i)`` (over the OUTPUT capsules, so each input
    capsule distributes a total weight of 1), ``s_j = sum_i c_ij u_hat_{j|i}``,
    ``v_j = squash(s_j)``, ``b_ij += u_hat_{j|i} . v_j``. Returns the last ``v`` and ``c``.

    With ``detach`` only the last iteration sees ``u_hat`` with its gradient; the earlier
    ones (which only choose the couplings) see it detached.
    """
    logits = u_hat.new_zeros(u_hat.shape[:3])  # b_ij, stored [b, o, i]
    for it in range(iterations):
        last = it == iterations - 1
        u = u_hat if (last or not detach) else u_hat.detach()
        c = torch.softmax(logits, dim=1)  # over the output capsules o
        v = squash(torch.einsum("boi,boih->boh", c, u))
        if not last:
            logits = logits + torch.einsum("boih,boh->boi", u, v)
    return v, c
