"""Routing-by-agreement, fused: the same function as :func:`capsnet.routing.route_reference`,
with a hand-written backward and without ever holding all prediction vectors at once.

The reference (plain autograd) is the specification: ``tests/test_equivalence.py`` checks
values and gradients of everything here against it. Change the reference first, then this.

Axis letters: B batch, I input capsules, O output capsules, K input and D output capsule
dimension.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..routing import squash
from .precision import autocast_off


def squash_backward(s: Tensor, grad_v: Tensor, eps: float = 1e-8) -> Tensor:
    """Gradient of :func:`squash` at ``s``, in closed form (small ``[B, O, D]`` tensors).

    ``squash(s) = f(q) s`` with ``q = |s|^2`` and ``f(q) = q / ((1 + q) sqrt(q + eps))``, so
    ``grad_s = f g + 2 f'(q) (s . g) s`` with
    ``f'(q) = 1 / ((1 + q) sqrt(q + eps)) - f / (1 + q) - f / (2 (q + eps))``, finite at 0.
    """
    q = (s * s).sum(dim=-1, keepdim=True)
    inv = 1.0 / ((1.0 + q) * torch.sqrt(q + eps))
    f = q * inv
    f_prime = inv - f / (1.0 + q) - 0.5 * f / (q + eps)
    return f * grad_v + (2.0 * f_prime * (s * grad_v).sum(dim=-1, keepdim=True)) * s


# Routing by agreement, forward and backward, on a block of prediction vectors ``u`` of shape
# ``[b*O, I, D]``: one ``[I, D]`` matrix per (image, output capsule), any strides. Both
# contractions of Procedure 1 are then batched matrix-vector products over that block.

def route(u: Tensor, n_out: int, iterations: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Procedure 1 on ``u`` ``[b*O, I, D]``; returns ``(c [b, O, I], s, v [b, O, D])`` of
    every iteration (the last ``v`` is the output)."""
    n_in, dim = u.shape[1], u.shape[2]
    bsz = u.shape[0] // n_out
    # Iteration 1: b = 0, so c_ij = 1/O for every pair (softmax of zeros over outputs).
    c = u.new_full((bsz, n_out, n_in), 1.0 / n_out)
    logits, saved = None, []
    for it in range(iterations):
        if it > 0:
            c = torch.softmax(logits, dim=1)  # over OUTPUT capsules j
        # s_j = sum_i c_ij u_hat_{j|i}: [b*O, 1, I] @ [b*O, I, D]
        s = torch.bmm(c.view(-1, 1, n_in), u).view(bsz, n_out, dim)
        v = squash(s)
        saved.append((c, s, v))
        if it < iterations - 1:
            # agreement a_ij = u_hat_{j|i} . v_j: [b*O, I, D] @ [b*O, D, 1]
            a = torch.bmm(u, v.view(-1, dim, 1)).view(bsz, n_out, n_in)
            logits = a if logits is None else logits + a
    return saved


def route_backward(u: Tensor, saved, grad_v: Tensor, detach: bool) -> Tensor:
    """Gradient with respect to ``u`` ``[b*O, I, D]`` of the output ``v`` of :func:`route`.

    Autograd would keep and sum one ``u``-sized gradient per use of ``u`` (2r - 1 of them).
    Here the iterations are walked in reverse with two matrix-vector products each, and the
    gradient is built once, as a sum of 2r - 1 outer products (one batched matmul). With
    ``detach`` only the last ``s_j = sum_i c_ij u_hat_{j|i}`` carries gradient and the last
    couplings count as constants.
    """
    n_in, dim = u.shape[1], u.shape[2]
    last = len(saved) - 1
    first = last if detach else 0
    left, right = [], []  # grad u[(b, j), i, :] = sum_m left[m][b, j, i] * right[m][b, j, :]
    grad_logits = None  # gradient of the summed logits that iteration `it` started from
    for it in range(last, first - 1, -1):
        c, s, v = saved[it]
        if it < last:  # v fed the agreement a = u_hat . v, whose gradient is grad_logits
            grad_v = torch.bmm(grad_logits.view(-1, 1, n_in), u).view(v.shape)
            left.append(grad_logits)
            right.append(v)
        grad_s = squash_backward(s, grad_v)
        left.append(c)
        right.append(grad_s)
        if it > first:  # c = softmax_j(logits): back through the couplings
            grad_c = torch.bmm(u, grad_s.view(-1, dim, 1)).view(c.shape)
            grad_l = c * (grad_c - (grad_c * c).sum(dim=1, keepdim=True))
            grad_logits = grad_l if grad_logits is None else grad_logits + grad_l
    m = len(left)
    return torch.bmm(torch.stack(left, dim=-1).view(-1, n_in, m),
                     torch.stack(right, dim=-2).view(-1, m, dim))


class Routing(torch.autograd.Function):
    """Procedure 1 with the hand-written backward of :func:`route_backward`.

    Shapes: ``u_hat`` ``[B, O, I, D]`` -> ``v`` ``[B, O, D]``, ``c`` ``[B, O, I]`` (the last
    couplings, not differentiable).
    """

    @staticmethod
    def forward(ctx, u_hat: Tensor, iterations: int, detach: bool):
        bsz, n_out, n_in, dim = u_hat.shape
        saved = route(u_hat.reshape(bsz * n_out, n_in, dim), n_out, iterations)
        ctx.save_for_backward(u_hat, *[t for triple in saved for t in triple])
        ctx.detach = detach
        c, _, v = saved[-1]
        ctx.mark_non_differentiable(c)
        return v, c

    @staticmethod
    @autocast_off
    def backward(ctx, grad_v: Tensor, _grad_c):
        u_hat, *flat = ctx.saved_tensors
        saved = [flat[i:i + 3] for i in range(0, len(flat), 3)]
        bsz, n_out, n_in, dim = u_hat.shape
        grad = route_backward(u_hat.reshape(bsz * n_out, n_in, dim), saved, grad_v, ctx.detach)
        return grad.view(u_hat.shape), None, None


class PredictAndRoute(torch.autograd.Function):
    """Prediction vectors and routing, a few images at a time, never holding all of ``u_hat``.

    ``u_hat`` (``[B, O, I, D]``, 94 MB for a batch of 128 in the paper model) is made, routed
    and dropped per chunk of images while it is still in cache, and made again in the backward
    instead of being kept. Same math as :meth:`RoutingCapsules.predictions` followed by
    :class:`Routing`.

    Shapes: ``u`` ``[B, I, K]``, ``weight`` ``[I, K, O*D]`` -> ``v`` ``[B, O, D]``.
    """

    IMAGES = 4  # images per chunk on a CPU: 4 x 0.74 MB of u_hat in the paper model
    DEVICE_BYTES = 256 * 2 ** 20  # elsewhere (CUDA): the u_hat of one chunk, at most

    @staticmethod
    def chunk_images(u: Tensor, weight: Tensor) -> int:
        """Images per chunk. On a CPU :attr:`IMAGES`, so that a chunk's ``u_hat`` stays in
        cache (measured: docs/performance.md). On an accelerator, as many images as fit
        :attr:`DEVICE_BYTES` of ``u_hat``: there each of routing's small operations is a
        kernel launch, so chunks of 4 would launch them 32 times per batch of 128 (a choice
        by reasoning, not measured: nothing here ran on a GPU)."""
        if u.device.type == "cpu":
            return PredictAndRoute.IMAGES
        per_image = weight.shape[0] * weight.shape[2] * u.element_size()  # I * O*D values
        return max(1, PredictAndRoute.DEVICE_BYTES // per_image)

    @staticmethod
    def predict(u: Tensor, weight: Tensor, n_out: int) -> tuple[Tensor, Tensor]:
        """``u`` ``[b, I, K]`` -> ``u_hat`` ``[I, b, O*D]`` and its view ``[b*O, I, D]``."""
        u_hat = torch.bmm(u.transpose(0, 1), weight)  # [I, b, O*D]
        n_in = u_hat.shape[0]
        return u_hat, u_hat.view(n_in, -1, weight.shape[2] // n_out).transpose(0, 1)

    @staticmethod
    def run(u: Tensor, weight: Tensor, n_out: int, iterations: int) -> list:
        """Per chunk of images, the ``(c, s, v)`` of every routing iteration."""
        return [route(PredictAndRoute.predict(chunk, weight, n_out)[1], n_out, iterations)
                for chunk in u.split(PredictAndRoute.chunk_images(u, weight))]

    @staticmethod
    def outputs(chunks: list) -> Tensor:
        """The output capsules ``v`` ``[B, O, D]``: the last ``v`` of every chunk of :meth:`run`."""
        return torch.cat([saved[-1][2] for saved in chunks])

    @staticmethod
    def forward(ctx, u: Tensor, weight: Tensor, n_out: int, iterations: int, detach: bool):
        ctx.chunks = PredictAndRoute.run(u, weight, n_out, iterations)
        ctx.save_for_backward(u, weight)
        ctx.n_out, ctx.detach = n_out, detach
        return PredictAndRoute.outputs(ctx.chunks)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_v: Tensor):
        u, weight = ctx.saved_tensors
        n_in, k, n_od = weight.shape
        grad_u = torch.empty_like(u) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight)
        step = PredictAndRoute.chunk_images(u, weight)
        for i, saved in zip(range(0, u.shape[0], step), ctx.chunks):
            ui = u[i:i + step]
            b = ui.shape[0]
            _, u_hat = PredictAndRoute.predict(ui, weight, ctx.n_out)  # again
            g = route_backward(u_hat, saved, grad_v[i:i + step], ctx.detach)  # [b*O, I, D]
            g = g.view(b, ctx.n_out, n_in, -1).permute(2, 0, 1, 3).reshape(n_in, b, n_od)
            grad_w.baddbmm_(ui.permute(1, 2, 0), g)  # [I, K, b] @ [I, b, O*D]
            if grad_u is not None:
                grad_u[i:i + step] = torch.bmm(g, weight.transpose(1, 2)).transpose(0, 1)
        return grad_u, grad_w, None, None, None
