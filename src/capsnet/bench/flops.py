"""What the benchmark measures the models against: FLOP counts, the GEMM rate, peak memory.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the ops the model runs,
so every convolution is counted with its real output size, stride and padding, the CapsNet
stem (``CapsNetConfig.stem``) included; :func:`gflop_by_module` splits the count by part.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import sys
import time

import torch

from ..losses import capsule_loss

GEMM_SIZE = 2048


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    """The CPU model and its widest vector extension, e.g. ``Intel Xeon ... (AVX-512)``."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.machine(), "x86_64"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    return f"{name} ({simd})" if simd else name


def gemm_rate(device: torch.device, size: int = GEMM_SIZE, repeats: int = 3) -> float:
    """Best fp32 GFLOP/s of ``repeats`` timed ``size``^3 square matrix multiplies."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    torch.mm(a, b, out=out)
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best / 1e9


def count_gflop_per_img(model: torch.nn.Module, device: torch.device, batch: int = 2,
                        eval_batch: int | None = None) -> tuple[float, float]:
    """GFLOP per image of (a training step, inference), counted by FlopCounterMode.

    Every part the model runs is counted (the stem's convolutions too); elementwise work is
    not. The count is of the matrix products the model runs, so it depends on the algorithm:
    on the model with standard convolutions it is the paper model's arithmetic; on ours it is
    what our (batch-dependent) algorithms execute.
    """
    from torch.utils.flop_counter import FlopCounterMode
    c = model.config
    shape = (c.in_channels, c.image_size, c.image_size)
    x = torch.rand(batch, *shape, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, c.num_classes, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        out = model(x, y)
        capsule_loss(out.lengths, y, out.reconstructions, x).total.backward()
    train = counter.get_total_flops() / batch / 1e9
    model.zero_grad(set_to_none=True)
    eval_batch = eval_batch or batch
    x = torch.rand(eval_batch, *shape, device=device).contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return train, counter.get_total_flops() / eval_batch / 1e9


def gflop_by_module(model: torch.nn.Module, device: torch.device, batch: int = 2
                    ) -> dict[str, float]:
    """GFLOP per image of inference, per top-level part of the model (``stem``, ``conv1``,
    ``primary``, ``digits``, ``decoder`` for CapsNet; only parts that count any FLOPs).

    Shapes: the model's own input, ``[batch, C, H, W]`` from its config.
    """
    from torch.utils.flop_counter import FlopCounterMode
    c = model.config
    x = torch.rand(batch, c.in_channels, c.image_size, c.image_size, device=device
                   ).contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    root = type(model).__name__ + "."
    out = {}
    for name, ops in counter.get_flop_counts().items():  # "CapsNet.stem", "CapsNet.stem.0", ...
        part = name[len(root):]
        if name.startswith(root) and "." not in part:
            out[part] = sum(ops.values()) / batch / 1e9
    return {k: v for k, v in out.items() if v}


def _vm_kib(field: str) -> int | None:
    """A ``Vm...`` line of ``/proc/self/status`` in KiB (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def process_peak_bytes(fn) -> tuple[int, str]:
    """Most memory the whole process holds at once during ``fn()`` on the CPU, and how it
    was measured: ``(bytes, source)``.

    This is what a memory budget means: parameters, optimizer state, the batch, Python and
    the libraries, and everything ``fn`` allocates, as resident pages (RSS). On Linux the
    kernel's high-water mark ``VmHWM`` is reset to the current RSS first (``echo 5 >
    /proc/self/clear_refs``), so the peak is ``fn``'s (``source`` ``"VmHWM during the
    step"``); where that reset is refused, the peak of the process so far (``"VmHWM of the
    process"``, an upper bound), or ``ru_maxrss`` elsewhere. Unlike :func:`cpu_peak_bytes`
    it includes what is held before ``fn`` and memory not from PyTorch's allocator.
    """
    reset = False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        pass
    fn()
    kib = _vm_kib("VmHWM")
    if kib is not None:
        return kib * 1024, "VmHWM during the step" if reset else "VmHWM of the process"
    import resource  # Unix only; ru_maxrss is KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "ru_maxrss of the process"


@contextlib.contextmanager
def stderr_silenced():
    """Send file descriptor 2 to /dev/null: the profiler's C++ side logs start/stop lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_bytes(fn) -> int:
    """Most bytes held at once by PyTorch's CPU allocator during ``fn()``, above the start.

    Replays the allocation and free events that ``torch.profiler`` records.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with stderr_silenced(), profile(activities=[ProfilerActivity.CPU],
                                     profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
    held = peak = 0
    for _, size in sorted(events):
        held += size
        peak = max(peak, held)
    return peak
