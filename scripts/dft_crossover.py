"""Where the frequency-domain PrimaryCaps starts to pay: im2col + GEMM against the DFT.

    .venv/bin/python scripts/dft_crossover.py [--rounds 3] [SETTING ...]

Each SETTING is ``BATCHxSIZE`` (default: 8x28 16x28 32x28 64x28 16x32 32x32 16x48 32x64):
the paper model on SIZE x SIZE images, trained and run for inference at that batch with
``PrimaryCapsules.algorithm`` forced to ``"im2col"`` and to ``"dft"``, in interleaved rounds
(medians). The last column is what ``"auto"`` (``SpectralConv.macs_saved``) picks, so this is
the measurement behind the cost model's constant; run it to check it on another CPU.
"""

from __future__ import annotations

import argparse

import torch

from capsnet import CapsNet
from capsnet.kernels.conv import SpectralConv, conv_output_size
from capsnet.bench import StepRunner
from capsnet.runtime import retain_freed_memory




def runner(batch: int, algorithm: str, image_size: int) -> StepRunner:
    """The paper model (channels-last, as `capsnet train` runs it) with one PrimaryCaps
    algorithm."""
    torch.manual_seed(0)
    model = CapsNet(image_size=image_size)
    model.primary.algorithm = algorithm
    return StepRunner(model, "cpu", batch, batch)


def setting(text: str) -> tuple[int, int]:
    """``"BATCHxSIZE"`` -> ``(batch, size)``."""
    try:
        batch, size = map(int, text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not BATCHxSIZE, e.g. 32x28") from None
    return batch, size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    defaults = "8x28 16x28 32x28 64x28 16x32 32x32 16x48 32x64".split()
    p.add_argument("settings", nargs="*", type=setting, default=[setting(t) for t in defaults])
    a = p.parse_args()
    retain_freed_memory()
    print(f"{'batch x size':14s}{'im2col train/infer':>22s}{'dft train/infer':>20s}   auto picks")
    for batch, size in a.settings:
        runs = {name: runner(batch, name, size)
                for name in ("im2col", "dft")}
        for r in runs.values():
            r.train_step()
            r.eval_step()
        for _ in range(a.rounds):
            for r in runs.values():
                r.timed("train", 2)
                r.timed("eval", 1)
        model = runs["dft"].model
        conv, grid = model.primary.conv, conv_output_size(size, model.config.conv_kernel, 1)
        h = torch.empty(batch, grid, grid, conv.in_channels)  # PrimaryCaps' input
        pick = "dft" if SpectralConv.macs_saved(h, conv.weight, conv.stride[0]) > 0 else "im2col"
        cells = [f"{r.img_s('train'):9.1f} /{r.img_s('eval'):7.1f}" for r in runs.values()]
        print(f"{f'{batch}x{size}':14s}{cells[0]:>22s}{cells[1]:>20s}   {pick}", flush=True)


if __name__ == "__main__":
    main()
