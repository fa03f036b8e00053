"""Throughput and peak memory of the paper model across batch sizes and input sizes.

Runs ``capsnet bench --json --no-naive`` once per setting, each in a fresh process (so that
peak memory is that setting's alone), and writes ``docs/scaling.csv`` and ``docs/scaling.png``.

    .venv/bin/python scripts/scaling.py [--steps 4] [--out docs] [--plot-only]

About 6 minutes on 2 cores; run it on a quiet machine (see ``uptime``).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

BATCHES = [32, 64, 128, 256, 512]  # at 28x28x1
SIZES = [28, 32, 48, 64]  # at batch 128, with 1 and 3 channels
CHANNELS = [1, 3]
FIELDS = ["batch_size", "image_size", "channels", "primary_capsules", "train_img_s",
          "eval_img_s", "limit_train_img_s", "limit_eval_img_s", "train_vs_limit",
          "eval_vs_limit", "train_gflop_per_img", "eval_gflop_per_img", "gemm_gflop_s",
          "train_peak_mb"]


def primary_capsules(size: int) -> int:
    grid = ((size - 9 + 1) - 9) // 2 + 1  # conv1 9x9 stride 1, then 9x9 stride 2
    return grid * grid * 32


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps per setting")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", default="docs", help="folder for scaling.csv and scaling.png")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw scaling.png from an existing scaling.csv")
    a = p.parse_args()
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
