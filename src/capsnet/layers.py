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

import functools

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


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class _SpectralConv(torch.autograd.Function):
    """A strided, unpadded convolution computed in the frequency domain (CPU path).

    With stride ``s`` the input splits into ``s * s`` *phases* (pixels ``(s*y + py, s*x + px)``),
    each an ``N_h x N_w`` grid, and the ``k x k`` kernel into phases of ``kp = ceil(k / s)``
    squared taps. The convolution is then a stride-1 correlation of every phase with its kernel
    phase, summed over phases and channels. A correlation is a product per frequency of the 2-D
    DFTs (the grid is just large enough that no output wraps around), so per frequency it is one
    small ``[B, s*s*C] x [s*s*C, O]`` complex matrix product. Each complex product is done with
    three real ones (Gauss: ``P1 = Xr Wr``, ``P2 = Xi Wi``, ``P3 = (Xr + Xi)(Wr - Wi)``), and the
    DFTs and the inverse DFT at the output pixels are constant matrices (``_spectral_matrices``),
    so everything is GEMMs. For the paper's PrimaryCaps (20 x 20 x 256 -> 6 x 6 x 256, 9 x 9,
    stride 2) that is 3.4 times fewer multiply-adds per image than the direct convolution, plus
    a per-batch transform of the weights; exact up to float rounding (tested against it).

    Shapes: ``h`` ``[B, H, W, C]`` (contiguous, channels-last), ``weight`` ``[O, C, k, k]``,
    ``w_f`` (optional, from :meth:`weight_spectrum`) -> ``[B, H', W', O]``.
    """

    @staticmethod
    def sizes(h_shape, k: int, s: int) -> tuple[int, int, int, int, int]:
        """``(N_h, N_w, kp, H', W')``: phase grid, kernel phase, output size."""
        hh, ww = h_shape[1], h_shape[2]
        return (_ceil_div(hh, s), _ceil_div(ww, s), _ceil_div(k, s),
                conv_output_size(hh, k, s), conv_output_size(ww, k, s))

    @staticmethod
    def matrices(h: Tensor, k: int, s: int) -> tuple[Tensor, Tensor, Tensor]:
        return _spectral_matrices(*_SpectralConv.sizes(h.shape, k, s), h.dtype, h.device)

    @staticmethod
    def weight_spectrum(weight: Tensor, tw: Tensor, s: int) -> Tensor:
        """``weight`` ``[O, C, k, k]`` -> its products' right-hand sides ``[R, O, s*s*C]``."""
        o, c, k = weight.shape[0], weight.shape[1], weight.shape[2]
        kp = _ceil_div(k, s)
        w = F.pad(weight.permute(0, 2, 3, 1), (0, 0, 0, s * kp - k, 0, s * kp - k))
        # phases of the kernel: [kp*kp taps, O*(py, px, c)]
        wt = w.reshape(o, kp, s, kp, s, c).permute(1, 3, 0, 2, 4, 5).reshape(kp * kp, -1)
        return torch.mm(tw, wt).view(tw.shape[0], o, -1)

    @staticmethod
    def macs_saved(h: Tensor, weight: Tensor, s: int) -> float:
        """Multiply-adds of the direct convolution minus those of this one: a cost model.

        The input transform counts double (a memory-bound GEMM), and each element of the
        weight spectrum 70 (155 MB for the paper model, read by every call, and in training
        also made, and its gradient written and read). Calibrated on this CPU with
        ``scripts/dft_crossover.py``: the DFT pays from a batch of about 23 for the paper
        model, training or inference (measured: im2col faster at 16, DFT at 32).
        """
        b, c, (o, k) = h.shape[0], h.shape[3], weight.shape[::2]
        nh, nw, _, oh, ow = _SpectralConv.sizes(h.shape, k, s)
        rows = _SpectralConv.matrices(h, k, s)[0].shape[0]
        per_image = rows * (2 * nh * nw * s * s * c + s * s * c * o + oh * ow * o)
        return b * (oh * ow * k * k * c * o - per_image) - 70 * rows * o * s * s * c

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor, s: int,
                w_f: Tensor | None = None) -> Tensor:
        b, hh, ww, c = h.shape
        o, k = weight.shape[0], weight.shape[2]
        nh, nw, _, oh, ow = _SpectralConv.sizes(h.shape, k, s)
        tx, tw, mo = _SpectralConv.matrices(h, k, s)
        # phases of the input: [N_h*N_w pixels, B*(py, px, c)], zero-padded to s*N
        h = F.pad(h, (0, 0, 0, s * nw - ww, 0, s * nh - hh))
        xt = h.view(b, nh, s, nw, s, c).permute(1, 3, 0, 2, 4, 5).reshape(nh * nw, -1)
        x_f = torch.mm(tx, xt).view(tx.shape[0], b, -1)  # [R, B, s*s*C]
        if w_f is None:
            w_f = _SpectralConv.weight_spectrum(weight, tw, s)  # [R, O, s*s*C]
        p = torch.bmm(x_f, w_f.transpose(1, 2))  # [R, B, O]: the products of every frequency
        out = torch.mm(mo, p.view(p.shape[0], -1))  # [H'*W', B*O]
        ctx.save_for_backward(x_f, w_f, tx, tw, mo)
        ctx.shapes = (hh, ww, c, k, s)
        return out.view(oh, ow, b, o).permute(2, 0, 1, 3).contiguous().add_(bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_f, w_f, tx, tw, mo = ctx.saved_tensors
        hh, ww, c, k, s = ctx.shapes
        b, oh, ow, o = grad.shape
        nh, nw, kp, _, _ = _SpectralConv.sizes((b, hh, ww), k, s)
        g = grad.permute(1, 2, 0, 3).reshape(oh * ow, -1)  # [H'*W', B*O]
        g_p = torch.mm(mo.t(), g).view(-1, b, o)  # [R, B, O]
        g_h = None
        if ctx.needs_input_grad[0]:
            g_x = torch.bmm(g_p, w_f)  # [R, B, s*s*C]
            g_xt = torch.mm(tx.t(), g_x.view(g_x.shape[0], -1))  # [N_h*N_w, B*s*s*C]
            g_h = g_xt.view(nh, nw, b, s, s, c).permute(2, 0, 3, 1, 4, 5)
            g_h = g_h.reshape(b, s * nh, s * nw, c)[:, :hh, :ww]
        g_w = torch.bmm(g_p.transpose(1, 2), x_f)  # [R, O, s*s*C]
        g_wt = torch.mm(tw.t(), g_w.view(g_w.shape[0], -1))  # [kp*kp, O*s*s*C]
        g_w = g_wt.view(kp, kp, o, s, s, c).permute(2, 0, 3, 1, 4, 5).reshape(o, s * kp, s * kp, c)
        g_weight = g_w[:, :k, :k].permute(0, 3, 1, 2)  # [O, C, k, k], channels-last strides
        g_bias = grad.sum((0, 1, 2)) if ctx.needs_input_grad[2] else None
        return g_h, g_weight, g_bias, None, None


@functools.lru_cache(maxsize=16)
def _spectral_matrices(nh: int, nw: int, kp: int, oh: int, ow: int, dtype: torch.dtype,
                       device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The constant matrices of :class:`_SpectralConv` for an ``N_h x N_w`` grid.

    The DFT of a real grid is known from ``rfft2``'s half spectrum (``N_w // 2 + 1`` columns);
    in its first and (for even ``N_w``) last column, frequency ``(-ky, kx)`` is the conjugate of
    ``(ky, kx)``, so only ``ky <= -ky mod N_h`` is kept there, and the self-conjugate ones are
    real. Every kept complex frequency gives three rows (the Gauss products), a real one one.

    - ``tx`` ``[R, N_h*N_w]``: pixels -> (real part, imaginary part, their sum) of the DFT;
    - ``tw`` ``[R, kp*kp]``: kernel taps -> (real, imaginary, real minus imaginary) of the DFT
      of the kernel placed at the grid's corner (the correlation uses its conjugate);
    - ``mo`` ``[H'*W', R]``: the products ``(P1, P2, P3)`` -> the output pixels: the inverse DFT
      of ``Yr = P1 + P2``, ``Yi = P3 - P1 + P2`` (and of ``Yr = P1`` for a real frequency) read
      at the ``H' x W'`` outputs, a dropped conjugate's share folded into its partner.

    ``R = 3 * 48 + 4 = 148`` rows for the paper's 10 x 10 phase grids. Built in float64
    from ``torch.fft`` applied to unit vectors, then cast.
    """
    half = nw // 2 + 1
    pixels = torch.eye(nh * nw, dtype=torch.float64).view(-1, nh, nw)
    spectrum = torch.fft.rfft2(pixels).flatten(1).t()  # [F, N_h*N_w]: F = N_h * half
    re, im = spectrum.real, spectrum.imag
    unit = torch.eye(nh * half, dtype=torch.complex128).view(-1, nh, half)
    inv_re = torch.fft.irfft2(unit, s=(nh, nw))[:, :oh, :ow].flatten(1).t()  # [H'*W', F]
    inv_im = torch.fft.irfft2(1j * unit, s=(nh, nw))[:, :oh, :ow].flatten(1).t()
    ky, kx = torch.arange(nh).repeat_interleave(half), torch.arange(half).repeat(nh)
    conj_ky = (-ky) % nh
    paired = (kx == 0) | (2 * kx == nw)  # columns holding both (ky, kx) and its conjugate
    drop = paired & (ky > conj_ky)
    partner = conj_ky * half + kx
    inv_re[:, partner[drop]] += inv_re[:, drop]  # Y(-ky) = conj(Y(ky)): Yr adds, Yi subtracts
    inv_im[:, partner[drop]] -= inv_im[:, drop]
    real = paired & (ky == conj_ky)
    cplx = ~drop & ~real
    tx = torch.cat([re[cplx], im[cplx], (re + im)[cplx], re[real]])
    taps = torch.arange(nh * nw).view(nh, nw)[:kp, :kp].reshape(-1)
    tw = torch.cat([re[cplx], im[cplx], (re - im)[cplx], re[real]])[:, taps]
    mo = torch.cat([(inv_re - inv_im)[:, cplx], (inv_re + inv_im)[:, cplx], inv_im[:, cplx],
                    inv_re[:, real]], dim=1)
    return tuple(t.to(dtype=dtype, device=device).contiguous() for t in (tx, tw, mo))


class PrimaryCapsules(nn.Module):
    """PrimaryCaps: ONE convolution with ``num_types * dim`` channels, regrouped into capsules.

    Every position of the output grid holds ``num_types`` capsules of dimension ``dim``
    (channel ``t * dim + k`` is dimension ``k`` of capsule type ``t``), then ``squash``.
    How the convolution runs (same math and parameters as ``self.conv`` in every case):
    ``algorithm="auto"`` (default) picks on CPU, per call, ``"dft"`` (:class:`_SpectralConv`)
    when its cost model says it pays (batches of about 23 and more for the paper model), else
    ``"im2col"`` (:class:`_ConvAsGemm`); ``"torch"`` is ``self.conv`` itself, always used off
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
        if algorithm == "torch" or x.device.type != "cpu":
            out = conv(x).permute(0, 2, 3, 1)  # [B, H', W', T*K]; a view when channels-last
            return squash(out.reshape(out.shape[0], -1, self.dim))
        h = x.permute(0, 2, 3, 1).contiguous()  # [B, H, W, C]: free if x is channels-last
        k, s = conv.kernel_size[0], conv.stride[0]
        fixed = not (torch.is_grad_enabled() and conv.weight.requires_grad)
        if not fixed:
            self._spectrum = None
        if algorithm == "auto":
            algorithm = "dft" if _SpectralConv.macs_saved(h, conv.weight, s) > 0 else "im2col"
        if algorithm == "dft":
            w_f = self._weight_spectrum(h) if fixed else None
            out = _SpectralConv.apply(h, conv.weight, conv.bias, s, w_f)
        else:
            # [O, C, k, k] -> [O, (kh, kw, c)]: free if the weight is channels-last
            weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)
            out = _ConvAsGemm.apply(h, weight, conv.bias, k, s)
        return squash(out.reshape(out.shape[0], -1, self.dim))

    def _weight_spectrum(self, h: Tensor) -> Tensor:
        """The weight spectrum for inputs like ``h``, made again only when the weights change."""
        w, s = self.conv.weight, self.conv.stride[0]
        key = (w.data_ptr(), w._version, h.dtype, h.shape[1:])
        if self._spectrum is None or self._spectrum[0] != key:
            tw = _SpectralConv.matrices(h, w.shape[2], s)[1]
            self._spectrum = (key, _SpectralConv.weight_spectrum(w.detach(), tw, s))
        return self._spectrum[1]


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
