"""The paper's math, pinned on small hand-checkable cases."""

import pytest
import torch

from capsnet import CapsNet, CapsNetConfig, Decoder, RoutingCapsules, margin_loss, squash
from capsnet.losses import capsule_loss


def test_squash_keeps_direction_and_maps_length():
    s = torch.randn(100, 16) * torch.logspace(-2, 2, 100)[:, None]
    v = squash(s)
    n = s.norm(dim=-1)
    assert torch.allclose(v.norm(dim=-1), n**2 / (1 + n**2), rtol=1e-4, atol=1e-7)
    cos = torch.nn.functional.cosine_similarity(v, s, dim=-1)
    assert torch.allclose(cos, torch.ones(100), atol=1e-5)
    assert (v.norm(dim=-1) < 1).all()


def test_squash_finite_at_zero():
    s = torch.zeros(3, 8, requires_grad=True)
    v = squash(s)
    v.sum().backward()
    assert torch.equal(v, torch.zeros(3, 8))
    assert torch.isfinite(s.grad).all()


def _layer(iterations, in_caps=5, out_caps=3, dim=4):
    return RoutingCapsules(in_caps, 2, out_caps, dim, iterations=iterations)


def test_couplings_sum_to_one_over_output_capsules():
    layer = _layer(3)
    u_hat = torch.randn(2, 3, 5, 4)  # [B, O, I, D]
    _, c = layer.route_with_couplings(u_hat)
    assert c.shape == (2, 3, 5)
    assert torch.allclose(c.sum(dim=1), torch.ones(2, 5), atol=1e-6)
    assert not torch.allclose(c.sum(dim=2), torch.ones(2, 3))  # not over the inputs


def test_one_iteration_is_uniform_coupling():
    layer = _layer(1)
    u_hat = torch.randn(2, 3, 5, 4)
    v, c = layer.route_with_couplings(u_hat)
    assert torch.allclose(c, torch.full_like(c, 1 / 3))
    assert torch.allclose(v, squash(u_hat.mean(dim=2) * 5 / 3), atol=1e-6)


def test_agreement_raises_coupling_to_agreeing_output():
    # Three input capsules; each predicts the same vector for output 0 (they agree there)
    # and mutually cancelling vectors for output 1.
    agree = torch.tensor([1.0, 0.0])
    u_hat = torch.zeros(1, 2, 3, 2)
    u_hat[0, 0] = agree
    u_hat[0, 1] = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    c1 = RoutingCapsules(3, 2, 2, 2, iterations=1).route_with_couplings(u_hat)[1]
    c3 = RoutingCapsules(3, 2, 2, 2, iterations=3).route_with_couplings(u_hat)[1]
    assert torch.allclose(c1[0, 0], torch.full((3,), 0.5))
    # every input capsule now routes more of its output to capsule 0, where all agree
    assert (c3[0, 0] > 0.5).all()
    # input 2 predicts [0, 1] for output 1, which partly agrees with v_1 = squash([0, .5]):
    # it keeps more of its coupling on output 1 than inputs 0 and 1 do
    assert c3[0, 0, 2] < c3[0, 0, 0] and torch.isclose(c3[0, 0, 0], c3[0, 0, 1])


def test_routing_matches_plain_loop():
    """The batched routing equals Procedure 1 written with plain loops over i and j."""
    torch.manual_seed(0)
    layer = RoutingCapsules(4, 3, 2, 5, iterations=3)
    u = torch.randn(2, 4, 3)
    v = layer(u)
    W = layer.weight.detach().view(4, 3, 2, 5)  # [I, K, O, D]
    for b in range(2):
        u_hat = torch.stack([torch.stack([u[b, i] @ W[i, :, j] for i in range(4)])
                             for j in range(2)])  # [O, I, D]
        logits = torch.zeros(4, 2)
        for r in range(3):
            c = torch.softmax(logits, dim=1)  # over outputs j
            s = torch.stack([sum(c[i, j] * u_hat[j, i] for i in range(4)) for j in range(2)])
            vb = squash(s)
            logits = logits + torch.stack([torch.stack([u_hat[j, i] @ vb[j] for j in range(2)])
                                           for i in range(4)])
        assert torch.allclose(v[b], vb, atol=1e-6)


def test_margin_loss_hand_computed():
    lengths = torch.tensor([[0.95, 0.05, 0.5], [0.3, 0.2, 0.0]])
    target = torch.tensor([0, 1])
    # sample 0: present 0.95 >= 0.9 -> 0; absent 0.05 <= 0.1 -> 0; absent 0.5 -> .5*.4^2=.08
    # sample 1: present 0.2 -> (0.7)^2=.49; absent 0.3 -> .5*.2^2=.02; absent 0 -> 0
    expected = torch.tensor([0.08, 0.51])
    assert torch.allclose(margin_loss(lengths, target), expected, atol=1e-6)


def test_total_loss_weights_reconstruction():
    lengths = torch.tensor([[0.95, 0.05]])
    images = torch.zeros(1, 1, 2, 2)
    recon = torch.full((1, 1, 2, 2), 0.5)
    loss = capsule_loss(lengths, torch.tensor([0]), recon, images, recon_weight=0.0005)
    assert loss.reconstruction.item() == pytest.approx(1.0)  # 4 * 0.25
    assert loss.total.item() == pytest.approx(0.0005)


def test_decoder_sees_only_selected_capsule():
    torch.manual_seed(0)
    dec = Decoder(3, 4, (1, 5, 5))
    v = torch.randn(2, 3, 4)
    sel = torch.tensor([2, 0])
    out = dec(v, sel)
    v2 = v.clone()
    v2[0, :2] = torch.randn(2, 4)  # change the capsules that are NOT selected
    v2[1, 1:] = torch.randn(2, 4)
    assert torch.equal(dec(v2, sel), out)
    v3 = v.clone()
    v3[0, 2] += 1.0  # change the selected one
    assert not torch.allclose(dec(v3, sel)[0], out[0])
    assert out.shape == (2, 1, 5, 5) and out.min() >= 0 and out.max() <= 1


def test_paper_model_parameter_count():
    m = CapsNet()
    assert m.num_parameters() == 8_215_568  # conv1 20,992 + primary 5,308,672
    assert m.config.num_primary_capsules == 1152  # + W 1,474,560 + decoder 1,411,344
    assert m.digits.weight.numel() == 1152 * 10 * 8 * 16


@pytest.mark.parametrize("channels,size,classes", [(1, 28, 10), (3, 32, 10), (1, 40, 5)])
def test_shapes_for_other_inputs(channels, size, classes):
    cfg = CapsNetConfig(in_channels=channels, image_size=size, num_classes=classes,
                        conv_channels=16, primary_types=4)
    m = CapsNet(cfg)
    x = torch.rand(2, channels, size, size)
    out = m(x)
    assert out.lengths.shape == (2, classes)
    assert out.poses.shape == (2, classes, 16)
    assert out.reconstructions.shape == x.shape
    assert ((out.lengths >= 0) & (out.lengths < 1)).all()
    assert torch.equal(out.selected, out.lengths.argmax(1))


def test_training_decodes_true_class():
    m = CapsNet(CapsNetConfig(conv_channels=8, primary_types=2))
    x = torch.rand(3, 1, 28, 28)
    y = torch.tensor([4, 5, 6])
    assert torch.equal(m(x, y).selected, y)


def test_too_small_images_rejected():
    with pytest.raises(ValueError):
        CapsNet(CapsNetConfig(image_size=12))


def test_loss_is_the_batch_mean_of_per_image_losses():
    from capsnet.losses import margin_loss, reconstruction_loss
    torch.manual_seed(0)
    lengths = torch.rand(6, 10)
    target = torch.randint(0, 10, (6,))
    recon, images = torch.rand(6, 1, 28, 28), torch.rand(6, 1, 28, 28)
    loss = capsule_loss(lengths, target, recon, images, recon_weight=0.01)
    per_image = [margin_loss(lengths[i:i + 1], target[i:i + 1])
                 + 0.01 * reconstruction_loss(recon[i:i + 1], images[i:i + 1])
                 for i in range(6)]
    torch.testing.assert_close(loss.total, torch.cat(per_image).mean())
    # and one image's margin loss by hand: present class below m+, absent ones above m-
    by_hand = sum((max(0.0, 0.9 - float(v)) ** 2 if k == int(target[0])
                   else 0.5 * max(0.0, float(v) - 0.1) ** 2) for k, v in enumerate(lengths[0]))
    assert abs(float(margin_loss(lengths[:1], target[:1])) - by_hand) < 1e-6


def test_learning_rate_schedules():
    import math

    from capsnet.lit import LitCapsNet
    from capsnet.optim import lr_factor
    assert lr_factor(0, 1000, 100) == pytest.approx(0.01)  # warm-up
    assert lr_factor(99, 1000, 100) == pytest.approx(1.0)  # the peak, once ...
    assert lr_factor(100, 1000, 100) < 1 - 1e-6  # ... then the cosine goes down ...
    assert lr_factor(549, 1000, 100) > 0.5 > lr_factor(550, 1000, 100)  # ... half-way ...
    assert lr_factor(1000, 1000, 100) == pytest.approx(0.0, abs=1e-12)  # ... to 0
    assert lr_factor(5000, 1000, 100) == pytest.approx(0.0, abs=1e-12)
    # the authors' schedule: x0.96 every 2000 steps, applied per step
    lit = LitCapsNet(model={"conv_channels": 8, "primary_types": 2}, lr=1e-3)
    sched = lit.configure_optimizers()["lr_scheduler"]["scheduler"]
    opt = sched.optimizer
    for _ in range(2000):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.96, rel=1e-6)
    assert math.isclose(sched.get_last_lr()[0], 0.96e-3, rel_tol=1e-6)


def test_weight_decay_is_decoupled_and_spares_biases():
    """--weight-decay: AdamW on the weight matrices and kernels only. With zero gradients
    Adam's update is 0, so what moves a weight is the decay alone: a kernel shrinks by
    ``lr * weight_decay`` of itself per step, a bias stays. 0 keeps plain Adam in one group
    (older runs' optimizer states resume)."""
    from capsnet.lit import LitCapsNet
    from capsnet.optim import adam
    layer = torch.nn.Linear(3, 2)
    opt = adam(layer.parameters(), lr=0.1, weight_decay=0.5)
    assert isinstance(opt, torch.optim.AdamW)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.weight.grad, layer.bias.grad = torch.zeros_like(w), torch.zeros_like(b)
    opt.step()
    torch.testing.assert_close(layer.weight.detach(), w * (1 - 0.1 * 0.5))
    torch.testing.assert_close(layer.bias.detach(), b)
    plain = adam(layer.parameters(), lr=0.1)
    assert type(plain) is torch.optim.Adam and len(plain.param_groups) == 1
    assert plain.param_groups[0]["weight_decay"] == 0
    lit = LitCapsNet(model={"conv_channels": 8, "primary_types": 2}, weight_decay=0.01)
    groups = lit.configure_optimizers()["optimizer"].param_groups
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert all(p.ndim > 1 for p in groups[0]["params"])
    assert groups[1]["params"] and all(p.ndim == 1 for p in groups[1]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(lit.model.parameters()))


def test_ema_follows_then_averages():
    from torch.optim.swa_utils import AveragedModel

    from capsnet.optim import ema_update
    p = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        p.weight.fill_(0.0)
    avg = AveragedModel(p, multi_avg_fn=ema_update(0.99))
    with torch.no_grad():
        p.weight.fill_(1.0)
    avg.update_parameters(p)  # first call copies
    with torch.no_grad():
        p.weight.fill_(2.0)
    avg.update_parameters(p)  # n = 1: weight of the old average min(0.99, 2/11)
    assert float(avg.module.weight.detach()) == pytest.approx(1 * 2 / 11 + 2 * 9 / 11)


@pytest.mark.parametrize("average", [{"ema": 0.5}, {"swa": True}], ids=["ema", "swa"])
def test_average_of_a_model_with_batch_norm(average):
    """Efficient-CapsNet has batch norm: its running statistics are averaged like weights,
    its integer step counter copied (``lerp`` on a Long tensor raised before under EMA;
    PyTorch's SWA update divided it as an integer, leaving 1 after 3 steps)."""
    from capsnet.lit import LitCapsNet
    lit = LitCapsNet(arch="efficient-capsnet", **average)
    bn = next(m for m in lit.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    lit.model.train()
    for step in range(3):
        with torch.no_grad():
            lit.model(torch.rand(4, 1, 28, 28) + step)
        lit.ema.update_parameters(lit.model)
    avg_bn = next(m for m in lit.eval_model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert int(avg_bn.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    assert not torch.equal(avg_bn.running_mean, bn.running_mean)  # an average, not a copy
    assert torch.isfinite(avg_bn.running_mean).all()


def test_swa_is_the_equal_weight_mean_and_constant_schedule_warms_up():
    """LitCapsNet(swa=True): the evaluated model is the plain mean of every update so far;
    ``lr_schedule="constant"``: linear warm-up, then the learning rate itself."""
    from capsnet.lit import LitCapsNet
    lit = LitCapsNet(model={"conv_channels": 8, "primary_types": 2}, swa=True,
                     lr_schedule="constant", warmup_steps=4, lr=1e-3)
    w = lit.model.digits.weight
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            w.fill_(value)
        lit.ema.update_parameters(lit.model)
    assert torch.allclose(lit.eval_model.digits.weight, torch.full_like(w, 3.0))
    config = lit.configure_optimizers()  # Adam over the model, the constant schedule
    lrs = []
    for _ in range(6):
        lrs.append(config["optimizer"].param_groups[0]["lr"])
        config["optimizer"].step()
        config["lr_scheduler"]["scheduler"].step()
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_accuracy_interval_is_wilsons():
    """The 95% Wilson score interval: textbook values, zero and full counts, symmetry."""
    from capsnet.inference import accuracy_interval
    assert accuracy_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert accuracy_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    low, high = accuracy_interval(9288, 10000)  # a 92.88% model (shipped before): +-0.5 points
    assert low == pytest.approx(0.9236, abs=1e-4) and high == pytest.approx(0.9337, abs=1e-4)
    assert accuracy_interval(3, 10) == pytest.approx(tuple(1 - v for v in
                                                           reversed(accuracy_interval(7, 10))))


def test_sam_steps_with_the_gradient_at_the_moved_weights():
    """--sam: on f(w) = sum(a * w^2) / 2 the gradient is g = a * w; SAM's closure must leave
    the weights at w, return the loss at w and leave the gradient at w + rho * g / |g|;
    the second pass draws the same random numbers (the same augmentation) and the
    generator ends as after one pass."""
    import contextlib
    from capsnet.optim import sam_closure
    a = torch.tensor([1.0, 2.0, 3.0])
    w0 = torch.tensor([0.5, -1.0, 2.0])
    p = torch.nn.Parameter(w0.clone())
    draws, passes = [], []
    second = {"on": False}

    def closure():
        p.grad = None
        draws.append(torch.rand(4))
        passes.append(second["on"])
        loss = (a * p * p).sum() / 2
        loss.backward()
        return loss.detach()

    @contextlib.contextmanager
    def second_pass():
        second["on"] = True
        yield
        second["on"] = False

    torch.manual_seed(3)
    loss = sam_closure(closure, [p], 0.1, second_pass)()
    torch.manual_seed(3)
    torch.rand(4)
    expected_next = torch.rand(4)
    torch.manual_seed(3)
    sam_closure(closure, [p], 0.1, second_pass)()
    assert torch.equal(torch.rand(4), expected_next)  # as after one pass
    g = a * w0
    moved = w0 + 0.1 * g / g.norm()
    torch.testing.assert_close(loss, (a * w0 * w0).sum() / 2)
    torch.testing.assert_close(p.detach(), w0, atol=1e-7, rtol=0)
    torch.testing.assert_close(p.grad, a * moved)
    assert passes == [False, True, False, True]
    assert torch.equal(draws[0], draws[1])
    # A non-finite gradient moves nothing and takes no second pass.
    p.data[0] = float("inf")
    before = p.detach().clone()
    sam_closure(closure, [p], 0.1, second_pass)()
    assert passes[-1] is False and len(passes) == 5
    assert torch.equal(p.detach(), before)


@pytest.mark.filterwarnings("ignore:You defined a `validation_step`")
def test_sam_runs_two_passes_per_step_in_lightning_and_logs_one():
    """LitCapsNet(sam > 0) wraps Lightning's closure: two training_step calls per optimizer
    step, the second flagged (not logged); without SAM one call per step."""
    import lightning as L
    from capsnet.lit import LitCapsNet
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    data = torch.utils.data.TensorDataset(images, torch.arange(8) % 10)
    for sam, calls in [(0.05, [False, True, False, True]), (0.0, [False, False])]:
        lit = LitCapsNet(model={"conv_channels": 8, "primary_types": 2}, sam=sam,
                         channels_last=False)
        seen = []
        step = lit.training_step
        lit.training_step = lambda batch, batch_idx: (seen.append(lit._sam_second_pass),
                                                      step(batch, batch_idx))[1]
        trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, accelerator="cpu", devices=1)
        trainer.fit(lit, torch.utils.data.DataLoader(data, batch_size=4))
        assert seen == calls


def test_paired_comparison_counts_and_exact_mcnemar_p():
    """Only the images the two models disagree on count; p by hand: with 0 gained and 10
    lost, both tails of Binomial(10, 1/2) hold 1/1024 each."""
    from capsnet.inference import paired_comparison
    first = torch.tensor([True] * 50 + [False] * 50)
    right = first.clone()
    right[:10] = False  # lost: 10 images only the first gets right
    r = paired_comparison(right, first)
    assert (r["gained"], r["lost"]) == (0, 10)
    assert r["p_value"] == pytest.approx(2 / 1024)
    right[50:60] = True  # and 10 gained: no evidence either way
    assert paired_comparison(right, first) == {"gained": 10, "lost": 10, "p_value": 1.0}
    same = paired_comparison(first, first)
    assert (same["gained"], same["lost"], same["p_value"]) == (0, 0, 1.0)
