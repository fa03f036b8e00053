"""The benchmark's baseline computes the same function as CapsNet: same weights, same outputs.

`capsnet bench` reports "capsnet / naive" speed-ups; they only mean something if
:class:`capsnet.bench.naive.NaiveCapsNet` is the same network. Here the weights of a small
CapsNet are copied into a NaiveCapsNet (float64) and lengths, poses and reconstructions are
compared, for every way our PrimaryCaps and routing can run.

The layouts that differ:

- PrimaryCaps. Ours is one convolution with ``T * K`` channels, channel ``t * K + k`` being
  dimension ``k`` of type ``t``, regrouped (row, column, type); the naive one is ``K``
  convolutions of ``T`` channels stacked on the last axis, so its capsules are ordered
  (type, row, column). Naive conv ``k``, channel ``t`` = our channel ``t * K + k``.
- DigitCaps weights. Ours ``digits.weight`` is ``[I, K, O*D]`` with ``I`` in (row, column,
  type) order; the naive ``W`` is ``[O, I, K, D]`` with ``I`` in (type, row, column) order.
"""

import pytest
import torch

from capsnet import CapsNet, CapsNetConfig
from capsnet.bench.naive import NaiveCapsNet
from capsnet.losses import capsule_loss

CONFIG = CapsNetConfig(conv_channels=16, primary_types=4)  # 28x28x1 -> 6x6 grid, I = 144
BATCH = 5


def copy_weights(ours: CapsNet, naive: NaiveCapsNet) -> None:
    """Give ``naive`` the weights of ``ours`` (see the module docstring for the layouts)."""
    c = ours.config
    t, k, g = c.primary_types, c.primary_dim, c.primary_grid
    with torch.no_grad():
        naive.conv1.weight.copy_(ours.conv1.weight)
        naive.conv1.bias.copy_(ours.conv1.bias)
        w = ours.primary.conv.weight.view(t, k, *ours.primary.conv.weight.shape[1:])
        b = ours.primary.conv.bias.view(t, k)
        for d, conv in enumerate(naive.primary):
            conv.weight.copy_(w[:, d])
            conv.bias.copy_(b[:, d])
        # ours [I=(row, col, type), K, O*D] -> naive [O, I=(type, row, col), K, D]
        dw = ours.digits.weight.view(g, g, t, k, c.num_classes, c.class_dim)
        naive.W.copy_(dw.permute(4, 2, 0, 1, 3, 5).reshape(naive.W.shape))
        naive.decoder.load_state_dict(ours.decoder.state_dict())


def build() -> tuple[CapsNet, NaiveCapsNet]:
    """A float64 CapsNet and a NaiveCapsNet holding the same weights."""
    torch.manual_seed(0)
    ours = CapsNet(CONFIG).to(torch.float64)
    # Larger DigitCaps weights than the 0.01 init, so that the routing matters: couplings
    # from about 0.03 to 0.35 instead of 0.1 +- 0.0003, capsule lengths about 0.5 to 0.85.
    with torch.no_grad():
        ours.digits.weight.normal_(0, 2.0)
    naive = NaiveCapsNet(CONFIG).to(torch.float64)
    copy_weights(ours, naive)
    return ours, naive


@pytest.fixture(scope="module")
def models():
    return build()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(BATCH, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.tensor([3, 0, 9, 3, 7])
    return x, y


def test_shapes_match(models):
    ours, naive = models
    assert naive.W.shape == (CONFIG.num_classes, CONFIG.num_primary_capsules,
                             CONFIG.primary_dim, CONFIG.class_dim)
    assert ours.digits.weight.shape == (CONFIG.num_primary_capsules, CONFIG.primary_dim,
                                        CONFIG.num_classes * CONFIG.class_dim)
    assert ours.num_parameters() == sum(p.numel() for p in naive.parameters())


def test_routing_is_not_trivial(models, batch):
    """The compared outputs depend on the routing: its last couplings are far from uniform."""
    ours, _ = models
    x, _ = batch
    with torch.no_grad():
        u = ours.primary(torch.relu(ours.conv1(x)))
        _, c = ours.digits.route_with_couplings(ours.digits.predictions(u))
    assert c.max() > 2 / CONFIG.num_classes and c.min() < 0.5 / CONFIG.num_classes


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("algorithm", ["torch", "im2col", "dft"])
@pytest.mark.parametrize("given_target", [True, False], ids=["target", "argmax"])
def test_same_function(models, batch, algorithm, impl, given_target):
    ours, naive = models
    x, y = batch
    ours.primary.algorithm, ours.digits.impl = algorithm, impl
    target = y if given_target else None
    with torch.no_grad():
        a = ours(x, target)
        b = naive(x, target)
    torch.testing.assert_close(a.lengths, b.lengths, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a.poses, b.poses, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a.reconstructions, b.reconstructions, rtol=1e-9, atol=1e-12)
    assert torch.equal(a.selected, b.selected)
    if given_target:
        assert torch.equal(a.selected, y)


def test_a_wrong_capsule_order_is_detected(batch):
    """The comparison can fail: copying ``W`` without reordering the capsules changes the
    outputs far beyond the tolerance."""
    ours, naive = build()
    c = CONFIG
    with torch.no_grad():  # capsule axis in our order instead of (type, row, col)
        naive.W.copy_(ours.digits.weight.view(c.num_primary_capsules, c.primary_dim,
                                              c.num_classes, c.class_dim).permute(2, 0, 1, 3))
        x, y = batch
        diff = (ours(x, y).lengths - naive(x, y).lengths).abs().max()
    assert diff > 1e-4


def test_same_gradients(models, batch):
    """One training step's loss has the same gradients in both (the benchmark times these)."""
    ours, naive = models
    x, y = batch
    ours.primary.algorithm, ours.digits.impl = "auto", "fused"
    grads = []
    for m in (ours, naive):
        m.zero_grad(set_to_none=True)
        out = m(x, y)
        capsule_loss(out.lengths, y, out.reconstructions, x).total.backward()
        grads.append((m.conv1.weight.grad.clone(), m.decoder.net[0].weight.grad.clone()))
    for g_ours, g_naive in zip(*grads):
        torch.testing.assert_close(g_ours, g_naive, rtol=1e-8, atol=1e-12)
