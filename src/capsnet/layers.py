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


class _ConvAsGemm(torch.autograd.Function):
    """A strided, unpadded convolution as im2col + one GEMM per chunk of images (CPU path).

    On this CPU a plain GEMM runs near the multiply-add peak while oneDNN's 9x9 stride-2
    convolution, above all its backward, does not (``capsnet bench``; README, Performance).
    The im2col matrix of a chunk is a copy of a strided *view* of the channels-last input (each
    window row of ``k * C`` numbers is contiguous). Chunks of ``ROWS`` output positions share
    one buffer, so no step allocates (and page-faults in) a huge matrix; the backward rebuilds
    the im2col matrix instead of keeping it.

    Shapes: ``h`` ``[B, H, W, C]`` (contiguous, i.e. channels-last), ``weight`` ``[O, k*k*C]``
    (ordered kh, kw, c), ``bias`` ``[O]`` -> ``[B, H', W', O]``.
    """

    ROWS = 256  # output positions per chunk: a 20 MB im2col buffer for PrimaryCaps

    @staticmethod
    def windows(h: Tensor, k: int, stride: int) -> Tensor:
        """``[n, H, W, C]`` -> view ``[n, H', W', k, k, C]`` of every k x k window."""
        n, hh, ww, c = h.shape
        sn, sh, sw, sc = h.stride()
        shape = (n, conv_output_size(hh, k, stride), conv_output_size(ww, k, stride), k, k, c)
        return h.as_strided(shape, (sn, stride * sh, stride * sw, sh, sw, sc))

    @staticmethod
    def chunks(h: Tensor, k: int, stride: int):
        """Yield ``(first image, im2col [rows, k*k*C] of the chunk)``, reusing one buffer."""
        n, hh, ww, c = h.shape
        positions = conv_output_size(hh, k, stride) * conv_output_size(ww, k, stride)
        step = max(1, _ConvAsGemm.ROWS // positions)  # images per chunk
        buffer = h.new_empty(min(step, n) * positions * k * k * c)
        for i in range(0, n, step):
            win = _ConvAsGemm.windows(h[i:i + step], k, stride)
            cols = buffer[:win.numel()].view(win.shape)
            cols.copy_(win)
            yield i, cols.view(-1, k * k * c)

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor, k: int, stride: int) -> Tensor:
        n, hh, ww, _ = h.shape
        o = weight.shape[0]
        out = h.new_empty(n, conv_output_size(hh, k, stride), conv_output_size(ww, k, stride), o)
        for i, cols in _ConvAsGemm.chunks(h, k, stride):
            rows = out.view(-1, o)[i * out.shape[1] * out.shape[2]:][:cols.shape[0]]
            torch.addmm(bias, cols, weight.t(), out=rows)  # [rows, O]
        ctx.save_for_backward(h, weight)
        ctx.k, ctx.stride = k, stride
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, weight = ctx.saved_tensors
        k, stride = ctx.k, ctx.stride
        n, hh, ww, c = h.shape
        positions = grad.shape[1] * grad.shape[2]
        grad = grad.contiguous().view(-1, weight.shape[0])  # [B*H'*W', O]
        g_weight = torch.zeros_like(weight)
        g_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        g_cols = index = None
        for i, cols in _ConvAsGemm.chunks(h, k, stride):
            g = grad[i * positions:][:cols.shape[0]]  # [rows, O]
            g_weight.addmm_(g.t(), cols)
            if g_h is None:
                continue
            if g_cols is None:
                g_cols = torch.empty_like(cols)
                # col2im as one index_add: im2col entry (b, y, x, kh, kw) came from input pixel
                # (b, stride*y + kh, stride*x + kw); ``index`` numbers those pixels in a chunk.
                pixels = torch.arange(cols.shape[0] // positions * hh * ww, device=h.device)
                index = _ConvAsGemm.windows(pixels.view(-1, hh, ww, 1), k, stride).reshape(-1)
            gc = torch.mm(g, weight, out=g_cols[:cols.shape[0]]).view(-1, c)  # [rows*k*k, C]
            g_hi = g_h[i:i + cols.shape[0] // positions].zero_().view(-1, c)
            g_hi.index_add_(0, index[:gc.shape[0]], gc)
        g_bias = grad.sum(0) if ctx.needs_input_grad[2] else None
        return g_h, g_weight, g_bias, None, None


class PrimaryCapsules(nn.Module):
    """PrimaryCaps: ONE convolution with ``num_types * dim`` channels, regrouped into capsules.

    Every position of the output grid holds ``num_types`` capsules of dimension ``dim``
    (channel ``t * dim + k`` is dimension ``k`` of capsule type ``t``), then ``squash``.
    On CPU the convolution runs as im2col + GEMM (:class:`_ConvAsGemm`, same math and
    parameters as ``self.conv``); elsewhere, or with ``gemm=False``, as ``self.conv``.

    Shapes: ``x`` ``[B, C, H, W]`` -> ``u`` ``[B, I, K]`` with ``I = H' * W' * num_types``,
    ``K = dim``; capsules are ordered (row, column, type).
    """

    def __init__(self, in_channels: int, num_types: int = 32, dim: int = 8,
                 kernel_size: int = 9, stride: int = 2, gemm: bool = True):
        super().__init__()
        self.num_types, self.dim, self.gemm = num_types, dim, gemm
        self.conv = nn.Conv2d(in_channels, num_types * dim, kernel_size, stride)

    def forward(self, x: Tensor) -> Tensor:
        conv = self.conv
        if self.gemm and x.device.type == "cpu":
            h = x.permute(0, 2, 3, 1).contiguous()  # [B, H, W, C]: free if x is channels-last
            # [O, C, k, k] -> [O, (kh, kw, c)]: free if the weight is channels-last
            weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)
            out = _ConvAsGemm.apply(h, weight, conv.bias, conv.kernel_size[0], conv.stride[0])
        else:
            out = conv(x).permute(0, 2, 3, 1)  # [B, H', W', T*K]; a view when channels-last
        return squash(out.reshape(out.shape[0], -1, self.dim))


def _squash_backward(s: Tensor, grad_v: Tensor, eps: float = 1e-8) -> Tensor:
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

def _route(u: Tensor, n_out: int, iterations: int) -> list[tuple[Tensor, Tensor, Tensor]]:
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


def _route_backward(u: Tensor, saved, grad_v: Tensor, detach: bool) -> Tensor:
    """Gradient with respect to ``u`` ``[b*O, I, D]`` of the output ``v`` of :func:`_route`.

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
        grad_s = _squash_backward(s, grad_v)
        left.append(c)
        right.append(grad_s)
        if it > first:  # c = softmax_j(logits): back through the couplings
            grad_c = torch.bmm(u, grad_s.view(-1, dim, 1)).view(c.shape)
            grad_l = c * (grad_c - (grad_c * c).sum(dim=1, keepdim=True))
            grad_logits = grad_l if grad_logits is None else grad_logits + grad_l
    m = len(left)
    return torch.bmm(torch.stack(left, dim=-1).view(-1, n_in, m),
                     torch.stack(right, dim=-2).view(-1, m, dim))


class _Routing(torch.autograd.Function):
    """Procedure 1 with the hand-written backward of :func:`_route_backward`.

    Shapes: ``u_hat`` ``[B, O, I, D]`` -> ``v`` ``[B, O, D]``, ``c`` ``[B, O, I]`` (the last
    couplings, not differentiable).
    """

    @staticmethod
    def forward(ctx, u_hat: Tensor, iterations: int, detach: bool):
        bsz, n_out, n_in, dim = u_hat.shape
        saved = _route(u_hat.reshape(bsz * n_out, n_in, dim), n_out, iterations)
        ctx.save_for_backward(u_hat, *[t for triple in saved for t in triple])
        ctx.detach = detach
        c, _, v = saved[-1]
        ctx.mark_non_differentiable(c)
        return v, c

    @staticmethod
    def backward(ctx, grad_v: Tensor, _grad_c):
        u_hat, *flat = ctx.saved_tensors
        saved = [flat[i:i + 3] for i in range(0, len(flat), 3)]
        bsz, n_out, n_in, dim = u_hat.shape
        grad = _route_backward(u_hat.reshape(bsz * n_out, n_in, dim), saved, grad_v, ctx.detach)
        return grad.view(u_hat.shape), None, None


class _PredictAndRoute(torch.autograd.Function):
    """Prediction vectors and routing, a few images at a time, never holding all of ``u_hat``.

    ``u_hat`` (``[B, O, I, D]``, 94 MB for a batch of 128 in the paper model) is made, routed
    and dropped per chunk of images while it is still in cache, and made again in the backward
    instead of being kept. Same math as :meth:`RoutingCapsules.predictions` followed by
    :class:`_Routing`.

    Shapes: ``u`` ``[B, I, K]``, ``weight`` ``[I, K, O*D]`` -> ``v`` ``[B, O, D]``.
    """

    IMAGES = 4  # images per chunk: 4 x 0.74 MB of u_hat in the paper model

    @staticmethod
    def predict(u: Tensor, weight: Tensor, n_out: int) -> tuple[Tensor, Tensor]:
        """``u`` ``[b, I, K]`` -> ``u_hat`` ``[I, b, O*D]`` and its view ``[b*O, I, D]``."""
        u_hat = torch.bmm(u.transpose(0, 1), weight)  # [I, b, O*D]
        n_in = u_hat.shape[0]
        return u_hat, u_hat.view(n_in, -1, weight.shape[2] // n_out).transpose(0, 1)

    @staticmethod
    def run(u: Tensor, weight: Tensor, n_out: int, iterations: int) -> list:
        """Per chunk of images, the ``(c, s, v)`` of every routing iteration."""
        return [_route(_PredictAndRoute.predict(chunk, weight, n_out)[1], n_out, iterations)
                for chunk in u.split(_PredictAndRoute.IMAGES)]

    @staticmethod
    def outputs(chunks: list) -> Tensor:
        """The output capsules ``v`` ``[B, O, D]``: the last ``v`` of every chunk of :meth:`run`."""
        return torch.cat([saved[-1][2] for saved in chunks])

    @staticmethod
    def forward(ctx, u: Tensor, weight: Tensor, n_out: int, iterations: int, detach: bool):
        ctx.chunks = _PredictAndRoute.run(u, weight, n_out, iterations)
        ctx.save_for_backward(u, weight)
        ctx.n_out, ctx.detach = n_out, detach
        return _PredictAndRoute.outputs(ctx.chunks)

    @staticmethod
    def backward(ctx, grad_v: Tensor):
        u, weight = ctx.saved_tensors
        n_in, k, n_od = weight.shape
        grad_u = torch.empty_like(u) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight)
        step = _PredictAndRoute.IMAGES
        for i, saved in zip(range(0, u.shape[0], step), ctx.chunks):
            ui = u[i:i + step]
            b = ui.shape[0]
            _, u_hat = _PredictAndRoute.predict(ui, weight, ctx.n_out)  # again
            g = _route_backward(u_hat, saved, grad_v[i:i + step], ctx.detach)  # [b*O, I, D]
            g = g.view(b, ctx.n_out, n_in, -1).permute(2, 0, 1, 3).reshape(n_in, b, n_od)
            grad_w.baddbmm_(ui.permute(1, 2, 0), g)  # [I, K, b] @ [I, b, O*D]
            if grad_u is not None:
                grad_u[i:i + step] = torch.bmm(g, weight.transpose(1, 2)).transpose(0, 1)
        return grad_u, grad_w, None, None, None


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
        contractions are then plain batched matrix multiplies over that matrix.
        """
        _, u_hat = _PredictAndRoute.predict(u, self.weight, self.out_caps)  # [B*O, I, D] view
        return u_hat.contiguous().view(u.shape[0], self.out_caps, self.in_caps, self.out_dim)

    def forward(self, u: Tensor) -> Tensor:
        """Same as ``route(predictions(u))``, chunk by chunk (see :class:`_PredictAndRoute`)."""
        if torch.is_grad_enabled() and (u.requires_grad or self.weight.requires_grad):
            return _PredictAndRoute.apply(u, self.weight, self.out_caps, self.iterations,
                                          self.detach_routing and self.iterations > 1)
        return _PredictAndRoute.outputs(
            _PredictAndRoute.run(u, self.weight, self.out_caps, self.iterations))

    def route(self, u_hat: Tensor) -> Tensor:
        """Procedure 1 of the paper. ``u_hat`` ``[B, O, I, D]`` -> ``v`` ``[B, O, D]``."""
        v, _ = self.route_with_couplings(u_hat)
        return v

    def route_with_couplings(self, u_hat: Tensor) -> tuple[Tensor, Tensor]:
        """Like :meth:`route`, also returning the last coupling coefficients ``c`` ``[B, O, I]``."""
        detach = self.detach_routing and self.iterations > 1
        return _Routing.apply(u_hat, self.iterations, detach)


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
