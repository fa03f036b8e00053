"""Optimizer, learning-rate schedules, weight averaging and sharpness-aware minimization
(plain torch, no Lightning)."""

from __future__ import annotations

import math
from typing import Callable, ContextManager

import torch
from torch import Tensor


def adam(params, lr: float = 1e-3, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam with the fused (one kernel for all parameters) implementation where available.

    On CPU the default implementation loops over the parameters in Python; the fused one is
    measurably faster (``scripts/ablation.py``) and computes the same update.

    ``weight_decay > 0``: AdamW (Loshchilov & Hutter, "Decoupled Weight Decay
    Regularization", ICLR 2019): every step also moves each weight by ``-lr * weight_decay``
    times itself, outside Adam's moments (an L2 term in the loss would be divided by them,
    so weights with large gradients would hardly decay). Only weight matrices and kernels
    (two or more dimensions) decay; biases and normalization scales (one dimension) do not.
    With 0 it is plain Adam in one parameter group, as before this option existed, so the
    checkpoints of older runs resume.
    """
    params = list(params)
    make, groups = torch.optim.Adam, params
    if weight_decay > 0:
        make = torch.optim.AdamW
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
    try:
        return make(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return make(groups, lr=lr)


def warmup_factor(step: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps (0: none), then 1: the ``constant`` schedule."""
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Cosine schedule: linear warm-up over ``warmup`` steps, then half a cosine to 0 at
    ``total``.

    The warm-up's last step (``warmup - 1``) is the peak and the cosine's first, so the
    peak rate is used for one step, not two.
    """
    if warmup and step < warmup:
        return warmup_factor(step, warmup)
    top = max(warmup - 1, 0)  # the step at the peak
    progress = min(1.0, (step - top) / max(1, total - top))
    return 0.5 * (1 + math.cos(math.pi * progress))


def _average_update(weight_of_old):
    """A ``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel``: after ``n`` updates,
    floating-point tensors move to the model's by ``1 - weight_of_old(n)``; integer buffers
    (batch norm's ``num_batches_tracked``, averaged with the weights under
    ``use_buffers=True``) are counters, not weights: they are copied (PyTorch's own SWA
    update divides them as integers, so an average's counter fell behind the model's)."""
    def update(averaged: list[Tensor], current: list[Tensor], num_averaged) -> None:
        d = weight_of_old(int(num_averaged))
        for a, c in zip(averaged, current):
            if a.is_floating_point():
                a.lerp_(c, 1 - d)
            else:
                a.copy_(c)
    return update


def swa_update():
    """The ``multi_avg_fn`` of stochastic weight averaging: the equal-weight mean of every
    update (after ``n`` updates the old average weighs ``n / (n + 1)``)."""
    return _average_update(lambda n: n / (n + 1))


def ema_update(decay: float):
    """The ``multi_avg_fn`` (for ``torch.optim.swa_utils.AveragedModel``) of an exponential
    moving average with a warm-up.

    After ``n`` updates the weight of the old average is ``min(decay, (1 + n) / (10 + n))``, so
    the average follows the model closely in the first steps instead of remembering the random
    initial weights for ``1 / (1 - decay)`` steps. Integer buffers are copied
    (:func:`_average_update`).
    """
    return _average_update(lambda n: min(decay, (1 + n) / (10 + n)))


def sam_closure(closure: Callable[[], Tensor], params: list[Tensor], rho: float,
                second_pass: Callable[[], ContextManager]) -> Callable[[], Tensor]:
    """Sharpness-aware minimization (SAM; Foret et al., "Sharpness-Aware Minimization for
    Efficiently Improving Generalization", ICLR 2021) around an optimizer's ``closure``.

    The returned closure computes the gradient ``g`` at the weights ``w`` (``closure()``:
    loss, backward), moves the weights to ``w + rho * g / |g|`` (``|g|``: the norm over all
    parameters at once), takes the gradient there (``closure()`` again, inside
    ``second_pass()``, so the caller can skip logging it), and moves the weights back; the
    optimizer then steps from ``w`` with the gradient of ``w + e``: to first order, the loss
    of the worst point within ``rho`` of the weights is minimized, not only the loss at
    them. Two forward and backward passes per step. The random generators are put back
    before the second pass, so it sees the same augmented images; they end where the first
    pass left them.
    Returns the loss at ``w``.
    """
    def run() -> Tensor:
        rng = rng_state()
        loss = closure()
        have = [p for p in params if p.grad is not None]
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in have])) \
                if have else torch.tensor(float("nan"))
            # A non-finite gradient (fp16 overflow, which the grad scaler skips, or a diverged
            # loss, which stops the run) moves nothing: the optimizer steps as without SAM.
            if not torch.isfinite(norm):
                return loss
            moves = [p.grad * (rho / (float(norm) + 1e-12)) for p in have]
            for p, e in zip(have, moves):
                p.add_(e)
        after = rng_state()
        set_rng_state(rng)
        with second_pass():
            closure()
        set_rng_state(after)
        with torch.no_grad():
            for p, e in zip(have, moves):
                p.sub_(e)
        return loss
    return run


def rng_state() -> dict:
    """The random generators' states (CPU, and every CUDA device's when present), as plain
    tensors: what SAM replays and what a checkpoint carries for an exact resume."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (the parts it holds)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
