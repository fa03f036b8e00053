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
import statistics
import time

import torch

from capsnet import CapsNet
from capsnet.kernels.conv import SpectralConv, conv_output_size
from capsnet.losses import capsule_loss
from capsnet.optim import adam
from capsnet.runtime import retain_freed_memory


class Runner:
    """A CapsNet with Adam and random batches on CPU; times its training steps (forward,
    loss, backward, Adam) and its inference steps."""

    def __init__(self, batch: int, eval_batch: int, algorithm: str = "auto", **config):
        torch.manual_seed(0)
        self.model = CapsNet(**config)  # channels-last, as `capsnet train` runs it
        self.model.primary.algorithm = algorithm
        self.opt = adam(self.model.parameters())
        c = self.model.config
        shape = (c.in_channels, c.image_size, c.image_size)
        self.x = torch.rand(batch, *shape).contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, c.num_classes, (batch,))
        self.x_eval = torch.rand(eval_batch, *shape).contiguous(
            memory_format=torch.channels_last)
        self.times: dict[str, list[float]] = {"train": [], "eval": []}

    def train_step(self) -> None:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        out = self.model(self.x, self.y)
        capsule_loss(out.lengths, self.y, out.reconstructions, self.x).total.backward()
        self.opt.step()

    def eval_step(self) -> None:
        self.model.eval()
        with torch.inference_mode():
            self.model(self.x_eval)

    def timed(self, kind: str, n: int) -> None:
        step = self.train_step if kind == "train" else self.eval_step
        for _ in range(n):
            t = time.perf_counter()
            step()
            self.times[kind].append(time.perf_counter() - t)

    def img_s(self, kind: str) -> float:
        batch = self.x.shape[0] if kind == "train" else self.x_eval.shape[0]
        return batch / statistics.median(self.times[kind])


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
        runs = {name: Runner(batch, batch, algorithm=name, image_size=size)
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
