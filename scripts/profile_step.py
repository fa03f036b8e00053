"""Where a training step's time goes, and what the PrimaryCaps GEMMs could reach alone.

    .venv/bin/python scripts/profile_step.py [--batch-size 128] [--steps 3]

1. ``torch.profiler`` over a few training steps of the paper model (after warm-up), the ops
   sorted by their own time;
2. the matrix products of the frequency-domain PrimaryCaps (``SpectralConv``) timed alone at
   the given batch, next to a 2048^3 GEMM.

The ``--sweep`` of earlier versions (images/s for other chunk sizes of the routing) is gone:
the chunk size, ``capsnet.kernels.routing.PredictAndRoute.IMAGES``, can only be changed by
assigning to the library's class, and the scripts use the library's public switches only.
"""

from __future__ import annotations

import argparse
import time

import torch

from capsnet import CapsNet
from capsnet.bench.flops import stderr_silenced
from capsnet.kernels.conv import SpectralConv
from capsnet.bench import StepRunner
from capsnet.runtime import retain_freed_memory




def gflop_s(fn, flop: float, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return flop * repeats / (time.perf_counter() - t) / 1e9


def gemm_shapes(batch: int) -> None:
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    print(f"\n2048^3 GEMM: {gflop_s(lambda: a @ b, 2 * n ** 3):.0f} GFLOP/s")
    h = torch.randn(batch, 20, 20, 256)  # PrimaryCaps' input: 20 x 20 x 256, 9 x 9, stride 2
    tx, tw, mo = SpectralConv.matrices(h, 9, 2)
    r, k, o = tx.shape[0], 4 * 256, 256  # R frequency rows, 2 x 2 phases x 256 channels
    x_f, w_f, g_p = torch.randn(r, batch, k), torch.randn(r, o, k), torch.randn(r, batch, o)
    xt = torch.randn(tx.shape[1], batch * k)
    print(f"PrimaryCaps by DFT at batch {batch}, products alone (GFLOP/s):")
    for name, f, flop in [
        ("input transform  [R,100] x [100,B*K]", lambda: tx @ xt, 2 * r * xt.numel()),
        ("weight transform [R,25] x [25,O*K]", lambda: tw @ w_f.view(r, -1)[:25],
         2 * r * 25 * o * k),
        ("forward    [R,B,K] x [R,K,O]", lambda: torch.bmm(x_f, w_f.transpose(1, 2)),
         2 * r * batch * k * o),
        ("input grad [R,B,O] x [R,O,K]", lambda: torch.bmm(g_p, w_f), 2 * r * batch * k * o),
        ("weight grad [R,O,B] x [R,B,K]", lambda: torch.bmm(g_p.transpose(1, 2), x_f),
         2 * r * batch * k * o),
    ]:
        print(f"  {name:40s}{gflop_s(f, flop):6.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="profiled training steps")
    a = p.parse_args()
    retain_freed_memory()
    torch.manual_seed(0)
    r = StepRunner(CapsNet(), "cpu", a.batch_size)
    for _ in range(3):
        r.train_step()
    from torch.profiler import ProfilerActivity, profile
    with stderr_silenced(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            r.train_step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    gemm_shapes(a.batch_size)


if __name__ == "__main__":
    main()
