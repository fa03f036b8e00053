"""The fast paths (PrimaryCaps by DFT or by im2col + GEMM, hand-written routing backward) compute
exactly the model of the paper: same outputs and same gradients as a plain, obviously-correct
formulation.
"""

import pytest
import torch
from torch.nn import functional as F

from capsnet import CapsNet, CapsNetConfig
from capsnet.kernels.conv import ConvAsGemm, SpectralConv
from capsnet.kernels.routing import PredictAndRoute, Routing, squash_backward
from capsnet.layers import PrimaryCapsules, RoutingCapsules
from capsnet.losses import capsule_loss
from capsnet.routing import route_reference, squash


def plain_squash(s):
    n2 = (s * s).sum(dim=-1, keepdim=True)
    return n2 / (1 + n2) * s / torch.sqrt(n2 + 1e-8)


def plain_forward(m: CapsNet, x, target):
    """Every step of the paper written out with standard convolutions and einsum.

    Axis letters: b batch, i input capsules, k their dimension, o output capsules, d theirs.
    """
    c = m.config
    h = F.relu(F.conv2d(x, m.conv1.weight, m.conv1.bias))
    p = F.conv2d(h, m.primary.conv.weight, m.primary.conv.bias, stride=c.primary_stride)
    u = plain_squash(p.permute(0, 2, 3, 1).reshape(x.shape[0], -1, c.primary_dim))  # [b, i, k]
    W = m.digits.weight.view(-1, c.primary_dim, c.num_classes, c.class_dim)  # [i, k, o, d]
    u_hat = torch.einsum("bik,ikod->biod", u, W)
    logits = torch.zeros(u_hat.shape[:3], dtype=x.dtype)  # [b, i, o]
    for r in range(c.routing_iterations):
        last = r == c.routing_iterations - 1
        preds = u_hat.detach() if (c.detach_routing and not last) else u_hat
        coupling = torch.softmax(logits, dim=2)  # over the output capsules
        v = plain_squash(torch.einsum("bio,biod->bod", coupling, preds))
        if not last:
            logits = logits + torch.einsum("biod,bod->bio", preds, v)
    lengths = v.norm(dim=-1)
    masked = (v * F.one_hot(target, c.num_classes).to(x.dtype)[:, :, None]).flatten(1)
    d = m.decoder.net
    z = F.relu(F.linear(masked, d[0].weight, d[0].bias))
    z = F.relu(F.linear(z, d[2].weight, d[2].bias))
    recon = torch.sigmoid(F.linear(z, d[4].weight, d[4].bias)).view(x.shape)
    return lengths, v, recon, coupling


def outputs_and_grads(m, x, y, fn):
    m.zero_grad(set_to_none=True)
    lengths, v, recon = fn(x, y)[:3]
    capsule_loss(lengths, y, recon, x).total.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    return (lengths.detach(), v.detach(), recon.detach()), grads


def check_same(m, x, y, rtol, atol):
    fast_out, fast_grads = outputs_and_grads(m, x, y, m)
    plain_out, plain_grads = outputs_and_grads(m, x, y, lambda x, y: plain_forward(m, x, y))
    for a, b in zip(fast_out, plain_out):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    for name in plain_grads:
        g, ref = fast_grads[name], plain_grads[name]
        torch.testing.assert_close(g, ref, rtol=rtol, atol=atol * ref.abs().max().item(),
                                   msg=lambda s: f"gradient of {name}: {s}")


@pytest.mark.parametrize("algorithm", ["dft", "im2col"])
@pytest.mark.parametrize("iterations", [1, 3])
@pytest.mark.parametrize("detach", [False, True])
def test_small_model_float64(iterations, detach, algorithm, monkeypatch):
    # 2 images per chunk: 3 chunks (2, 2, 1) for 5 images
    monkeypatch.setattr(ConvAsGemm, "ROWS", 72)
    monkeypatch.setattr(PredictAndRoute, "IMAGES", 2)
    torch.manual_seed(0)
    cfg = CapsNetConfig(conv_channels=16, primary_types=4, routing_iterations=iterations,
                        detach_routing=detach)
    m = CapsNet(cfg).double()
    m.primary.algorithm = algorithm
    with torch.no_grad():  # larger W than the 0.01 init, so that routing really reweights
        m.digits.weight.mul_(30)
    x = torch.rand(5, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (5,))
    check_same(m, x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["dft", "im2col"])
@pytest.mark.parametrize("iterations", [1, 3])
def test_paper_model_float32_channels_last(iterations, algorithm):
    torch.manual_seed(1)
    m = CapsNet(routing_iterations=iterations).to(memory_format=torch.channels_last)
    m.primary.algorithm = algorithm
    x = torch.rand(3, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 3, 9])
    check_same(m, x, y, rtol=1e-4, atol=1e-5)


def test_three_channel_input_and_inference_mode():
    torch.manual_seed(2)
    m = CapsNet(in_channels=3, image_size=32, conv_channels=32, primary_types=8).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.inference_mode():
        out = m(x)
    lengths, v, recon, _ = plain_forward(m, x, out.selected)
    torch.testing.assert_close(out.lengths, lengths.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.reconstructions, recon.detach(), rtol=1e-4, atol=1e-6)
    assert torch.equal(out.selected, lengths.argmax(dim=1))


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_couplings_match_plain_routing(impl):
    torch.manual_seed(3)
    m = CapsNet(conv_channels=16, primary_types=4, routing_impl=impl).double()
    with torch.no_grad():  # large enough W that routing moves far from uniform couplings
        m.digits.weight.mul_(300)
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    u = m.primary(F.relu(m.conv1(x)))
    _, c = m.digits.route_with_couplings(m.digits.predictions(u))  # [b, o, i]
    assert (c - 1 / 10).abs().max() > 0.3  # the comparison below means something
    plain_c = plain_forward(m, x, torch.zeros(2, dtype=torch.long))[3]  # [b, i, o]
    torch.testing.assert_close(c, plain_c.transpose(1, 2))


@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("images", [2, 5])  # three chunks, or the whole batch as on a GPU
def test_fused_routing_matches_the_reference(iterations, detach, images, monkeypatch):
    """The library's plain-autograd routing is the specification of the fused kernel:
    same outputs, same gradients for u and W (float64, in chunks of images or in one)."""
    monkeypatch.setattr(PredictAndRoute, "IMAGES", images)
    torch.manual_seed(7)
    layers = {impl: RoutingCapsules(12, 8, 5, 16, iterations, detach, init_std=0.5,
                                    impl=impl).double() for impl in ("fused", "reference")}
    layers["reference"].load_state_dict(layers["fused"].state_dict())
    u0 = torch.randn(5, 12, 8, dtype=torch.float64)
    g = torch.randn(5, 5, 16, dtype=torch.float64)
    results = {}
    for impl, layer in layers.items():
        u = u0.clone().requires_grad_()
        v = layer(u)
        v.backward(g)
        results[impl] = (v.detach(), u.grad, layer.weight.grad)
    for a, b in zip(results["fused"], results["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # and route() on given predictions agrees with route_reference itself
    u_hat = layers["fused"].predictions(u0)
    v, c = layers["fused"].route_with_couplings(u_hat)
    v_ref, c_ref = route_reference(u_hat, iterations, detach and iterations > 1)
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(c, c_ref)


def test_custom_backwards_pass_gradcheck(monkeypatch):
    monkeypatch.setattr(PredictAndRoute, "IMAGES", 2)
    torch.manual_seed(4)
    h = torch.randn(3, 11, 13, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3 * 3 * 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, w, b: ConvAsGemm.apply(h, w, b, 3, 2), (h, w, b))
    w4 = w.detach().view(5, 3, 3, 4).permute(0, 3, 1, 2).requires_grad_()  # [O, C, k, k]
    assert torch.autograd.gradcheck(lambda h, w, b: SpectralConv.apply(h, w, b, 2), (h, w4, b))
    u_hat = torch.randn(2, 3, 7, 4, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 2, 3 * 4, dtype=torch.float64, requires_grad=True)
    for iterations in (1, 2, 3):  # (with detach the gradient is, on purpose, not the derivative)
        assert torch.autograd.gradcheck(
            lambda u: Routing.apply(u, iterations, False)[0], (u_hat,))
        assert torch.autograd.gradcheck(
            lambda u, w: PredictAndRoute.apply(u, w, 3, iterations, False), (u, w))


def test_routing_chunks_by_device():
    """4 images per chunk on a CPU; on an accelerator as many as fit the u_hat budget (the
    paper model: 1152 x 160 floats, 0.74 MB per image, so 364 images in 256 MB)."""
    w = torch.empty(1152, 8, 160)
    assert PredictAndRoute.chunk_images(torch.empty(128, 1152, 8), w) == 4
    on_device = torch.empty(128, 1152, 8, device="meta")  # a tensor that is not on the CPU
    assert PredictAndRoute.chunk_images(on_device, w) == 256 * 2 ** 20 // (1152 * 160 * 4) == 364


@pytest.mark.parametrize("scale", [0.0, 1e-6, 1e-2, 1.0, 1e3])
def test_closed_form_squash_gradient_matches_autograd(scale):
    torch.manual_seed(5)
    s = (scale * torch.randn(3, 10, 16, dtype=torch.float64)).requires_grad_()
    g = torch.randn(3, 10, 16, dtype=torch.float64)
    (expected,) = torch.autograd.grad(squash(s), s, g)
    got = squash_backward(s.detach(), g)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [  # B, H, W, C, O, kernel, stride
    (3, 20, 20, 8, 6, 9, 2), (2, 21, 17, 5, 4, 9, 2),
    (2, 13, 13, 3, 5, 4, 3), (2, 9, 11, 3, 2, 3, 1)])
def test_spectral_convolution_matches_conv2d(shape):
    """Even and odd grids, kernels that do and do not divide by the stride, strides 1 to 3."""
    b, hh, ww, c, o, k, s = shape
    torch.manual_seed(6)
    h = torch.randn(b, hh, ww, c, dtype=torch.float64, requires_grad=True)
    w = torch.randn(o, c, k, k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(o, dtype=torch.float64, requires_grad=True)
    expected = F.conv2d(h.permute(0, 3, 1, 2), w, bias, stride=s).permute(0, 2, 3, 1)
    got = SpectralConv.apply(h, w, bias, s)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(expected)
    for a, e in zip(torch.autograd.grad(got, (h, w, bias), g),
                    torch.autograd.grad(expected, (h, w, bias), g)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_auto_algorithm_choice_and_kept_weight_spectrum():
    """The paper's PrimaryCaps: DFT for batches of 32 and more, im2col for 16 and fewer (where
    it measured faster); without gradients the kept spectrum follows weight updates."""
    torch.manual_seed(7)
    w = PrimaryCapsules(256).conv.weight
    assert SpectralConv.macs_saved(torch.empty(32, 20, 20, 256), w, 2) > 0
    assert SpectralConv.macs_saved(torch.empty(16, 20, 20, 256), w, 2) < 0
    small = PrimaryCapsules(64, num_types=8, dim=8, algorithm="dft")
    x = torch.rand(2, 64, 20, 20)
    with torch.no_grad():
        small.algorithm = "torch"
        expected = small(x)
        small.algorithm = "dft"
        torch.testing.assert_close(small(x), expected, rtol=1e-4, atol=1e-6)
        assert small._spectrum is not None  # kept for the next call
        small.conv.weight.mul_(-2)  # e.g. an optimizer step
        small.algorithm = "torch"
        expected = small(x)
        small.algorithm = "dft"
        torch.testing.assert_close(small(x), expected, rtol=1e-4, atol=1e-6)
    small(x).sum().backward()  # training drops it
    assert small._spectrum is None
    with pytest.raises(ValueError, match="algorithm"):
        PrimaryCapsules(8, algorithm="fft")


def test_spectral_matrices_made_in_inference_mode_still_train():
    """The DFT matrices are cached process-wide; when inference (e.g. Lightning's validation)
    asks for them first, a later training step must still be able to use them."""
    from capsnet.kernels.conv import spectral_matrices
    spectral_matrices.cache_clear()
    torch.manual_seed(8)
    m = CapsNet(conv_channels=16, primary_types=4)
    m.primary.algorithm = "dft"
    x = torch.rand(4, 1, 28, 28)
    with torch.inference_mode():
        m(x)
    out = m(x, torch.zeros(4, dtype=torch.long))
    out.lengths.sum().backward()
    assert m.primary.conv.weight.grad is not None



def test_backward_inside_autocast():
    """``loss.backward()`` inside ``torch.autocast`` (as plain PyTorch code often does) works
    with the hand-written backward passes and gives the reference routing's gradients: the
    engines' backward runs in fp32 like their forward (``capsnet.kernels.precision``)."""
    config = CapsNetConfig(conv_channels=16, primary_types=4)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    grads = {}
    for impl in ("fused", "reference"):
        torch.manual_seed(1)
        model = CapsNet(config, routing_impl=impl)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, y)
            capsule_loss(out.lengths, y, out.reconstructions, x).total.backward()
        grads[impl] = model.digits.weight.grad
        assert grads[impl].dtype == torch.float32 and grads[impl].abs().sum() > 0
    torch.testing.assert_close(grads["fused"], grads["reference"], rtol=1e-4, atol=1e-6)
    # the convolution engines (not used under autocast): fp32 forward, backward inside it
    torch.manual_seed(2)
    h = torch.randn(2, 11, 13, 4, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    for engine in (lambda: ConvAsGemm.apply(h, w.permute(0, 2, 3, 1).reshape(5, -1), b, 3, 2),
                   lambda: SpectralConv.apply(h, w, b, 2)):
        outside = torch.autograd.grad(engine().square().sum(), (h, w, b))
        loss = engine().square().sum()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = torch.autograd.grad(loss, (h, w, b))
        for a, c in zip(inside, outside):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, c)
