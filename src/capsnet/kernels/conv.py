"""Convolution engines for a strided, unpadded convolution on the CPU (nothing capsule-specific).

Both compute exactly what ``torch.nn.functional.conv2d`` computes (tested against it), with
hand-written backwards, on channels-last inputs:

- :class:`ConvAsGemm`: im2col + one GEMM per chunk of images;
- :class:`SpectralConv`: stride phases, per-frequency products of DFTs, all GEMMs;
- :meth:`SpectralConv.macs_saved`: the cost model that picks between them per call.

Which one runs is :class:`capsnet.layers.PrimaryCapsules`' choice (``algorithm=``).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.nn import functional as F

from .precision import autocast_off

# Cost model weight of one element of the weight spectrum, in multiply-adds: it is read by
# every call (and in training also made, and its gradient written and read), which costs far
# more than its arithmetic. Calibrated with ``scripts/dft_crossover.py`` (the crossover batch
# it gives is in docs/performance.md); recalibrate it there on a very different CPU.
WEIGHT_SPECTRUM_COST = 70


def conv_output_size(size: int, kernel_size: int, stride: int) -> int:
    """Spatial size after an unpadded convolution."""
    return (size - kernel_size) // stride + 1


class ConvAsGemm(torch.autograd.Function):
    """A strided, unpadded convolution as im2col + one GEMM per chunk of images (CPU path).

    A plain GEMM runs near the CPU's multiply-add peak while oneDNN's 9x9 stride-2
    convolution, above all its backward, does not (``capsnet bench``; docs/performance.md).
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
        step = max(1, ConvAsGemm.ROWS // positions)  # images per chunk
        buffer = h.new_empty(min(step, n) * positions * k * k * c)
        for i in range(0, n, step):
            win = ConvAsGemm.windows(h[i:i + step], k, stride)
            cols = buffer[:win.numel()].view(win.shape)
            cols.copy_(win)
            yield i, cols.view(-1, k * k * c)

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor, k: int, stride: int) -> Tensor:
        n, hh, ww, _ = h.shape
        o = weight.shape[0]
        out = h.new_empty(n, conv_output_size(hh, k, stride), conv_output_size(ww, k, stride), o)
        for i, cols in ConvAsGemm.chunks(h, k, stride):
            rows = out.view(-1, o)[i * out.shape[1] * out.shape[2]:][:cols.shape[0]]
            torch.addmm(bias, cols, weight.t(), out=rows)  # [rows, O]
        ctx.save_for_backward(h, weight)
        ctx.k, ctx.stride = k, stride
        return out

    @staticmethod
    @autocast_off
    def backward(ctx, grad: Tensor):
        h, weight = ctx.saved_tensors
        k, stride = ctx.k, ctx.stride
        n, hh, ww, c = h.shape
        positions = grad.shape[1] * grad.shape[2]
        grad = grad.contiguous().view(-1, weight.shape[0])  # [B*H'*W', O]
        g_weight = torch.zeros_like(weight)
        g_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        g_cols = index = None
        for i, cols in ConvAsGemm.chunks(h, k, stride):
            g = grad[i * positions:][:cols.shape[0]]  # [rows, O]
            g_weight.addmm_(g.t(), cols)
            if g_h is None:
                continue
            if g_cols is None:
                g_cols = torch.empty_like(cols)
                # col2im as one index_add: im2col entry (b, y, x, kh, kw) came from input pixel
                # (b, stride*y + kh, stride*x + kw); ``index`` numbers those pixels in a chunk.
                pixels = torch.arange(cols.shape[0] // positions * hh * ww, device=h.device)
                index = ConvAsGemm.windows(pixels.view(-1, hh, ww, 1), k, stride).reshape(-1)
            gc = torch.mm(g, weight, out=g_cols[:cols.shape[0]]).view(-1, c)  # [rows*k*k, C]
            g_hi = g_h[i:i + cols.shape[0] // positions].zero_().view(-1, c)
            g_hi.index_add_(0, index[:gc.shape[0]], gc)
        g_bias = grad.sum(0) if ctx.needs_input_grad[2] else None
        return g_h, g_weight, g_bias, None, None


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class SpectralConv(torch.autograd.Function):
    """A strided, unpadded convolution computed in the frequency domain (CPU path).

    With stride ``s`` the input splits into ``s * s`` *phases* (pixels ``(s*y + py, s*x + px)``),
    each an ``N_h x N_w`` grid, and the ``k x k`` kernel into phases of ``kp = ceil(k / s)``
    squared taps. The convolution is then a stride-1 correlation of every phase with its kernel
    phase, summed over phases and channels. A correlation is a product per frequency of the 2-D
    DFTs (the grid is just large enough that no output wraps around), so per frequency it is one
    small ``[B, s*s*C] x [s*s*C, O]`` complex matrix product. Each complex product is done with
    three real ones (Gauss: ``P1 = Xr Wr``, ``P2 = Xi Wi``, ``P3 = (Xr + Xi)(Wr - Wi)``), and the
    DFTs and the inverse DFT at the output pixels are constant matrices (``spectral_matrices``),
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
        return spectral_matrices(*SpectralConv.sizes(h.shape, k, s), h.dtype, h.device)

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
        weight spectrum :data:`WEIGHT_SPECTRUM_COST` (155 MB for the paper model, read by
        every call, and in training also made, and its gradient written and read).
        """
        b, c, (o, k) = h.shape[0], h.shape[3], weight.shape[::2]
        nh, nw, _, oh, ow = SpectralConv.sizes(h.shape, k, s)
        rows = SpectralConv.matrices(h, k, s)[0].shape[0]
        per_image = rows * (2 * nh * nw * s * s * c + s * s * c * o + oh * ow * o)
        weights = WEIGHT_SPECTRUM_COST * rows * o * s * s * c
        return b * (oh * ow * k * k * c * o - per_image) - weights

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor, s: int,
                w_f: Tensor | None = None) -> Tensor:
        b, hh, ww, c = h.shape
        o, k = weight.shape[0], weight.shape[2]
        nh, nw, _, oh, ow = SpectralConv.sizes(h.shape, k, s)
        tx, tw, mo = SpectralConv.matrices(h, k, s)
        # phases of the input: [N_h*N_w pixels, B*(py, px, c)], zero-padded to s*N
        h = F.pad(h, (0, 0, 0, s * nw - ww, 0, s * nh - hh))
        xt = h.view(b, nh, s, nw, s, c).permute(1, 3, 0, 2, 4, 5).reshape(nh * nw, -1)
        x_f = torch.mm(tx, xt).view(tx.shape[0], b, -1)  # [R, B, s*s*C]
        if w_f is None:
            w_f = SpectralConv.weight_spectrum(weight, tw, s)  # [R, O, s*s*C]
        p = torch.bmm(x_f, w_f.transpose(1, 2))  # [R, B, O]: the products of every frequency
        out = torch.mm(mo, p.view(p.shape[0], -1))  # [H'*W', B*O]
        ctx.save_for_backward(x_f, w_f, tx, tw, mo)
        ctx.shapes = (hh, ww, c, k, s)
        return out.view(oh, ow, b, o).permute(2, 0, 1, 3).contiguous().add_(bias)

    @staticmethod
    @autocast_off
    def backward(ctx, grad: Tensor):
        x_f, w_f, tx, tw, mo = ctx.saved_tensors
        hh, ww, c, k, s = ctx.shapes
        b, oh, ow, o = grad.shape
        nh, nw, kp, _, _ = SpectralConv.sizes((b, hh, ww), k, s)
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
def spectral_matrices(nh: int, nw: int, kp: int, oh: int, ow: int, dtype: torch.dtype,
                       device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The constant matrices of :class:`SpectralConv` for an ``N_h x N_w`` grid.

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
    # Made outside inference mode even when first asked for there (Lightning validates in
    # inference mode): the cache is shared, and inference tensors cannot enter autograd later.
    with torch.inference_mode(False):
        return _make_spectral_matrices(nh, nw, kp, oh, ow, dtype, device)


def _make_spectral_matrices(nh: int, nw: int, kp: int, oh: int, ow: int, dtype: torch.dtype,
                            device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
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
