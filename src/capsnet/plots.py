"""The report's figures, drawn with matplotlib's object API (no pyplot, no global backend).

Every function returns a :class:`matplotlib.figure.Figure`; ``fig.savefig(path)`` writes it
through the Agg renderer whatever backend is active, so these work the same in a script, a
test and a notebook (where ``display(fig)`` shows one inline). Images are tensors or arrays
with pixel values in [0, 1].
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.gridspec import GridSpecFromSubplotSpec

from .paper import RECON_WEIGHT

TRAIN, TEST, VAL = "#1f77b4", "#d62728", "#2ca02c"


def channels_side_by_side(a):
    """``[..., C, H, W]`` (tensor or array) -> ``[..., 1, H, C*W]`` when C is neither 1 (grey)
    nor 3 (colour), else ``a`` unchanged: the channels of e.g. smallNORB's stereo pairs
    shown next to each other as grey images, as nothing draws a 2-channel picture."""
    *lead, c, h, w = a.shape
    if c in (1, 3):
        return a
    return a.swapaxes(-3, -2).reshape(*lead, 1, h, c * w)  # rows: channel 0's, then 1's...


def to_display(img) -> np.ndarray:
    """``[C, H, W]`` (tensor or array) -> ``[H, W]`` (grey; C other than 1 or 3: the channels
    side by side) or ``[H, W, 3]`` for imshow."""
    a = img.detach().float().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    a = channels_side_by_side(np.clip(a, 0.0, 1.0))
    return a[0] if a.shape[0] == 1 else np.moveaxis(a, 0, -1)


def mosaic(tiles, gap: int = 1, fill: float = 0.35) -> np.ndarray:
    """Tile a grid of images into one picture.

    ``tiles`` ``[R, K, C, H, W]`` -> ``[R*H + (R-1)*gap, K*W + (K-1)*gap]`` (grey) or the same
    with a trailing colour axis; ``fill`` is the colour of the gaps. With C neither 1 nor 3,
    a tile's channels stand side by side (:func:`channels_side_by_side`): W becomes C*W.
    """
    t = tiles.detach().float().cpu().numpy() if isinstance(tiles, torch.Tensor) else tiles
    t = channels_side_by_side(np.asarray(t))
    rows, cols, c, h, w = t.shape
    out = np.full((c, rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap), fill,
                  dtype=np.float32)
    for r in range(rows):
        for k in range(cols):
            y, x = r * (h + gap), k * (w + gap)
            out[:, y:y + h, x:x + w] = t[r, k]
    return to_display(out)


def _hide_axes(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def training_curves(rows: list[dict], steps: dict | None = None,
                    recon_weight: float = RECON_WEIGHT) -> Figure:
    """Loss and accuracy per epoch, train vs test (and validation when the run had one).

    ``rows``: the rows of ``metrics.csv`` (:func:`capsnet.metrics.read_metrics`). ``steps``
    (optional): ``{"loss": (x, y), "acc": (x, y)}`` per-step training values with ``x`` in
    epochs, drawn as a thin line under the per-epoch points.
    """
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [r["epoch"] + 1 for r in rows]
    for ax, key, title in ((ax_loss, "loss", f"loss (margin + {recon_weight:g} x reconstruction)"),
                           (ax_acc, "acc", "accuracy")):
        if steps and key in steps:
            x, y = steps[key]
            ax.plot(x, y, color=TRAIN, alpha=0.25, lw=1, label="train (per step)")
        for split, colour in (("train", TRAIN), ("val", VAL), ("test", TEST)):
            pts = [(e, r[f"{split}_{key}"]) for e, r in zip(epochs, rows) if f"{split}_{key}" in r]
            if pts:
                ax.plot(*zip(*pts), "o-", color=colour, label=f"{split} (epoch)", ms=6)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xlim(0, max(epochs) + 0.25)
            ax.set_xticks(range(0, max(epochs) + 1, max(1, (max(epochs) + 9) // 10)))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax_acc.set_ylim(0, 1)
    if not rows:
        fig.suptitle("no metrics.csv rows yet")
    return fig


def confusion_matrix(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> Figure:
    """Counts of (true class, predicted class); rows are true classes, each cell annotated."""
    cm = np.asarray(confusion, dtype=np.int64)
    n = len(classes)
    fig = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.subplots()
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for t in range(n):
        for p in range(n):
            if cm[t, p]:
                ax.text(p, t, str(cm[t, p]), ha="center", va="center", fontsize=8,
                        color="white" if norm[t, p] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix (colour: fraction of the true class)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def per_class_accuracy(per_class: dict[str, float], overall: float) -> Figure:
    """Horizontal bars of per-class accuracy with the overall accuracy as a dashed line."""
    names, values = list(per_class), list(per_class.values())
    fig = Figure(figsize=(7, 0.35 * len(names) + 1.2), layout="constrained")
    ax = fig.subplots()
    bars = ax.barh(range(len(names)), values, color=TRAIN)
    ax.bar_label(bars, [f"{v:.1%}" for v in values], padding=3, fontsize=8)
    ax.axvline(overall, color=TEST, ls="--", label=f"overall {overall:.1%}")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("accuracy")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return fig


def reconstructions(images, recons, titles: Sequence[str], per_row: int = 10) -> Figure:
    """Inputs above their reconstructions. ``images``/``recons`` ``[N, C, H, W]``."""
    n = len(images)
    blocks = (n + per_row - 1) // per_row
    cols = min(n, per_row)
    fig = Figure(figsize=(1.1 * cols, 2.5 * blocks), layout="constrained")
    axes = fig.subplots(2 * blocks, cols, squeeze=False)
    for ax in axes.flat:
        _hide_axes(ax)
    for i in range(n):
        b, k = divmod(i, per_row)
        top, bottom = axes[2 * b, k], axes[2 * b + 1, k]
        top.imshow(to_display(images[i]), cmap="gray", vmin=0, vmax=1)
        bottom.imshow(to_display(recons[i]), cmap="gray", vmin=0, vmax=1)
        top.set_title(titles[i], fontsize=7)
        if k == 0:
            top.set_ylabel("input", fontsize=8)
            bottom.set_ylabel("decoded", fontsize=8)
    return fig


def mistakes(images, lengths, true: Sequence[int], pred: Sequence[int],
             classes: Sequence[str], per_row: int = 4) -> Figure:
    """Each mistake: the image and a bar chart of its capsule lengths.

    ``images`` ``[N, C, H, W]``, ``lengths`` ``[N, O]``; the predicted class's bar is red, the
    true class's green.
    """
    n = len(images)
    if n == 0:
        fig = Figure(figsize=(6, 1), layout="constrained")
        ax = fig.subplots()
        _hide_axes(ax)
        ax.text(0.5, 0.5, "no mistakes on these test images", ha="center", va="center")
        return fig
    rows = (n + per_row - 1) // per_row
    cols = min(n, per_row)
    fig = Figure(figsize=(3.4 * cols, 2.3 * rows), layout="constrained")
    grid = fig.add_gridspec(rows, cols)
    ys = np.arange(len(classes))
    for i in range(n):
        cell = GridSpecFromSubplotSpec(1, 2, grid[i // per_row, i % per_row],
                                       width_ratios=[1, 1.5], wspace=0.05)
        ax_img, ax_bar = fig.add_subplot(cell[0]), fig.add_subplot(cell[1])
        ax_img.imshow(to_display(images[i]), cmap="gray", vmin=0, vmax=1)
        _hide_axes(ax_img)
        t, p = int(true[i]), int(pred[i])
        ax_img.set_title(f"true: {classes[t]}\npredicted: {classes[p]}", fontsize=8)
        colours = ["#bbbbbb"] * len(classes)
        colours[t], colours[p] = VAL, TEST
        row = np.asarray(lengths[i], dtype=float)
        ax_bar.barh(ys, row, color=colours)
        ax_bar.set_yticks(ys, classes, fontsize=6)
        ax_bar.yaxis.tick_right()
        ax_bar.invert_yaxis()
        ax_bar.set_xlim(0, 1)
        ax_bar.tick_params(axis="x", labelsize=6)
        ax_bar.set_title(f"|v| = {row[p]:.2f}", fontsize=8)
    return fig


def perturbation_panels(grids, titles: Sequence[str], offsets, scale: int = 2,
                        dpi: int = 100) -> Figure:
    """Figure 4 of the paper, one panel per image.

    ``grids`` ``[N, D, S, C, H, W]`` (see :func:`capsnet.report.perturbation_grid`): one row
    per pose dimension, one column per offset in ``offsets`` ``[S]``. Every image pixel
    becomes exactly ``scale`` x ``scale`` figure pixels (save with ``dpi="figure"``), so the
    tiles stay sharp and evenly spaced.
    """
    n = len(grids)
    d, s = grids[0].shape[:2]
    gap = 2
    tiles = [mosaic(g, gap=gap, fill=0.35) for g in grids]
    mh, mw = tiles[0].shape[:2]
    h, w = (mh - (d - 1) * gap) // d, (mw - (s - 1) * gap) // s  # a tile as drawn
    aw, ah = mw * scale / dpi, mh * scale / dpi  # axes size in inches
    left, sep, right, bottom, top = 0.8, 0.9, 0.2, 1.05, 0.5
    width = left + n * aw + (n - 1) * sep + right
    height = bottom + ah + top
    fig = Figure(figsize=(width, height), dpi=dpi)
    for i, (tile, title) in enumerate(zip(tiles, titles)):
        ax = fig.add_axes(((left + i * (aw + sep)) / width, bottom / height, aw / width,
                           ah / height))
        ax.imshow(tile, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([k * (w + gap) + w / 2 - 0.5 for k in range(s)],
                      [f"{float(o):+.2f}" for o in offsets], rotation=90, fontsize=10)
        ax.set_yticks([r * (h + gap) + h / 2 - 0.5 for r in range(d)],
                      [str(r) for r in range(d)], fontsize=10)
        ax.set_xlabel("offset added to the dimension", fontsize=12)
        ax.set_ylabel("pose dimension", fontsize=12)
        ax.tick_params(length=0)
        for sp in ax.spines.values():
            sp.set_visible(False)
        ax.set_title(title, fontsize=13)
    return fig


def two_colours(first, second) -> torch.Tensor:
    """Two reconstructions in one picture, the paper's Figure 5 style: ``first`` in red,
    ``second`` in green (yellow where they overlap). ``[N, C, H, W]`` x2 -> ``[N, 3, H, W]``
    (a colour image's channels are averaged first)."""
    r, g = first.float().mean(dim=1), second.float().mean(dim=1)
    return torch.stack([r, g, torch.zeros_like(r)], dim=1).clamp(0, 1)


def pair_reconstructions(composites, by_truth, by_top2, titles: Sequence[Sequence[str]],
                         heading: str) -> Figure:
    """The paper's Figure 5 for ``N`` pairs, one column each: the overlaid input (grey), the
    two garments decoded from the capsules of the pair's true classes, and decoded from the
    two longest capsules (:func:`two_colours`). ``titles``: per pair ``(input, truth, top2)``.
    Shapes: ``composites`` ``[N, C, H, W]``, ``by_truth``/``by_top2`` ``[N, 3, h, w]``."""
    n = len(composites)
    fig = Figure(figsize=(1.25 * max(n, 2), 4.3), layout="constrained")
    fig.suptitle(heading, fontsize=9)
    axes = fig.subplots(3, max(n, 1), squeeze=False)
    for ax in axes.flat:
        _hide_axes(ax)
    for i in range(n):
        for row, (img, title) in enumerate(zip((composites[i], by_truth[i], by_top2[i]),
                                               titles[i])):
            ax = axes[row, i]
            ax.imshow(to_display(img), cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=7)
    for row, label in enumerate(("input", "true classes", "two longest")):
        axes[row, 0].set_ylabel(label, fontsize=8)
    return fig
