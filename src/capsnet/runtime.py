"""Where and how a run executes: device resolution, threads, the allocator setting, the
run folder's lock."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import CapsnetError


def retain_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of returning it to the kernel.

    By default glibc serves every allocation above 32 MB with a fresh ``mmap`` and unmaps it
    when freed, so each large tensor of every step faults its pages in again (about a GB per
    training step of the naive model; page faults can cost more than the arithmetic of many
    layers; the measured gains are in docs/performance.md). Allocating from the heap and
    never trimming it makes a step reuse the memory of the previous one. Process-wide;
    returns False where not glibc.
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def resolve_device(device: str) -> tuple[str, list[int] | str]:
    """``auto``/``cpu``/``cuda``/``cuda:N`` -> Lightning ``(accelerator, devices)``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu", 1
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise CapsnetError(f"--device {device}: CUDA is not available on this machine")
        index = device.split(":")[1] if ":" in device else "0"
        if index.isdigit():
            return "gpu", [int(index)]
    raise CapsnetError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")


def trainer_devices(device: str, devices: int, num_nodes: int, strategy: str
                    ) -> tuple[str, list[int] | int]:
    """Lightning's ``(accelerator, devices)`` for ``--device``, ``--devices`` processes per
    machine, ``--num-nodes`` and ``--strategy``; one-line errors for combinations that cannot
    work. On the CPU each process is one device."""
    accelerator, chosen = resolve_device(device)
    if devices == 1 and num_nodes == 1:
        return accelerator, chosen
    if strategy != "ddp":
        raise CapsnetError(f"--devices {devices} --num-nodes {num_nodes} needs --strategy ddp")
    if accelerator == "gpu":
        if ":" in device:
            raise CapsnetError(f"--device {device} names one GPU; use --device cuda with "
                               f"--devices {devices}")
        if devices > torch.cuda.device_count():
            raise CapsnetError(f"--devices {devices}: this machine has "
                               f"{torch.cuda.device_count()} GPU(s)")
    return accelerator, devices


def refuse_fp16_on_cpu(precision: str, device_type: str) -> None:
    """``16-mixed`` (fp16 autocast with loss scaling) is for GPUs; on the CPU, one line
    naming what works there. Shared by ``capsnet train`` and ``capsnet bench``."""
    if precision == "16-mixed" and device_type == "cpu":
        raise CapsnetError("--precision 16-mixed needs a GPU; on the CPU use bf16-mixed or 32")


def torch_device(device: str) -> torch.device:
    """``auto``/``cpu``/``cuda``/``cuda:N`` -> the ``torch.device`` to run on."""
    accelerator, devices = resolve_device(device)
    return torch.device("cpu") if accelerator == "cpu" else torch.device("cuda", devices[0])


@contextmanager
def run_folder_lock(out: Path) -> Iterator[None]:
    """Hold the run folder ``out`` (which must exist) for this process: a second ``capsnet
    train`` into the same folder (a ``--resume`` typed twice, or a new run with the same
    ``--out``) stops with one line instead of writing the same checkpoints and metrics.csv.

    An advisory ``flock`` on the folder itself: no lock file to litter the run, and the
    operating system drops it when the process ends however it ends (SIGKILL included), so
    nothing stale ever blocks a ``--resume``. Without ``fcntl`` (Windows) it guards nothing.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CapsnetError(f"{out}: another capsnet train is writing this run right now; "
                               "let it end (or stop it) first") from None
        yield
    finally:
        os.close(fd)  # releases the lock
