"""What each optimization of the training step gave: images/s of cumulative variants.

All variants are built in one process and timed in interleaved rounds (medians), on random
batches of the paper model's shape, with the same threads:

    .venv/bin/python scripts/ablation.py [--batch-size 128] [--rounds 6] [--no-retain-memory]

``before`` is the first version of the library: oneDNN convolutions (channels-last), routing
differentiated by autograd through every iteration, Adam's default implementation (a Python
loop over the parameters on CPU). Variants that need an older or an experimental version of a
routing function of ``capsnet.layers`` swap it in around their own steps only.
"""

from __future__ import annotations

import argparse
import contextlib
import types

import torch
from torch.nn import functional as F

from capsnet import CapsNet, layers
from capsnet.bench import _Runner
from capsnet.runtime import retain_freed_memory
from capsnet.layers import squash


def autograd_routing(self, u):
    """The routing of the first version: autograd keeps every intermediate ``u_hat`` use."""
    u_hat = self.predictions(u)  # [B, O, I, D]
    bsz, n_out, n_in, _ = u_hat.shape
    c = u_hat.new_full((bsz, n_out, n_in), 1.0 / n_out)
    logits = None
    for it in range(self.iterations):
        if it > 0:
            c = F.softmax(logits, dim=1)
        v = squash(torch.matmul(c.unsqueeze(2), u_hat).squeeze(2))
        if it < self.iterations - 1:
            a = torch.matmul(u_hat, v.unsqueeze(3)).squeeze(3)
            logits = a if logits is None else logits + a
    return v


def unfused_routing(self, u):
    """Hand-written routing backward, on the whole batch's ``u_hat`` at once."""
    return self.route(self.predictions(u))


def autograd_squash_backward(s, grad_v):
    """The first hand-written routing backward got squash's gradient from a nested autograd call."""
    with torch.enable_grad():
        s = s.detach().requires_grad_()
        (grad_s,) = torch.autograd.grad(squash(s), s, grad_v)
    return grad_s


OLD_SQUASH = {"_squash_backward": autograd_squash_backward}
COMPILED_ROUTING = {"_route": torch.compile(layers._route, dynamic=False),
                    "_route_backward": torch.compile(layers._route_backward, dynamic=False)}


@contextlib.contextmanager
def patched(functions: dict):
    """Replace functions of ``capsnet.layers`` for the duration of the block."""
    old = {name: getattr(layers, name) for name in functions}
    for name, f in functions.items():
        setattr(layers, name, f)
    try:
        yield
    finally:
        for name, f in old.items():
            setattr(layers, name, f)


def variant(batch: int, eval_batch: int, algorithm="auto", routing=None, fused_adam=True,
            channels_last=True, patches=None, **config) -> _Runner:
    torch.manual_seed(0)
    m = CapsNet(**config)
    m.primary.algorithm = algorithm
    if routing is not None:
        m.digits.forward = types.MethodType(routing, m.digits)
    r = _Runner(m, torch.device("cpu"), batch, eval_batch, channels_last)
    if not fused_adam:
        r.opt = torch.optim.Adam(r.model.parameters(), lr=1e-3)
    r.patches = patches or {}
    return r


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
        "before": variant(b, b, algorithm="torch", routing=autograd_routing, fused_adam=False),
        "+ routing backward by hand": variant(b, b, algorithm="torch", routing=unfused_routing,
                                               fused_adam=False, patches=OLD_SQUASH),
        "+ predictions and routing per chunk": variant(b, b, algorithm="torch", fused_adam=False,
                                                        patches=OLD_SQUASH),
        "+ PrimaryCaps as im2col + GEMM": variant(b, b, algorithm="im2col", fused_adam=False,
                                                   patches=OLD_SQUASH),
        "+ fused Adam": variant(b, b, algorithm="im2col", patches=OLD_SQUASH),
        "+ squash gradient in closed form": variant(b, b, algorithm="im2col"),
        "+ PrimaryCaps by DFT (= now)": variant(b, b),
        "now, NCHW activations": variant(b, b, channels_last=False),
        f"now, inference batch {a.eval_batch_size}": variant(b, a.eval_batch_size),
        "now, detached routing": variant(b, b, detach_routing=True),
        "now, routing by torch.compile": variant(b, b, patches=COMPILED_ROUTING),
    }
    for r in variants.values():  # warm-up (and compilation)
        with patched(r.patches):
            r.train_step()
            r.eval_step()
    for i in range(a.rounds):
        for r in variants.values():
            with patched(r.patches):
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
