"""`capsnet bench`: our throughput against this machine's arithmetic limit and a naive CapsNet.

Everything is measured in one process and one run, with the same threads:

- FLOPs per image of a training step (forward, loss, backward) and of inference, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` on the model with standard convolutions (the
  paper model's multiply-adds; elementwise work is not counted), and the same count on our
  model as it runs (fewer when PrimaryCaps is computed in the frequency domain);
- the sustained fp32 matrix-multiply rate (square ``torch.mm``, best of several); the limit
  in images/s is that rate divided by the FLOPs per image;
- images/s of a training step (forward, loss, backward, Adam) and of inference
  (``torch.inference_mode``), each the median of individually timed steps on random data of
  the real shape, after warm-up steps; rounds of all variants are interleaved so that a busy
  machine slows them alike;
- the peak memory of a training step: the most memory the step allocates above what is held
  between steps (parameters, Adam state, the batch). On CPU this is the PyTorch allocator's
  live bytes, summed from the profiler's allocation events; on CUDA
  ``torch.cuda.max_memory_allocated``;
- the total peak of a training step, what a memory budget is about: everything held at the
  step's peak, parameters, Adam state and (on CPU) Python and the libraries included. On CPU
  the process's peak resident memory during the step (:func:`~capsnet.bench.flops.
  process_peak_bytes`, ``VmHWM``), on CUDA ``torch.cuda.max_memory_allocated``. On CPU it
  also counts memory that earlier steps freed and glibc kept (``--retain-memory``, as
  `capsnet train` runs), and, with the naive reference, the naive model's: measure with
  ``--no-naive`` for the model's own figure (``scripts/scaling.py`` does, one process per
  setting);
- the same for :class:`capsnet.bench.naive.NaiveCapsNet`, the common practice, under identical
  conditions (it keeps the default NCHW layout, as such code does). It is the paper's model,
  so it runs only for ``arch="capsnet"`` without a stem.

``stem`` (capsnet only) puts that many strided 3x3 convolutions in front of Conv1
(:class:`capsnet.models.capsnet.CapsNetConfig`); their FLOPs are counted like every other
layer's and reported apart as ``stem_gflop_per_img``.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time

import torch

from ..errors import CapsnetError, check_not_negative, check_positive
from ..losses import capsule_loss
from ..models import architecture, is_capsule_model
from ..optim import adam
from ..runtime import refuse_fp16_on_cpu, retain_freed_memory, torch_device
from .flops import (GEMM_SIZE, count_gflop_per_img, cpu_name, cpu_peak_bytes, gemm_rate,
                    gflop_by_module, process_peak_bytes, sync)
from .naive import NaiveCapsNet

# Lightning's precision names (settings.PRECISIONS) -> the dtype of torch.autocast.
AUTOCAST = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def cmd_bench(a) -> int:
    def flags(*names):  # ("--batch-size", a.batch_size), ...
        return [("--" + name.replace("_", "-"), getattr(a, name)) for name in names]
    check_positive(*flags("batch_size", "eval_batch_size", "threads", "steps", "image_size",
                          "channels", "routing_iterations", "stem_channels"))
    check_not_negative(*flags("warmup", "stem", "recon_size"))
    result = bench(arch=a.arch, batch_size=a.batch_size, eval_batch_size=a.eval_batch_size,
                   device=a.device, threads=a.threads, steps=a.steps, warmup=a.warmup,
                   image_size=a.image_size, channels=a.channels,
                   routing_iterations=a.routing_iterations, detach_routing=a.detach_routing,
                   stem=a.stem, stem_channels=a.stem_channels, recon_size=a.recon_size,
                   naive=a.naive, precision=a.precision,
                   retain_memory=a.retain_memory,
                   log=None if a.json else sys.stderr)
    print(json.dumps(result) if a.json else format_table(result))
    return 0


class StepRunner:
    """One model with its optimizer (fused Adam unless given) and random batches of the
    model's input shape; times its training steps (forward, loss, backward, optimizer) and
    inference steps. Also what ``scripts/`` time their variants with.

    ``autocast``: a dtype (``torch.bfloat16``, ``torch.float16``) to run the forward pass and
    the loss under ``torch.autocast``, the backward outside it, as Lightning's mixed
    precision does; None for fp32."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu",
                 batch: int = 128, eval_batch: int | None = None, channels_last: bool = True,
                 optimizer: torch.optim.Optimizer | None = None,
                 autocast: torch.dtype | None = None):
        c = model.config
        device = torch.device(device)
        eval_batch = eval_batch or batch
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device=device, memory_format=fmt)
        self.device = device
        self.opt = optimizer or adam(self.model.parameters())
        shape = (c.in_channels, c.image_size, c.image_size)
        self.x = torch.rand(batch, *shape, device=device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, c.num_classes, (batch,), device=device)
        self.x_eval = torch.rand(eval_batch, *shape, device=device).contiguous(memory_format=fmt)
        self.times: dict[str, list[float]] = {"train": [], "eval": []}
        self.autocast = autocast

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast,
                              enabled=self.autocast is not None)

    def train_step(self) -> None:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.model(self.x, self.y)
            loss = capsule_loss(out.lengths, self.y, out.reconstructions, self.x).total
        loss.backward()
        self.opt.step()

    def eval_step(self) -> None:
        self.model.eval()
        with torch.inference_mode(), self._autocast():
            self.model(self.x_eval)

    def timed(self, kind: str, n: int) -> None:
        step = self.train_step if kind == "train" else self.eval_step
        for _ in range(n):
            sync(self.device)
            t = time.perf_counter()
            step()
            sync(self.device)
            self.times[kind].append(time.perf_counter() - t)

    def img_s(self, kind: str) -> float:
        batch = self.x.shape[0] if kind == "train" else self.x_eval.shape[0]
        return batch / statistics.median(self.times[kind])

    def train_peak_mb(self) -> float:
        """Peak memory of one training step above what is held between steps, in MiB."""
        if self.device.type == "cuda":
            sync(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.train_step()
            sync(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
        return cpu_peak_bytes(self.train_step) / 2**20

    def train_peak_total_mb(self) -> tuple[float, str]:
        """Everything held at the peak of one training step, in MiB, and how it was measured.

        CPU: the process's peak resident memory during the step (``VmHWM``, see
        :func:`~capsnet.bench.flops.process_peak_bytes`); CUDA: ``max_memory_allocated``
        (parameters, gradients, Adam state and the step's activations).
        """
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.train_step()
            sync(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "max_memory_allocated"
        peak, source = process_peak_bytes(self.train_step)
        return peak / 2**20, source


def data_ms_per_batch(batch: int, shape: tuple[int, int, int], device: torch.device,
                      repeats: int = 5) -> float:
    """Median ms of the training data path for one batch, as `capsnet train` runs it.

    uint8 images (already batched by tensor indexing) -> float in [0, 1] -> the paper's
    augmentation (random shifts of up to 2 pixels, per image) -> channels-last.
    """
    from ..data.augment import AugmentConfig, augment
    from ..data.batches import to_unit
    images = torch.randint(0, 256, (batch, *shape), dtype=torch.uint8, device=device)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        x = augment(to_unit(images), AugmentConfig())
        x = x.contiguous(memory_format=torch.channels_last)
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]) * 1e3


@contextlib.contextmanager
def _threads(threads: int | None):
    """torch's intra-op thread count set to ``threads`` (when given) and restored."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bench(arch: str = "capsnet", batch_size: int = 128, eval_batch_size: int | None = None,
          device: str = "auto", threads: int | None = None, steps: int = 12, warmup: int = 2,
          image_size: int = 28, channels: int = 1, routing_iterations: int = 3,
          detach_routing: bool = False, stem: int = 0, stem_channels: int = 64,
          recon_size: int = 0, naive: bool = True, precision: str = "32",
          retain_memory: bool = True, rounds: int = 3, log=None) -> dict:
    """Run the whole benchmark; returns the results as a flat dict (see ``capsnet bench``).

    ``stem``/``stem_channels``: the CapsNet's downsampling stem (0: none, the paper's model;
    :func:`capsnet.models.capsnet.suggest_stem` gives a number for an image size);
    ``recon_size``: the side the CapsNet's decoder reconstructs (0: the image's).
    ``precision``: Lightning's name ("32", "bf16-mixed", "16-mixed": GPU only) for both
    models' steps (the limit stays fp32's). ``threads`` applies during the call only;
    ``retain_memory`` changes glibc's malloc settings for the rest of the process
    (:func:`capsnet.runtime.retain_freed_memory`; glibc's adaptive defaults cannot be
    restored), pass False to leave them alone.
    """
    started = time.perf_counter()
    dev = torch_device(device)
    paper = arch == "capsnet"
    try:  # everything checked before any process-wide setting changes
        config_cls, model_cls = architecture(arch)
        if not is_capsule_model(arch):
            raise ValueError(f"{arch} is a CNN baseline; capsnet bench measures capsule "
                             "models")
        config = dict(in_channels=channels, image_size=image_size)
        if paper:
            config.update(routing_iterations=routing_iterations, detach_routing=detach_routing,
                          stem=stem, stem_channels=stem_channels, recon_size=recon_size)
        elif routing_iterations != 3 or detach_routing:
            raise ValueError(f"{arch} has no routing iterations to set")
        elif stem != 0 or stem_channels != 64 or recon_size != 0:
            raise ValueError(f"{arch} has no stem or recon size to set")
        config = config_cls(**config)
        if precision not in AUTOCAST:
            raise ValueError(f"--precision must be one of {', '.join(AUTOCAST)}, not {precision}")
        refuse_fp16_on_cpu(precision, dev.type)
        torch.manual_seed(0)
        ours = model_cls(config)
    except ValueError as e:
        raise CapsnetError(str(e)) from None
    retained = retain_memory and dev.type == "cpu" and retain_freed_memory()
    with _threads(threads):  # restored afterwards: bench() is also a library call
        eval_batch_size = eval_batch_size or batch_size
        naive = naive and paper and not stem and not recon_size  # of the paper's model only

        def say(msg: str) -> None:
            if log is not None:
                print(f"[{time.perf_counter() - started:5.0f} s] {msg}", file=log, flush=True)

        # FLOPs of the model's math: the same model with standard convolutions.
        reference = model_cls(config).to(dev)
        if paper:
            reference.primary.algorithm = "torch"
        train_gflop, eval_gflop = count_gflop_per_img(reference, dev)
        stem_gflop = gflop_by_module(reference, dev).get("stem") if paper and stem else None
        del reference
        amp = AUTOCAST[precision]
        runners = {"ours": StepRunner(ours, dev, batch_size, eval_batch_size, channels_last=True,
                                      autocast=amp)}
        # What ours executes: fewer FLOPs when PrimaryCaps runs in the frequency domain.
        train_done, eval_done = count_gflop_per_img(ours, dev, batch_size, eval_batch_size)
        if naive:
            runners["naive"] = StepRunner(NaiveCapsNet(config), dev, batch_size, eval_batch_size,
                                       channels_last=False, autocast=amp)
        say(f"{train_gflop:.3f} GFLOP per image per training step, {eval_gflop:.3f} per "
            f"inference; warming up")
        for r in runners.values():
            for _ in range(warmup):
                r.train_step()
                r.eval_step()

        # Interleaved rounds: GEMM rate, then each model's training and inference steps.
        gemm = []
        for i in range(rounds):
            gemm.append(gemm_rate(dev))
            n = steps // rounds + (i < steps % rounds)
            for name, r in runners.items():
                say(f"round {i + 1}/{rounds}: {name} ({n} training + {n} inference steps)")
                r.timed("train", n)
                r.timed("eval", n)
        gemm_gflop_s = max(gemm)
        say("peak memory of a training step")
        # The process-wide peak first: the profiler of the per-step peak holds memory of its own.
        total_mb, total_source = runners["ours"].train_peak_total_mb()
        peaks = {name: r.train_peak_mb() for name, r in runners.items()}
        data_ms = data_ms_per_batch(batch_size, (channels, image_size, image_size), dev)

        res = {
            "train_img_s": runners["ours"].img_s("train"),
            "eval_img_s": runners["ours"].img_s("eval"),
            "limit_train_img_s": gemm_gflop_s / train_gflop,
            "limit_eval_img_s": gemm_gflop_s / eval_gflop,
            "naive_train_img_s": runners["naive"].img_s("train") if naive else None,
            "naive_eval_img_s": runners["naive"].img_s("eval") if naive else None,
            "train_gflop_per_img": train_gflop,
            "eval_gflop_per_img": eval_gflop,
            "train_gflop_per_img_executed": train_done,
            "eval_gflop_per_img_executed": eval_done,
            "gemm_gflop_s": gemm_gflop_s,
            "gemm_size": GEMM_SIZE,
            "train_peak_mb": peaks["ours"],
            "train_peak_total_mb": total_mb,
            "train_peak_total_source": total_source,
            "data_ms_per_batch": data_ms,
            "naive_train_peak_mb": peaks.get("naive"),
            "arch": arch,
            "parameters": ours.num_parameters(),
            "batch_size": batch_size,
            "eval_batch_size": eval_batch_size,
            "precision": precision,
            "image_size": image_size,
            "channels": channels,
            "routing_iterations": routing_iterations,
            "detach_routing": detach_routing,
            "stem": stem if paper else None,
            "stem_channels": stem_channels if paper and stem else None,
            "stem_gflop_per_img": stem_gflop,
            "recon_size": config.decoder_size if paper else None,
            "primary_capsules": getattr(config, "num_primary_capsules", None),
            "steps": steps,
            "warmup": warmup,
            "threads": torch.get_num_threads() if dev.type == "cpu" else None,
            "device": str(dev),
            "cpu": cpu_name(),
            "torch": torch.__version__,
            "malloc": "retain freed memory" if retained else "default",
        }
        res["data_vs_train_step"] = data_ms / 1e3 * res["train_img_s"] / batch_size
        res["train_vs_limit"] = res["train_img_s"] / res["limit_train_img_s"]
        res["eval_vs_limit"] = res["eval_img_s"] / res["limit_eval_img_s"]
        res["train_executed_vs_gemm"] = res["train_img_s"] * train_done / gemm_gflop_s
        res["eval_executed_vs_gemm"] = res["eval_img_s"] * eval_done / gemm_gflop_s
        if naive:
            res["train_vs_naive"] = res["train_img_s"] / res["naive_train_img_s"]
            res["eval_vs_naive"] = res["eval_img_s"] / res["naive_eval_img_s"]
            res["peak_vs_naive"] = res["train_peak_mb"] / res["naive_train_peak_mb"]
        res["seconds"] = time.perf_counter() - started
        return res


def format_table(r: dict) -> str:
    """The results as a readable table."""
    threads = f", {r['threads']} threads" if r["threads"] else ""
    lines = [
        f"capsnet bench: {r['device']}{threads}, torch {r['torch']}, {r['cpu']}",
        f"{r['arch']} ({r['parameters']:,} parameters) on "
        f"{r['image_size']}x{r['image_size']}x{r['channels']}"
        + (f", {r['routing_iterations']} routing iterations" if r["arch"] == "capsnet" else "")
        + (" (detached)" if r["detach_routing"] else "")
        + (f", {r['stem']}-stage stem ({r['stem_channels']} channels)" if r.get("stem") else "")
        + (f", decoder output {r['recon_size']}x{r['recon_size']}"
           if r.get("recon_size") and r["recon_size"] != r["image_size"] else "")
        + f", batch {r['batch_size']} (inference {r['eval_batch_size']}), "
        + ("fp32" if r.get("precision", "32") == "32" else r["precision"]),
        f"sustained fp32 GEMM ({r['gemm_size']}^3, best of the run): "
        f"{r['gemm_gflop_s']:.1f} GFLOP/s",
        "",
        f"{'':28s}{'training step':>16s}{'inference':>14s}",
        f"{'GFLOP per image (model)':28s}{r['train_gflop_per_img']:16.3f}"
        f"{r['eval_gflop_per_img']:14.3f}",
    ]
    if r.get("stem_gflop_per_img") is not None:
        lines.append(f"{'  of which the stem':28s}{'':16s}{r['stem_gflop_per_img']:14.3f}")
    lines += [
        f"{'limit (images/s)':28s}{r['limit_train_img_s']:16.1f}{r['limit_eval_img_s']:14.1f}",
        f"{r['arch'] + ' (images/s)':28s}{r['train_img_s']:16.1f}{r['eval_img_s']:14.1f}",
        f"{'  / limit':28s}{r['train_vs_limit']:15.0%} {r['eval_vs_limit']:13.0%}",
        f"{'  GFLOP per image executed':28s}{r['train_gflop_per_img_executed']:16.3f}"
        f"{r['eval_gflop_per_img_executed']:14.3f}",
        f"{'  executed GFLOP/s / GEMM':28s}{r['train_executed_vs_gemm']:15.0%} "
        f"{r['eval_executed_vs_gemm']:13.0%}",
    ]
    if r["naive_train_img_s"] is not None:
        lines += [
            f"{'naive (images/s)':28s}{r['naive_train_img_s']:16.1f}{r['naive_eval_img_s']:14.1f}",
            f"{'capsnet / naive':28s}{r['train_vs_naive']:15.1f}x{r['eval_vs_naive']:13.1f}x",
        ]
    lines += ["", f"{'peak memory of a training step':28s}{r['train_peak_mb']:13.0f} MB"
              + (f" (naive {r['naive_train_peak_mb']:.0f} MB)"
                 if r["naive_train_peak_mb"] is not None else "")]
    lines.append(f"{'  total at its peak':28s}{r['train_peak_total_mb']:13.0f} MB "
                 f"({r['train_peak_total_source']})")
    lines.append(f"{'data path of a batch':28s}{r['data_ms_per_batch']:13.1f} ms "
                 f"({r['data_vs_train_step']:.1%} of a training step)")
    lines.append(f"({r['steps']} timed steps each, medians; malloc: {r['malloc']}; "
                 f"{r['seconds']:.0f} s)")
    if r["arch"] == "capsnet":
        flops = "the model's" if r.get("stem") else "paper"
        lines.append(f"(limit = GEMM rate / {flops} FLOPs; "
                     "capsnet's frequency-domain PrimaryCaps executes fewer FLOPs, so it can "
                     "pass 100%)")
    else:
        lines.append("(limit = GEMM rate / the model's FLOPs; its small convolutions and "
                     "batch norm run far below the GEMM rate)")
    return "\n".join(lines)
