"""The engines' backward passes run in the precision their forward ran in.

A hand-written backward calls ``torch.mm``/``bmm`` itself; if a user runs ``loss.backward()``
inside ``torch.autocast`` (Lightning does not, plain PyTorch code often does), those calls
would be cast to bf16/fp16 and meet the fp32 tensors saved by the fp32 forward (the engines
always run their forward with autocast off). :func:`autocast_off` turns autocast off for the
backward, whatever the device.
"""

from __future__ import annotations

import functools

import torch


def autocast_off(backward):
    """Decorate an ``autograd.Function.backward(ctx, *grads)`` to run with autocast off on
    the gradients' device."""
    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        device = next((g.device.type for g in grads if isinstance(g, torch.Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return backward(ctx, *grads)
    return wrapped
