"""What each optimization of the training step gave: images/s of cumulative variants.

All variants are built in one process and timed in interleaved rounds (medians), on random
batches of the paper model's shape, with the same threads:

    .venv/bin/python scripts/ablation.py [--batch-size 128] [--rounds 6] [--no-retain-memory]

Every variant is the library as it is, set up through its public switches only:
``CapsNetConfig.routing_impl`` (``"reference"``: routing differentiated by autograd through
every iteration; ``"fused"``: per chunk of images, hand-written backward),
``PrimaryCapsules.algorithm`` (``"torch"``, ``"im2col"``, ``"auto"``), the optimizer (Adam's
default implementation, a Python loop over the parameters on CPU, or
:func:`capsnet.optim.adam`), the memory layout and the batch. ``before`` is the first
version of the library: oneDNN convolutions (channels-last), autograd routing, default Adam.

Rows of earlier versions of this script that needed functions of the library swapped for
older or experimental ones (patching module globals), and are no longer measured:
``+ routing backward by hand`` (a hand-written backward on the whole batch's ``u_hat``),
``+ predictions and routing per chunk`` and ``+ squash gradient in closed form`` as separate
steps (squash's gradient from a nested autograd call), and ``now, routing by torch.compile``.
The three routing steps are now the one row ``+ fused routing``.
"""

from __future__ import annotations

import argparse

import torch

from capsnet import CapsNet
from capsnet.bench import StepRunner
from capsnet.runtime import retain_freed_memory




def variant(batch: int, eval_batch: int, algorithm: str = "auto", routing: str = "fused",
            fused_adam: bool = True, channels_last: bool = True, **config) -> StepRunner:
    """The paper model with ``PrimaryCapsules.algorithm`` and ``routing_impl`` chosen."""
    torch.manual_seed(0)
    m = CapsNet(routing_impl=routing, **config)
    m.primary.algorithm = algorithm
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    m = m.to(memory_format=fmt)
    opt = None if fused_adam else torch.optim.Adam(m.parameters(), lr=1e-3)
    return StepRunner(m, "cpu", batch, eval_batch, channels_last, optimizer=opt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=512,
                   help="the larger inference batch to compare with --batch-size")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int)
    p.add_argument("--retain-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="glibc keeps freed memory for reuse, as `capsnet train` does")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.retain_memory:
        retain_freed_memory()
    b = a.batch_size
    variants = {
        "before": variant(b, b, algorithm="torch", routing="reference", fused_adam=False),
        "+ fused routing": variant(b, b, algorithm="torch", fused_adam=False),
        "+ PrimaryCaps as im2col + GEMM": variant(b, b, algorithm="im2col", fused_adam=False),
        "+ fused Adam": variant(b, b, algorithm="im2col"),
        "+ PrimaryCaps by DFT (= now)": variant(b, b),
        "now, NCHW activations": variant(b, b, channels_last=False),
        f"now, inference batch {a.eval_batch_size}": variant(b, a.eval_batch_size),
        "now, detached routing": variant(b, b, detach_routing=True),
        "now, autograd routing (reference)": variant(b, b, routing="reference"),
    }
    for r in variants.values():  # warm-up
        r.train_step()
        r.eval_step()
    for i in range(a.rounds):
        for r in variants.values():
            r.timed("train", 1)
            r.timed("eval", 1)
        print(f"round {i + 1}/{a.rounds}", flush=True)
    print(f"\n{torch.get_num_threads()} threads, batch {b}, torch {torch.__version__}"
          f"{', freed memory retained' if a.retain_memory else ''}")
    print(f"{'variant':44s}{'train img/s':>12s}{'infer img/s':>13s}")
    for name, r in variants.items():
        print(f"{name:44s}{r.img_s('train'):12.1f}{r.img_s('eval'):13.1f}")


if __name__ == "__main__":
    main()
