"""Throughput and peak memory of the paper model across batch sizes and input sizes.

Runs ``capsnet bench --json --no-naive`` once per setting, each in a fresh process (so that
peak memory is that setting's alone), and writes ``docs/scaling.csv`` and ``docs/scaling.png``.

    .venv/bin/python scripts/scaling.py [--steps 4] [--out docs] [--plot-only]

About 6 minutes on 2 cores; run it on a quiet machine (see ``uptime``).

With ``--stem-sweep``: larger images with and without the downsampling stem
(``CapsNetConfig.stem``), at training batch 32: for every size (default 32, 64, 96, 128 and
224 px, 3 channels) the paper's model (``stem 0``) and the model with the suggested stem
(:func:`capsnet.models.capsnet.suggest_stem`: halve until the side is at most 32), each in a
fresh process. Writes ``stem_scaling.csv``, ``stem_scaling.md`` (a markdown table) and,
unless ``--no-plot``, ``stem_scaling.png`` into ``--out``:

    .venv/bin/python scripts/scaling.py --stem-sweep [--sizes 32 64 96 128 224] [--batch 32]
        [--channels 3] [--steps 4] [--budget-gb 4] [--max-gb G] [--out docs]

Memory is the bench's ``train_peak_total_mb``, the process's peak resident memory during a
training step (everything held: weights, gradients, Adam state, activations, Python), and
the process's lifetime peak (``ru_maxrss`` of the child, which also covers the bench's own
FLOP counting). Without the stem the large sizes need far more memory than a machine may
have (224 px: a 104x104x32 PrimaryCaps grid, 443M DigitCaps weights, u_hat of 7 GB at batch
32), so a setting is skipped when a lower bound of its memory (weights, gradients and two
Adam moments of every parameter, plus u_hat; counted on the meta device, nothing allocated)
exceeds ``--max-gb`` (default 75% of the memory available at start), and a running one is
killed as soon as its resident memory passes it; the table says which.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCHES = [32, 64, 128, 256, 512]  # at 28x28x1
SIZES = [28, 32, 48, 64]  # at batch 128, with 1 and 3 channels
CHANNELS = [1, 3]
FIELDS = ["batch_size", "image_size", "channels", "primary_capsules", "train_img_s",
          "eval_img_s", "limit_train_img_s", "limit_eval_img_s", "train_vs_limit",
          "eval_vs_limit", "train_gflop_per_img", "eval_gflop_per_img", "gemm_gflop_s",
          "train_peak_mb"]


def primary_capsules(size: int, stem: int = 0) -> int:
    from capsnet.models.capsnet import CapsNetConfig
    return CapsNetConfig(image_size=size, stem=stem).num_primary_capsules


def run(batch: int, size: int, channels: int, steps: int, threads: int | None) -> dict:
    cmd = [str(Path(sys.executable).with_name("capsnet")), "bench", "--json", "--no-naive",
           "--batch-size", str(batch), "--image-size", str(size), "--channels", str(channels),
           "--steps", str(steps), "--warmup", "1"]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    r["primary_capsules"] = primary_capsules(size)
    return {k: r[k] for k in FIELDS}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    by_batch = [r for r in rows if r["image_size"] == 28 and r["channels"] == 1]
    by_batch = sorted({r["batch_size"]: r for r in by_batch}.values(),
                      key=lambda r: r["batch_size"])
    b = [r["batch_size"] for r in by_batch]
    ax = axes[0][0]
    ax.plot(b, [r["train_img_s"] for r in by_batch], "o-", label="training step")
    ax.plot(b, [r["eval_img_s"] for r in by_batch], "s-", label="inference")
    ax.plot(b, [r["limit_train_img_s"] for r in by_batch], ":", c="C0", label="training limit")
    ax.plot(b, [r["limit_eval_img_s"] for r in by_batch], ":", c="C1", label="inference limit")
    ax.set(xscale="log", yscale="log", xlabel="batch size (28x28x1)", ylabel="images/s",
           title="throughput vs batch size")
    ax.set_xticks(b, [str(x) for x in b], minor=False)
    ax.minorticks_off()
    ax.legend(fontsize=8, ncol=2, loc="center", bbox_to_anchor=(0.5, 0.28))
    ax = axes[0][1]
    ax.plot(b, [r["train_peak_mb"] for r in by_batch], "o-", c="C2")
    ax.set(xscale="log", yscale="log", xlabel="batch size (28x28x1)",
           ylabel="peak MB of a training step", title="memory vs batch size")
    ax.set_xticks(b, [str(x) for x in b], minor=False)
    ax.minorticks_off()
    for ch, marker in zip(CHANNELS, "o^"):
        sub = sorted((r for r in rows if r["batch_size"] == 128 and r["channels"] == ch),
                     key=lambda r: r["image_size"])
        caps = [r["primary_capsules"] for r in sub]
        axes[1][0].plot(caps, [r["train_img_s"] for r in sub], marker + "-", c="C0",
                        label=f"training, {ch} channel{'s' * (ch > 1)}")
        axes[1][0].plot(caps, [r["eval_img_s"] for r in sub], marker + "--", c="C1",
                        label=f"inference, {ch} channel{'s' * (ch > 1)}")
        axes[1][1].plot(caps, [r["train_peak_mb"] for r in sub], marker + "-", c="C2",
                        label=f"{ch} channel{'s' * (ch > 1)}")
        for r in sub if ch == CHANNELS[0] else []:
            axes[1][1].annotate(f"{r['image_size']}px", (r["primary_capsules"],
                                r["train_peak_mb"]), fontsize=7, xytext=(3, -10),
                                textcoords="offset points")
    axes[1][0].set(xscale="log", yscale="log", xlabel="primary capsules (28, 32, 48, 64 px)",
                   ylabel="images/s", title="throughput vs input size (batch 128)")
    axes[1][1].set(xscale="log", yscale="log", xlabel="primary capsules (28, 32, 48, 64 px)",
                   ylabel="peak MB of a training step", title="memory vs input size (batch 128)")
    caps = sorted({r["primary_capsules"] for r in rows if r["batch_size"] == 128})
    for ax in axes[1]:
        ax.set_xticks(caps, [f"{c:,}" for c in caps], minor=False)
        ax.minorticks_off()
    axes[1][0].legend(fontsize=8)
    axes[1][1].legend(fontsize=8)
    for ax in axes.flat:  # plain numbers on the log y axes: 10, 20, 50, 100, ...
        low, high = ax.get_ylim()
        ticks = [m * 10 ** e for e in range(0, 5) for m in (1, 2, 5) if low <= m * 10 ** e <= high]
        ax.set_yticks(ticks, [f"{t:,}" for t in ticks], minor=False)
        ax.minorticks_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- --stem-sweep -------------------------------------------------------------------------

STEM_SIZES = [32, 64, 96, 128, 224]
STEM_FIELDS = ["image_size", "channels", "stem", "stem_channels", "batch_size",
               "primary_capsules", "parameters", "estimate_mb", "status", "train_img_s",
               "eval_img_s", "train_gflop_per_img", "eval_gflop_per_img", "stem_gflop_per_img",
               "train_peak_total_mb", "train_peak_mb", "process_peak_mb", "seconds"]


def _mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def memory_lower_bound_mb(size: int, channels: int, stem: int, stem_channels: int,
                          batch: int) -> tuple[int, int, float]:
    """``(parameters, primary capsules, MB)``: what a training step must at least hold.

    Every parameter four times in fp32 (weight, gradient, Adam's two moments) plus the
    prediction vectors ``u_hat`` ``[B, I, O, D]``; the model is built on the meta device, so
    nothing is allocated whatever the size.
    """
    import torch

    from capsnet.models.capsnet import CapsNet, CapsNetConfig
    config = CapsNetConfig(in_channels=channels, image_size=size, stem=stem,
                           stem_channels=stem_channels)
    with torch.device("meta"):
        n = CapsNet(config).num_parameters()
    u_hat = batch * config.num_primary_capsules * config.num_classes * config.class_dim
    return n, config.num_primary_capsules, (16 * n + 4 * u_hat) / 2**20


def run_guarded(cmd: list[str], limit_mb: float) -> tuple[str, str, int, float, bool]:
    """Run ``cmd``; kill it as soon as its resident memory passes ``limit_mb``.

    Returns ``(stdout, stderr, exit code, lifetime peak RSS in MB (ru_maxrss), killed)``.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        killed = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if not killed and _rss_mb(proc.pid) > limit_mb:
                proc.kill()
                killed = True
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return (out.read().decode(), err.read().decode(), proc.returncode,
                usage.ru_maxrss / 1024, killed)


def stem_row(size: int, channels: int, stem: int, stem_channels: int, batch: int,
             steps: int, threads: int | None, limit_mb: float) -> dict:
    n, caps, estimate = memory_lower_bound_mb(size, channels, stem, stem_channels, batch)
    row = dict.fromkeys(STEM_FIELDS)
    row.update(image_size=size, channels=channels, stem=stem,
               stem_channels=stem_channels if stem else None, batch_size=batch,
               primary_capsules=caps, parameters=n, estimate_mb=round(estimate))
    if estimate > limit_mb:
        row["status"] = f"skipped: needs at least {estimate / 1024:.1f} GB"
        return row
    cmd = [str(Path(sys.executable).with_name("capsnet")), "bench", "--json", "--no-naive",
           "--batch-size", str(batch), "--image-size", str(size), "--channels", str(channels),
           "--stem", str(stem), "--stem-channels", str(stem_channels),
           "--steps", str(steps), "--warmup", "1"]
    if threads:
        cmd += ["--threads", str(threads)]
    started = time.perf_counter()
    out, err, code, peak, killed = run_guarded(cmd, limit_mb)
    row["seconds"] = round(time.perf_counter() - started, 1)
    row["process_peak_mb"] = round(peak)
    if killed:
        row["status"] = f"killed: over {limit_mb / 1024:.1f} GB"
    elif code != 0:
        last = (err.strip().splitlines() or [f"exit code {code}"])[-1]
        row["status"] = f"failed: {last[:120]}"
    else:
        r = json.loads(out)
        row["status"] = "ok"
        for k in ("train_img_s", "eval_img_s", "train_gflop_per_img", "eval_gflop_per_img",
                  "stem_gflop_per_img", "train_peak_total_mb", "train_peak_mb"):
            row[k] = r[k]
    return row


def stem_markdown(rows: list[dict], budget_mb: float, meta: str) -> str:
    """The sweep as a markdown table; ``meta`` is a line on how it was run."""
    lines = [meta, "",
             "| input | stem | primary capsules | parameters | GFLOP/img (training) "
             "| training img/s | inference img/s | peak MB (training step) "
             f"| peak MB (process) | within {budget_mb / 1024:g} GB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |"]
    for r in rows:
        stem = f"{r['stem']} x {r['stem_channels']} ch" if r["stem"] else "0 (paper)"
        head = (f"| {r['image_size']}×{r['image_size']}×{r['channels']} | {stem} | "
                f"{r['primary_capsules']:,} | {r['parameters'] / 1e6:.1f}M |")
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']} (lower bound {r['estimate_mb']:,} MB) "
                         "| | | | | ✗ |")
            continue
        ok = "✓" if r["train_peak_total_mb"] <= budget_mb else "✗"
        lines.append(f"{head} {r['train_gflop_per_img']:.2f} | {r['train_img_s']:.1f} | "
                     f"{r['eval_img_s']:.1f} | {r['train_peak_total_mb']:,.0f} | "
                     f"{r['process_peak_mb']:,} | {ok} |")
    lines += ["", "Peak MB (training step): the process's peak resident memory during one "
              "training step (bench `train_peak_total_mb`: weights, gradients, Adam state, "
              "activations, Python); (process): its lifetime peak, also covering the bench's "
              "FLOP counting. MB = 2^20 bytes."]
    return "\n".join(lines) + "\n"


def stem_plot(rows: list[dict], budget_mb: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = sorted({r["image_size"] for r in rows})
    for with_stem, marker, label in ((False, "o-", "paper model (no stem)"),
                                     (True, "s-", "with the stem (where one is needed)")):
        # per size, the row without a stem, or the one with the most stem stages
        pick = [max((r for r in rows if r["image_size"] == s),
                    key=lambda r: r["stem"] if with_stem else -r["stem"]) for s in sizes]
        sub = [r for r in pick if r["status"] == "ok"]
        xs = [r["image_size"] for r in sub]
        axes[0].plot(xs, [r["train_img_s"] for r in sub], marker, label=label)
        axes[1].plot(xs, [r["train_peak_total_mb"] for r in sub], marker, label=label)
    axes[1].axhline(budget_mb, ls=":", c="k", label=f"{budget_mb / 1024:g} GB budget")
    batch = rows[0]["batch_size"] if rows else "?"
    axes[0].set(yscale="log", xlabel="image side (px)", ylabel="training images/s",
                title=f"throughput (training batch {batch})")
    axes[1].set(yscale="log", xlabel="image side (px)", ylabel="peak MB of a training step",
                title="peak resident memory of a training step")
    for ax in axes:
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.legend(fontsize=8)
        low, high = ax.get_ylim()  # plain numbers on the log axes: 1, 2, 5, 10, 20, ...
        ticks = [m * 10 ** e for e in range(-1, 6) for m in (1, 2, 5) if low <= m * 10 ** e <= high]
        ax.set_yticks(ticks, [f"{t:,g}" for t in ticks], minor=False)
        ax.minorticks_off()
    missing = [f"{r['image_size']} px, stem {r['stem']}: {r['status']}" for r in rows
               if r["status"] != "ok"]
    if missing:  # settings that did not run (over the memory limit, or failed)
        fig.text(0.01, 0.01, "not shown: " + "; ".join(missing), fontsize=7)
    fig.tight_layout(rect=(0, 0.04 if missing else 0, 1, 1))
    fig.savefig(path, dpi=110)


def stem_sweep(a) -> None:
    from capsnet.models.capsnet import suggest_stem
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    limit_mb = a.max_gb * 1024 if a.max_gb else 0.75 * _mem_available_mb()
    budget_mb = a.budget_gb * 1024
    print(f"stem sweep: sizes {a.sizes}, {a.channels} channels, batch {a.batch}, "
          f"{a.steps} steps; settings over {limit_mb / 1024:.1f} GB are skipped or killed",
          flush=True)
    rows = []
    for size in a.sizes:
        stems = [0]
        stem = suggest_stem(size) if a.stem is None else a.stem
        if stem:
            stems.append(stem)
        for k in stems:
            r = stem_row(size, a.channels, k, a.stem_channels, a.batch, a.steps, a.threads,
                         limit_mb)
            rows.append(r)
            if r["status"] == "ok":
                print(f"{size}x{size}x{a.channels}, stem {k}: train {r['train_img_s']:7.1f} "
                      f"img/s, inference {r['eval_img_s']:7.1f} img/s, peak "
                      f"{r['train_peak_total_mb']:6.0f} MB (process {r['process_peak_mb']} "
                      f"MB), {r['seconds']} s", flush=True)
            else:
                print(f"{size}x{size}x{a.channels}, stem {k}: {r['status']}", flush=True)
            with open(out / "stem_scaling.csv", "w", newline="") as f:
                w = csv.DictWriter(f, STEM_FIELDS)
                w.writeheader()
                w.writerows(rows)
    import torch

    from capsnet.bench.flops import cpu_name
    meta = (f"`scripts/scaling.py --stem-sweep`: training batch {a.batch}, {a.steps} timed "
            f"steps (medians), {a.threads or torch.get_num_threads()} threads, {cpu_name()}, "
            f"torch {torch.__version__}.")
    (out / "stem_scaling.md").write_text(stem_markdown(rows, budget_mb, meta))
    if not a.no_plot:
        stem_plot(rows, budget_mb, out / "stem_scaling.png")
    print(f"wrote {out / 'stem_scaling.csv'}, {out / 'stem_scaling.md'}"
          + ("" if a.no_plot else f", {out / 'stem_scaling.png'}"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps per setting")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", default="docs", help="folder for scaling.csv and scaling.png")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw scaling.png from an existing scaling.csv")
    s = p.add_argument_group("--stem-sweep: larger images with and without the stem")
    s.add_argument("--stem-sweep", action="store_true",
                   help="run the stem sweep instead (stem_scaling.csv/.md/.png in --out)")
    s.add_argument("--sizes", type=int, nargs="+", default=STEM_SIZES,
                   help=f"image sides (default {' '.join(map(str, STEM_SIZES))})")
    s.add_argument("--batch", type=int, default=32, help="training batch (default 32)")
    s.add_argument("--channels", type=int, default=3, help="input channels (default 3)")
    s.add_argument("--stem", type=int, help="stem stages of the stem rows (default: "
                   "suggest_stem(size), halving until the side is at most 32)")
    s.add_argument("--stem-channels", type=int, default=64, help="default 64")
    s.add_argument("--budget-gb", type=float, default=4.0,
                   help="the memory budget the table checks (default 4)")
    s.add_argument("--max-gb", type=float, help="skip or kill a setting above this much "
                   "memory (default: 75%% of the memory available at start)")
    s.add_argument("--no-plot", action="store_true", help="no stem_scaling.png")
    a = p.parse_args()
    if a.stem_sweep:
        stem_sweep(a)
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.plot_only:
        with open(out / "scaling.csv", newline="") as f:
            rows = [{k: (float(v) if "." in v else int(v)) for k, v in r.items()}
                    for r in csv.DictReader(f)]
        plot(rows, out / "scaling.png")
        return
    settings = [(b, 28, 1) for b in BATCHES]
    settings += [(128, s, c) for c in CHANNELS for s in SIZES if (128, s, c) not in settings]
    rows = []
    for batch, size, channels in settings:
        r = run(batch, size, channels, a.steps, a.threads)
        rows.append(r)
        print(f"batch {batch:4d}, {size}x{size}x{channels}: train {r['train_img_s']:7.1f} "
              f"img/s ({r['train_vs_limit']:.0%} of limit), inference {r['eval_img_s']:7.1f} "
              f"img/s, peak {r['train_peak_mb']:6.0f} MB", flush=True)
        with open(out / "scaling.csv", "w", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            w.writeheader()
            w.writerows(rows)
    plot(rows, out / "scaling.png")


if __name__ == "__main__":
    main()
