"""Accuracy against the clock for a finished run: a table and a plot from its metrics.csv.

    python scripts/clock.py RUN_DIR [RUN_DIR2 ...] [--png docs/accuracy_vs_time.png]
        [--cpu "Intel Xeon ..."] [--val-only]

Wall time is the sum of the epochs' ``epoch_time_s`` (training plus the per-epoch evaluation
of the validation and test sets), so it continues across ``--resume``. Several run folders
are the stages of one recipe in order (a run started with ``--init`` from the one before):
their epochs are counted on one clock, and the plot marks where each stage begins. Per-epoch
test accuracy is a record only: the test set chose nothing (best.ckpt follows validation accuracy).
``--val-only`` leaves it out of the table, the thresholds and the plot: for a run whose rules
(docs/results.md) are not yet applied, whose test column is not to be looked at.

A long run on a shared machine has epochs that were slowed down by other work or paused
(``--disturbed 1-3,19``, epochs counted from 1 on the one clock). The table then adds a
second clock, "alone", on which each of those epochs counts as long as the median of the
others; the thresholds are reported on both clocks and the plot uses the second, saying so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from matplotlib.figure import Figure

from capsnet.metrics import read_metrics

THRESHOLDS = (0.90, 0.92, 0.93, 0.936, 0.94)
ACCURACIES = ("val_acc", "test_acc")  # metrics.csv columns shown; --val-only keeps the first


def minutes(rows: list[dict], disturbed: frozenset[int] = frozenset()) -> list[float]:
    """Minutes on the clock at the end of each epoch; the ``disturbed`` epochs (counted from 1)
    count as long as the median undisturbed epoch."""
    alone = [r["epoch_time_s"] for r in rows if r["epoch"] + 1 not in disturbed]
    typical = statistics.median(alone) if alone else 0.0
    out, elapsed = [], 0.0
    for r in rows:
        elapsed += typical if r["epoch"] + 1 in disturbed else r["epoch_time_s"]
        out.append(elapsed / 60)
    return out


def parse_epochs(text: str) -> frozenset[int]:
    """``"1-3,19"`` -> {1, 2, 3, 19}."""
    out = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(out)


def table(rows: list[dict], disturbed: frozenset[int] = frozenset(),
          keys: tuple[str, ...] = ACCURACIES) -> str:
    """A markdown table: each epoch's minutes on the clock (and on the "alone" clock when
    some epochs were ``disturbed``) and its accuracies ``keys``."""
    clock = minutes(rows)
    alone = minutes(rows, disturbed) if disturbed else None
    head = "| epoch | wall time (min) |" + (" alone (min) |" if alone else "")
    rule = "|---:|---:|" + ("---:|" if alone else "") + "---:|" * len(keys)
    lines = [head + "".join(f" {k.replace('_', ' ')} |" for k in keys), rule]
    for i, r in enumerate(rows):
        mark = "*" if r["epoch"] + 1 in disturbed else ""
        lines.append(f"| {r['epoch'] + 1}{mark} | {clock[i]:.1f} |"
                     + (f" {alone[i]:.1f} |" if alone else "")
                     + "".join(f" {r.get(k, float('nan')):.2%} |" for k in keys))
    return "\n".join(lines)


def first_reached(rows: list[dict], key: str = "test_acc",
                  disturbed: frozenset[int] = frozenset()) -> dict:
    """{threshold: (epoch counted from 1, minutes on the clock)} for the first epoch at or
    above each threshold."""
    out = {}
    for r, m in zip(rows, minutes(rows, disturbed)):
        for t in THRESHOLDS:
            if t not in out and r.get(key, 0) >= t:
                out[t] = (r["epoch"] + 1, m)
    return out


def stages(run_dirs: list[str]) -> tuple[list[dict], list[int]]:
    """The metrics.csv rows of the stages, epochs numbered on from one stage to the next,
    and the epoch (counted from 1) at which each stage after the first begins."""
    rows, starts = [], []
    for d in run_dirs:
        if rows:
            starts.append(len(rows) + 1)
        rows += [{**r, "epoch": len(rows) + i} for i, r in
                 enumerate(read_metrics(Path(d) / "metrics.csv"))]
    return rows, starts


def plot(rows: list[dict], path: Path, cpu: str, starts: list[int] = (),
         recipe: str = "configs/fashion-mnist.yaml",
         disturbed: frozenset[int] = frozenset(),
         keys: tuple[str, ...] = ACCURACIES) -> None:
    clock = minutes(rows, disturbed)
    epochs = [r["epoch"] + 1 for r in rows]
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    time_label = "wall-clock training time (minutes)" + (
        f"; {len(disturbed)} disturbed epochs at the median epoch's time" if disturbed else "")
    for ax, x, label in zip(fig.subplots(1, 2), (clock, epochs), (time_label, "epoch")):
        for key, colour, name in (("val_acc", "#d95f02", "validation (5,000)"),
                                  ("test_acc", "#1b9e77", "test (10,000)")):
            if key not in keys:
                continue
            ax.plot(x, [100 * r[key] for r in rows], "o-", ms=3, color=colour, label=name)
        for t in (90, 92, 93):
            ax.axhline(t, color="#999", lw=0.6, ls=":")
        for s in starts:  # a new stage begins after epoch s - 1
            ax.axvline(x[s - 2], color="#7570b3", lw=0.8, ls="--")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(84, 95)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"capsnet, {recipe}, 2 threads on {cpu}", fontsize=10)
    fig.savefig(path, dpi=90, facecolor="white")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="a run, or the stages of one recipe in order")
    p.add_argument("--png", help="write the plot here")
    p.add_argument("--cpu", default="this CPU", help="CPU name for the plot's title")
    p.add_argument("--recipe", default="configs/fashion-mnist.yaml",
                   help="the recipe's name for the plot's title")
    p.add_argument("--disturbed", type=parse_epochs, default=frozenset(), metavar="EPOCHS",
                   help="epochs slowed by other work, e.g. 1-3,19: also shown on a clock that "
                        "counts them at the median epoch's time")
    p.add_argument("--val-only", action="store_true",
                   help="leave test accuracy out (a run whose rules are not yet applied)")
    a = p.parse_args(argv)
    keys = ACCURACIES[:1] if a.val_only else ACCURACIES
    empty = [d for d in a.run_dirs if not read_metrics(Path(d) / "metrics.csv")]
    if empty:
        print(f"{empty[0]}: no metrics.csv rows", file=sys.stderr)
        return 2
    rows, starts = stages(a.run_dirs)
    print(table(rows, a.disturbed, keys))
    print()
    for key in keys[::-1]:
        alone = first_reached(rows, key, a.disturbed)
        for t, (epoch, m) in first_reached(rows, key).items():
            extra = f" ({alone[t][1]:.1f} alone)" if a.disturbed else ""
            print(f"{key} first >= {t:.1%}: epoch {epoch}, {m:.1f} min{extra}")
    if a.png:
        plot(rows, Path(a.png), a.cpu, starts, a.recipe, a.disturbed, keys)
        print(f"wrote {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
