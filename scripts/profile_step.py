"""Where a training step's time goes, and what the PrimaryCaps GEMMs could reach alone.

    .venv/bin/python scripts/profile_step.py [--batch-size 128] [--steps 3] [--sweep]

1. ``torch.profiler`` over a few training steps of the paper model (after warm-up), the ops
   sorted by their own time;
2. the three PrimaryCaps GEMM shapes (forward, weight gradient, input gradient) timed alone
   for chunks of 252, 1,008 and 4,608 output rows, next to a 2048^3 GEMM;
3. with ``--sweep``: training and inference images/s for other chunk sizes of the im2col
   GEMM (``_ConvAsGemm.ROWS``) and of the routing (``_PredictAndRoute.IMAGES``), interleaved.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ablation import variant  # noqa: E402

from capsnet.bench import _stderr_silenced, retain_freed_memory  # noqa: E402
from capsnet.layers import _ConvAsGemm, _PredictAndRoute  # noqa: E402


def gflop_s(fn, flop: float, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return flop * repeats / (time.perf_counter() - t) / 1e9


def gemm_shapes() -> None:
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    print(f"\n2048^3 GEMM: {gflop_s(lambda: a @ b, 2 * n ** 3):.0f} GFLOP/s")
    k, o = 9 * 9 * 256, 256  # PrimaryCaps: im2col rows of 9x9x256, 256 output channels
    w = torch.randn(o, k)
    print("PrimaryCaps GEMMs alone (GFLOP/s):  rows  forward  weight-grad  input-grad")
    for rows in (252, 1008, 4608):
        cols, g = torch.randn(rows, k), torch.randn(rows, o)
        out, g_w, g_cols = torch.empty(rows, o), torch.zeros(o, k), torch.empty(rows, k)
        flop = 2 * rows * k * o
        print(f"{'':36s}{rows:5d}"
              f"{gflop_s(lambda: torch.mm(cols, w.t(), out=out), flop):9.0f}"
              f"{gflop_s(lambda: g_w.addmm_(g.t(), cols), flop):13.0f}"
              f"{gflop_s(lambda: torch.mm(g, w, out=g_cols), flop):12.0f}")


def sweep(batch: int, rounds: int = 6) -> None:
    settings = [("ROWS", r) for r in (256, 512, 1152, 2304, 4608)]
    settings += [("IMAGES", i) for i in (2, 4, 8, 16)]
    runners = {s: variant(batch, batch) for s in settings}
    defaults = _ConvAsGemm.ROWS, _PredictAndRoute.IMAGES

    def use(setting):
        _ConvAsGemm.ROWS, _PredictAndRoute.IMAGES = defaults
        setattr(_ConvAsGemm if setting[0] == "ROWS" else _PredictAndRoute, *setting)

    for s, r in runners.items():
        use(s)
        r.train_step()
        r.eval_step()
    for _ in range(rounds):
        for s, r in runners.items():
            use(s)
            r.timed("train", 1)
            r.timed("eval", 1)
    use(("ROWS", defaults[0]))
    print(f"\nchunk sizes (defaults ROWS={defaults[0]}, IMAGES={defaults[1]}), {rounds} rounds:")
    for (name, value), r in runners.items():
        print(f"  {name:6s} {value:5d}: train {r.img_s('train'):6.1f}  "
              f"infer {r.img_s('eval'):6.1f} img/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="profiled training steps")
    p.add_argument("--sweep", action="store_true", help="also time other chunk sizes")
    a = p.parse_args()
    retain_freed_memory()
    r = variant(a.batch_size, a.batch_size)
    for _ in range(3):
        r.train_step()
    from torch.profiler import ProfilerActivity, profile
    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            r.train_step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    gemm_shapes()
    if a.sweep:
        sweep(a.batch_size)


if __name__ == "__main__":
    main()
