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

from .kernels.conv import ConvAsGemm, SpectralConv, conv_output_size
from .kernels.routing import PredictAndRoute, Routing
from .paper import ROUTING_ITERATIONS
from .routing import route_reference, squash

__all__ = ["squash", "conv_output_size", "PrimaryCapsules", "RoutingCapsules", "Decoder"]


def _autocast(x: Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type)


class PrimaryCapsules(nn.Module):
    """PrimaryCaps: ONE convolution with ``num_types * dim`` channels, regrouped into capsules.

    Every position of the output grid holds ``num_types`` capsules of dimension ``dim``
    (channel ``t * dim + k`` is dimension ``k`` of capsule type ``t``), then ``squash``.
    How the convolution runs (same math and parameters as ``self.conv`` in every case):
    ``algorithm="auto"`` (default) picks on CPU, per call, ``"dft"`` (:class:`SpectralConv`)
    when its cost model says it pays (batches of about 23 and more for the paper model), else
    ``"im2col"`` (:class:`ConvAsGemm`); ``"torch"`` is ``self.conv`` itself, always used off
    CPU. Without gradients the weight spectrum is kept (``_spectrum``, not saved) until the
    weights change.

    Shapes: ``x`` ``[B, C, H, W]`` -> ``u`` ``[B, I, K]`` with ``I = H' * W' * num_types``,
    ``K = dim``; capsules are ordered (row, column, type).
    """

    ALGORITHMS = ("auto", "dft", "im2col", "torch")

    def __init__(self, in_channels: int, num_types: int = 32, dim: int = 8,
                 kernel_size: int = 9, stride: int = 2, algorithm: str = "auto"):
        super().__init__()
        if algorithm not in self.ALGORITHMS:
            raise ValueError(f"algorithm must be one of {self.ALGORITHMS}, not {algorithm!r}")
        self.num_types, self.dim, self.algorithm = num_types, dim, algorithm
        self.conv = nn.Conv2d(in_channels, num_types * dim, kernel_size, stride)
        self._spectrum: tuple | None = None  # (what it was made from, weight spectrum)

    def forward(self, x: Tensor) -> Tensor:
        conv, algorithm = self.conv, self.algorithm
        # Under mixed precision (autocast) PyTorch's own convolution runs in the low precision;
        # the engines here are fp32 GEMMs.
        if algorithm == "torch" or x.device.type != "cpu" or _autocast(x):
            out = conv(x).permute(0, 2, 3, 1)  # [B, H', W', T*K]; a view when channels-last
            out = out.reshape(out.shape[0], -1, self.dim)
            return squash(out.float() if _autocast(x) else out)
        h = x.permute(0, 2, 3, 1).contiguous()  # [B, H, W, C]: free if x is channels-last
        k, s = conv.kernel_size[0], conv.stride[0]
        fixed = not (torch.is_grad_enabled() and conv.weight.requires_grad)
        if not fixed:
            self._spectrum = None
        if algorithm == "auto":
            algorithm = "dft" if SpectralConv.macs_saved(h, conv.weight, s) > 0 else "im2col"
        if algorithm == "dft":
            w_f = self._weight_spectrum(h) if fixed else None
            out = SpectralConv.apply(h, conv.weight, conv.bias, s, w_f)
        else:
            # [O, C, k, k] -> [O, (kh, kw, c)]: free if the weight is channels-last
            weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)
            out = ConvAsGemm.apply(h, weight, conv.bias, k, s)
        return squash(out.reshape(out.shape[0], -1, self.dim))

    def _weight_spectrum(self, h: Tensor) -> Tensor:
        """The weight spectrum for inputs like ``h``, made again only when the weights change."""
        w, s = self.conv.weight, self.conv.stride[0]
        key = (w.data_ptr(), w._version, h.dtype, h.shape[1:])
        if self._spectrum is None or self._spectrum[0] != key:
            tw = SpectralConv.matrices(h, w.shape[2], s)[1]
            self._spectrum = (key, SpectralConv.weight_spectrum(w.detach(), tw, s))
        return self._spectrum[1]


class RoutingCapsules(nn.Module):
    """DigitCaps: prediction vectors ``u_hat = W_ij u_i`` and routing-by-agreement.

    ``weight`` holds one ``K x D`` matrix per (input capsule i, output capsule j), stored as
    ``[I, K, O*D]`` so that all predictions come from one batched matrix multiply.

    ``iterations`` is the number ``r`` of routing iterations (1 means uniform coupling).
    With ``detach_routing`` the intermediate iterations (not the last) see detached
    predictions, a cheaper variant; the paper's authors let gradients flow through all of them,
    which is the default here.

    ``impl="fused"`` (default) runs :mod:`capsnet.kernels.routing` (chunked, hand-written
    backward); ``impl="reference"`` runs :func:`capsnet.routing.route_reference` in plain
    autograd. Same function, same parameters; the reference is the specification.

    Shapes: ``u`` ``[B, I, K]`` -> ``v`` ``[B, O, D]``.
    """

    IMPLS = ("fused", "reference")

    def __init__(self, in_caps: int, in_dim: int, out_caps: int, out_dim: int,
                 iterations: int = ROUTING_ITERATIONS, detach_routing: bool = False,
                 init_std: float = 0.01, impl: str = "fused"):
        super().__init__()
        if iterations < 1:
            raise ValueError("routing needs at least one iteration")
        if impl not in self.IMPLS:
            raise ValueError(f"impl must be one of {self.IMPLS}, not {impl!r}")
        self.in_caps, self.in_dim, self.out_caps, self.out_dim = in_caps, in_dim, out_caps, out_dim
        self.iterations, self.detach_routing, self.impl = iterations, detach_routing, impl
        self.weight = nn.Parameter(init_std * torch.randn(in_caps, in_dim, out_caps * out_dim))

    def predictions(self, u: Tensor) -> Tensor:
        """``u`` ``[B, I, K]`` -> ``u_hat`` ``[B, O, I, D]``: ``u_hat_{j|i} = W_ij u_i``."""
        w = self.weight.view(self.in_caps, self.in_dim, self.out_caps, self.out_dim)
        return torch.einsum("bik,ikoh->boih", u, w)

    def forward(self, u: Tensor) -> Tensor:
        if _autocast(u):  # routing (softmax, squash, agreements) stays in fp32
            with torch.autocast(u.device.type, enabled=False):
                return self.forward(u.float())
        detach = self.detach_routing and self.iterations > 1
        if self.impl == "reference":
            return route_reference(self.predictions(u), self.iterations, detach)[0]
        if torch.is_grad_enabled() and (u.requires_grad or self.weight.requires_grad):
            return PredictAndRoute.apply(u, self.weight, self.out_caps, self.iterations, detach)
        return PredictAndRoute.outputs(
            PredictAndRoute.run(u, self.weight, self.out_caps, self.iterations))

    def route(self, u_hat: Tensor) -> Tensor:
        """Procedure 1 of the paper. ``u_hat`` ``[B, O, I, D]`` -> ``v`` ``[B, O, D]``."""
        v, _ = self.route_with_couplings(u_hat)
        return v

    def route_with_couplings(self, u_hat: Tensor) -> tuple[Tensor, Tensor]:
        """Like :meth:`route`, also returning the last coupling coefficients ``c`` ``[B, O, I]``."""
        detach = self.detach_routing and self.iterations > 1
        if self.impl == "reference":
            return route_reference(u_hat, self.iterations, detach)
        return Routing.apply(u_hat.contiguous(), self.iterations, detach)


class Decoder(nn.Module):
    """Reconstruction network: FC 512 ReLU -> FC 1024 ReLU -> FC (C*H*W) sigmoid.

    It is fed the output capsules with every capsule but the selected one set to zero
    (the true class during training, the longest capsule at inference); on multi-label data
    every selected capsule is kept (the present classes).

    Shapes: ``v`` ``[B, O, D]``, ``selected`` ``[B]`` (class indices) or ``[B, O]`` (0/1 per
    capsule) -> ``[B, C, H, W]``.
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
        keep = selected if selected.dim() == 2 else F.one_hot(selected, v.shape[1])
        keep = keep.to(v.dtype).unsqueeze(-1)  # [B, O, 1]
        return (v * keep).flatten(1)

    def forward(self, v: Tensor, selected: Tensor) -> Tensor:
        return self.net(self.mask(v, selected)).view(v.shape[0], *self.out_shape)
