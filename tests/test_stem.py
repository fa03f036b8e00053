"""The CapsNet's downsampling stem (``CapsNetConfig.stem``) and the memory measurement.

Tiny and fast: images of at most 64 px, batches of 2, at most one timed bench step.
"""

import json

import pytest
import torch

from capsnet.bench import StepRunner, bench
from capsnet.bench.flops import count_gflop_per_img, gflop_by_module, process_peak_bytes
from capsnet.cli import build_parser, main
from capsnet.errors import CapsnetError
from capsnet.models import build_model
from capsnet.models.capsnet import CapsNet, CapsNetConfig, stem_output_size, suggest_stem
from capsnet.settings import DEFAULTS, check_settings
from conftest import one_line_error

# The paper model's state_dict before the stem existed (names and shapes), 28x28x1.
PAPER_STATE = {
    "conv1.weight": (256, 1, 9, 9), "conv1.bias": (256,),
    "primary.conv.weight": (256, 256, 9, 9), "primary.conv.bias": (256,),
    "digits.weight": (1152, 8, 160),
    "decoder.net.0.weight": (512, 160), "decoder.net.0.bias": (512,),
    "decoder.net.2.weight": (1024, 512), "decoder.net.2.bias": (1024,),
    "decoder.net.4.weight": (784, 1024), "decoder.net.4.bias": (784,),
}


def stem_model(size=64, channels=3, stem=1, **kw) -> CapsNet:
    torch.manual_seed(0)
    return CapsNet(CapsNetConfig(in_channels=channels, image_size=size, stem=stem, **kw))


# --- stem=0 is the paper's model ---------------------------------------------------------

def test_default_is_the_paper_model():
    m = CapsNet()
    assert m.config.stem == 0
    assert m.num_parameters() == 8_215_568
    state = m.state_dict()
    assert list(state) == list(PAPER_STATE)  # same names, same order (optimizer states)
    assert {k: tuple(v.shape) for k, v in state.items()} == PAPER_STATE
    assert len(m.stem) == 0  # no stem layers


def test_config_without_the_new_keys_loads():
    old = {k: v for k, v in CapsNetConfig().to_dict().items()
           if k not in ("stem", "stem_channels")}
    config = CapsNetConfig.from_dict(old)
    assert config == CapsNetConfig() and config.stem == 0


def test_weights_written_before_the_stem_still_load(tmp_path):
    """A weights file whose recorded config predates the stem and --recon-size (the file
    shipped until 2026-12-06 was one) loads as the paper's model, computing the same."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from capsnet.checkpoints import load_model
    from capsnet.shipped import SHIPPED, WEIGHTS_DIR
    path = WEIGHTS_DIR / SHIPPED["fashion-mnist"]
    with safe_open(str(path), "pt") as f:
        info = json.loads(f.metadata()["capsnet"])
    for key in ("stem", "stem_channels", "recon_size"):
        info["config"].pop(key, None)
    info.pop("meta_sha256", None)  # files of that time had no metadata checksum either
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata={"capsnet": json.dumps(info)})
    model, meta = load_model(old)
    assert meta["arch"] == "capsnet" and model.config.stem == 0
    assert model.num_parameters() == 8_215_568
    x = torch.rand(2, 1, 28, 28)
    shipped, _ = load_model("fashion-mnist")
    assert torch.equal(model(x).lengths, shipped(x).lengths)


# --- the grid, the forward, the decoder --------------------------------------------------

def test_suggest_stem_and_grid():
    assert [suggest_stem(s) for s in (28, 32, 33, 64, 96, 128, 224)] == [0, 0, 1, 1, 2, 2, 3]
    assert [stem_output_size(s, k) for s, k in ((224, 3), (96, 2), (65, 1), (7, 2))] == \
        [28, 24, 33, 2]
    # Config arithmetic only (no model is built): 224 px with 3 stages is 28 px for Conv1.
    big = CapsNetConfig(image_size=224, in_channels=3, stem=3)
    assert big.stem_output_size == 28 and big.primary_grid == 6
    assert big.num_primary_capsules == 1152
    assert CapsNetConfig(image_size=224).num_primary_capsules == 104 * 104 * 32
    assert CapsNetConfig(image_size=64, stem=1).primary_grid == 8  # 64 -> 32 -> 24 -> 8
    assert CapsNetConfig(image_size=64).primary_grid == 24
    # whatever the size, the suggested stem leaves a grid of 1x1 to 8x8
    for size in range(17, 300, 7):
        assert 1 <= CapsNetConfig(image_size=size, stem=suggest_stem(size)).primary_grid <= 8


def test_forward_shapes_with_a_stem():
    m = stem_model(64, 3, stem=1)
    c = m.config
    assert [type(layer).__name__ for layer in m.stem] == ["Conv2d", "ReLU"]
    assert m.conv1.in_channels == c.stem_channels == 64
    assert m.digits.weight.shape == (8 * 8 * 32, 8, 160)
    x = torch.rand(2, 3, 64, 64)
    assert m.stem(x).shape == (2, 64, 32, 32)
    y = torch.tensor([1, 7])
    out = m(x, y)
    assert out.lengths.shape == (2, 10) and out.poses.shape == (2, 10, 16)
    assert out.selected.tolist() == [1, 7]
    # The decoder redraws the full-size input, not the stem's 32x32.
    assert out.reconstructions.shape == x.shape
    assert m.decoder.net[-2].out_features == 3 * 64 * 64
    out.lengths.sum().backward()  # gradients reach the stem
    assert m.stem[0].weight.grad is not None and m.stem[0].weight.grad.abs().sum() > 0


def test_two_stages_and_their_channels():
    # small Conv1/PrimaryCaps kernels so that 48 px survive two halvings
    m = stem_model(48, 1, stem=2, stem_channels=8, conv_channels=16, conv_kernel=3,
                   primary_kernel=3, primary_types=4)
    convs = [layer for layer in m.stem if isinstance(layer, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding)
            for c in convs] == [(1, 8, (3, 3), (2, 2), (1, 1)), (8, 8, (3, 3), (2, 2), (1, 1))]
    assert m.config.stem_output_size == 12 and m.config.primary_grid == 4  # 12 -> 10 -> 4
    x = torch.rand(2, 1, 48, 48)
    with torch.inference_mode():
        assert m.stem(x).shape == (2, 8, 12, 12)
        out = m(x)
    assert out.poses.shape == (2, 10, 16) and out.reconstructions.shape == x.shape


def test_too_small_after_the_stem_is_refused():
    with pytest.raises(ValueError, match="too small.*2-stage stem \\(16x16\\)"):
        CapsNet(CapsNetConfig(image_size=64, stem=2))
    with pytest.raises(ValueError, match="stem must be >= 0"):
        CapsNet(CapsNetConfig(stem=-1))


def test_stem_model_round_trips_through_its_config():
    m = stem_model(40, 1, stem=1, stem_channels=16)
    again = build_model("capsnet", m.config.to_dict())
    again.load_state_dict(m.state_dict())  # same names and shapes
    assert again.config == m.config


# --- FLOPs -------------------------------------------------------------------------------

def test_flops_include_the_stem():
    m = stem_model(64, 3, stem=1)
    m.primary.algorithm = "torch"  # the model's math, as the bench counts it
    parts = gflop_by_module(m, torch.device("cpu"))
    # one 3x3 stride-2 convolution: 2 FLOPs per multiply-add, 32x32 outputs of 64 channels
    # from 3 * 3 * 3 inputs each
    assert parts["stem"] == pytest.approx(2 * 32 * 32 * 64 * 3 * 3 * 3 / 1e9)
    assert set(parts) >= {"stem", "conv1", "primary", "digits", "decoder"}
    _, eval_gflop = count_gflop_per_img(m, torch.device("cpu"))
    assert eval_gflop == pytest.approx(sum(parts.values()))  # the total includes the stem
    assert "stem" not in gflop_by_module(CapsNet(CapsNetConfig(image_size=20)),
                                         torch.device("cpu"))


# --- settings, flags, training config ----------------------------------------------------

def model_config(*args):
    from capsnet.train import model_config  # imports Lightning and the data modules
    return model_config(*args)


def test_model_config_passes_the_stem():
    s = check_settings({**DEFAULTS, "stem": 2, "stem_channels": 32})
    config = model_config(s, [str(i) for i in range(10)], (3, 96, 96))
    assert config["stem"] == 2 and config["stem_channels"] == 32
    parsed = CapsNetConfig.from_dict(config)
    assert parsed.stem_output_size == 24 and parsed.primary_grid == 4
    paper = model_config(dict(DEFAULTS), range(10), (1, 28, 28))
    assert CapsNetConfig.from_dict(paper) == CapsNetConfig()


def test_stem_on_efficient_capsnet_is_refused():
    classes = [str(i) for i in range(10)]
    s = {**DEFAULTS, "arch": "efficient-capsnet"}
    assert "stem" not in model_config(s, classes, (1, 28, 28))  # the default passes quietly
    with pytest.raises(CapsnetError, match="^--stem does not apply to efficient-capsnet$"):
        model_config({**s, "stem": 1}, classes, (1, 28, 28))
    with pytest.raises(CapsnetError, match="--stem-channels does not apply"):
        model_config({**s, "stem_channels": 32}, classes, (1, 28, 28))


def test_settings_and_flags():
    for bad in ({"stem": -1}, {"stem_channels": 0}, {"stem": 1.5}):
        with pytest.raises(CapsnetError, match="stem"):
            check_settings({**DEFAULTS, **bad})
    a = build_parser().parse_args(["train", "--stem", "2", "--stem-channels", "32"])
    assert a.stem == 2 and a.stem_channels == 32
    a = build_parser().parse_args(["bench", "--stem", "1"])
    assert a.stem == 1 and a.stem_channels == 64


# --- bench and memory --------------------------------------------------------------------

def test_process_peak_is_positive_and_sees_an_allocation():
    def allocate():
        # 64 MiB straight from the kernel, every page touched: new resident memory whatever
        # the allocator keeps from earlier tests in this process (retain_freed_memory)
        import mmap
        m = mmap.mmap(-1, 64 * 2**20)
        m.write(b"x" * (64 * 2**20))
        m.close()

    peak, source = process_peak_bytes(allocate)
    assert peak > 64 * 2**20
    assert source in ("VmHWM during the step", "VmHWM of the process", "ru_maxrss of the process")
    quiet, _ = process_peak_bytes(lambda: None)
    assert quiet > 0
    if source == "VmHWM during the step":  # reset before the step: the step's own peak
        assert peak - quiet > 48 * 2**20


def test_step_runner_total_peak():
    runner = StepRunner(stem_model(40, 1, stem=1, stem_channels=8), batch=2)
    mb, source = runner.train_peak_total_mb()
    assert mb > 0 and source


def test_bench_with_a_stem():
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # bench(threads=1) must give this back
    try:
        r = bench(batch_size=2, steps=1, warmup=0, image_size=40, channels=1, stem=1,
                  stem_channels=8, threads=1, retain_memory=False, rounds=1)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    assert r["stem"] == 1 and r["stem_channels"] == 8
    assert r["primary_capsules"] == 2 * 2 * 32  # 40 -> 20 -> 12 -> 2
    assert r["stem_gflop_per_img"] == pytest.approx(2 * 20 * 20 * 8 * 9 / 1e9)
    assert r["naive_train_img_s"] is None  # the naive reference has no stem
    assert r["train_peak_total_mb"] > 0 and r["train_peak_mb"] > 0
    assert r["train_img_s"] > 0 and r["eval_img_s"] > 0
    assert r["threads"] == 1 and after == 3  # restored after the call


def test_bench_stem_on_efficient_capsnet_is_one_line_error(capsys):
    code = main(["bench", "--arch", "efficient-capsnet", "--stem", "1", "--no-retain-memory"])
    err = capsys.readouterr().err
    assert one_line_error(code, err) and "no stem" in err
    code = main(["bench", "--stem", "-1"])
    assert one_line_error(code, capsys.readouterr().err)


# --- a smaller reconstruction (recon_size) ------------------------------------------------

def test_recon_size_decodes_an_area_averaged_image():
    from capsnet.losses import capsule_loss, reconstruction_loss
    model = stem_model(64, 3, stem=1, stem_channels=8, recon_size=16)
    assert model.decoder.net[-2].out_features == 3 * 16 * 16
    x = torch.rand(2, 3, 64, 64)
    out = model(x, torch.tensor([1, 2]))
    assert out.reconstructions.shape == (2, 3, 16, 16)
    # the target is each 4x4 block's mean, the sum of squares over 3*16*16 pixels
    expected = (out.reconstructions - torch.nn.functional.avg_pool2d(x, 4)).pow(2).sum((1, 2, 3))
    torch.testing.assert_close(reconstruction_loss(out.reconstructions, x), expected)
    loss = capsule_loss(out.lengths, torch.tensor([1, 2]), out.reconstructions, x, 0.5)
    loss.total.backward()  # the loss reaches the decoder through the smaller target
    assert model.decoder.net[-2].weight.grad.abs().sum() > 0
    # 0 is the image's own size (the paper's decoder); larger than the image is refused
    assert stem_model(64, 3, stem=1, stem_channels=8).config.decoder_size == 64
    with pytest.raises(ValueError, match="recon_size"):
        stem_model(32, 1, stem=0, recon_size=33)


def test_recon_size_flags_and_settings(capsys):
    a = build_parser().parse_args(["train", "--recon-size", "64"])
    assert a.recon_size == 64
    with pytest.raises(CapsnetError, match="recon_size"):
        check_settings({**DEFAULTS, "recon_size": -1})
    s = check_settings({**DEFAULTS, "recon_size": 24, "stem": 1})
    config = CapsNetConfig.from_dict(model_config(s, [str(i) for i in range(10)], (3, 96, 96)))
    assert config.decoder_size == 24
    with pytest.raises(CapsnetError, match="^--recon-size does not apply to efficient-capsnet$"):
        model_config({**DEFAULTS, "arch": "efficient-capsnet", "recon_size": 8},
                     [str(i) for i in range(10)], (1, 28, 28))
    code = main(["bench", "--arch", "efficient-capsnet", "--recon-size", "8",
                 "--no-retain-memory"])
    assert one_line_error(code, capsys.readouterr().err)


def test_bench_with_a_smaller_reconstruction():
    r = bench(batch_size=2, steps=1, warmup=0, image_size=40, channels=1, stem=1,
              stem_channels=8, recon_size=10, threads=1, retain_memory=False, rounds=1)
    assert r["recon_size"] == 10 and r["parameters"] == stem_model(
        40, 1, stem=1, stem_channels=8, recon_size=10).num_parameters()
    assert r["naive_train_img_s"] is None


def test_dashboard_grid_enlarges_a_smaller_reconstruction():
    from capsnet.dashboards import recon_grid
    images, recons = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 8, 8)
    grid = recon_grid(images, recons, pairs_per_row=2)
    assert grid.shape == (3, 2 + 32 + 2, 2 + 4 * (32 + 2))
    torch.testing.assert_close(grid[0, 2:34, 36:68], recons[0, 0].repeat_interleave(4, 0)
                               .repeat_interleave(4, 1))


def test_train_with_sizes_that_do_not_fit_is_one_line_error(fashion_dir, tmp_path, capsys):
    """The model's own size checks reach the user as one line, not a traceback."""
    common = ["--data-dir", str(fashion_dir), "--train-size", "32", "--val-size", "0",
              "--test-size", "16", "--epochs", "1", "--no-progress", "--no-tensorboard"]
    for flags, needle in ((["--recon-size", "40"], "recon_size"),
                          (["--stem", "3"], "too small")):
        code = main(["train", *common, *flags, "--out", str(tmp_path / flags[0][2:])])
        err = capsys.readouterr().err
        assert one_line_error(code, err) and needle in err, err
