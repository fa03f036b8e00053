"""`capsnet report RUN_DIR`: an offline HTML page about a trained run, and the perturbation tools.

The page (``RUN_DIR/report/index.html``) shows the training curves, the confusion matrix and
per-class accuracy, test images beside their reconstructions, the most confident mistakes,
the paper's Figure 4 (every dimension of the winning capsule nudged from -0.25 to +0.25 and
decoded) and an animated GIF of such a sweep. It refers only to PNG/GIF files next to it:
no scripts, no network. On overlapping pairs (MultiFashion) the page is
:func:`capsnet.report.pairs.build_pair_report`'s: the pair accuracy and Figure 5.

The reusable part, also used by the tutorial notebook:

- :func:`perturbation_offsets` - the 11 offsets -0.25, -0.20, ..., +0.25 (exact 0 in the middle);
- :func:`perturbation_grid` - ``x`` ``[C, H, W]`` -> decoded images ``[D, S, C, H, W]``;
- :func:`save_sweep_gif` - an animated GIF of one image's sweep.
"""

from __future__ import annotations

import datetime as _dt
import html
import sys
from pathlib import Path
from string import Template

import torch
from torch import Tensor

from ..data.batches import to_unit
from ..errors import CapsnetError

REPORT_FILES = ("curves.png", "confusion.png", "per_class.png", "reconstructions.png",
                "mistakes.png", "perturbation.png", "sweep.gif")


# --------------------------------------------------------------------------- perturbations

def perturbation_offsets(limit: float = 0.25, step: float = 0.05) -> Tensor:
    """Offsets ``[-limit, ..., +limit]`` in steps of ``step``: ``[S]`` float32, S = 11 by default.

    Computed as integers times ``step``, so the middle value is exactly 0 (no float drift).
    """
    n = int(round(limit / step))
    return torch.arange(-n, n + 1, dtype=torch.float32) * step


def clear_report_files(out: Path) -> None:
    """Make ``out`` and remove the files a report writes there (a report of pairs and one
    of single images write different ones), so a page never shows an earlier report's
    picture; nothing else in ``out`` is touched."""
    from .pairs import PAIR_FILES
    out.mkdir(parents=True, exist_ok=True)
    for name in (*REPORT_FILES, *PAIR_FILES, "index.html"):
        (out / name).unlink(missing_ok=True)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perturbation_grid(model: torch.nn.Module, x: Tensor, target: int | None = None,
                      offsets: Tensor | None = None) -> Tensor:
    """Figure 4 of the paper for one image: decode the capsule with one dimension nudged.

    The image's output capsules are computed; the winning (longest) capsule, or the one of
    class ``target``, has each of its ``D`` dimensions in turn shifted by every offset, the
    other capsules are zeroed (as the decoder's mask does) and the result is decoded.
    Row ``d``, column ``s`` is dimension ``d`` shifted by ``offsets[s]``; with the default
    offsets the middle column (offset 0) is the plain reconstruction.

    Shapes: ``x`` ``[C, H, W]`` or ``[1, C, H, W]`` in [0, 1]; ``offsets`` ``[S]`` (default
    :func:`perturbation_offsets`, S = 11) -> ``[D, S, C, H, W]`` on the CPU (D = 16 for the
    paper's model).
    """
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"one image [C, H, W] expected, got shape {tuple(x.shape)}")
    offsets = perturbation_offsets() if offsets is None else offsets
    dev = _device(model)
    v = model.capsules(x.to(dev, torch.float32))  # [1, O, D]
    k = int(v.norm(dim=-1).argmax(dim=1)) if target is None else int(target)
    pose = v[0, k]  # [D]
    d, s = pose.shape[0], offsets.shape[0]
    # poses[i, j] = pose + offsets[j] * e_i: [D, S, D]
    bump = torch.eye(d, device=dev)[:, None, :] * offsets.to(dev)[None, :, None]
    poses = pose.expand(d, s, d) + bump
    caps = v.new_zeros(d * s, v.shape[1], d)  # [D*S, O, D]
    caps[:, k] = poses.reshape(d * s, d)
    selected = torch.full((d * s,), k, dtype=torch.long, device=dev)
    out = model.decoder(caps, selected)  # [D*S, C, H, W]
    return out.view(d, s, *out.shape[1:]).float().cpu()


def dimension_effect(grid: Tensor) -> Tensor:
    """How much each dimension changes the picture: ``[D, S, C, H, W]`` -> ``[D]``.

    The mean absolute pixel difference between the two ends of the sweep.
    """
    return (grid[:, -1] - grid[:, 0]).abs().flatten(1).mean(dim=1)


def sweep_frames(image: Tensor, grid: Tensor, offsets: Tensor, dims: list[int],
                 caption: str = "", scale: int = 5):
    """Frames (PIL images, mode ``L``) of a back-and-forth sweep over each of ``dims``.

    Each frame shows the input ``image`` ``[C, H, W]`` beside the decoded perturbation from
    ``grid`` ``[D, S, C, H, W]``, a caption and a slider marking the offset. Every dimension
    goes 0 -> +max -> -max -> 0, so the animation loops without a jump.
    """
    from PIL import Image, ImageDraw, ImageFont

    from ..plots import channels_side_by_side

    s = offsets.shape[0]
    mid = s // 2
    order = list(range(mid, s)) + list(range(s - 2, -1, -1)) + list(range(1, mid))

    def tile(t: Tensor) -> Image.Image:
        t = channels_side_by_side(t.float().clamp(0, 1))  # e.g. smallNORB's stereo pair
        a = (t.mean(dim=0) * 255).round().to(torch.uint8).numpy()
        pic = Image.fromarray(a)
        pic = pic.resize((pic.width * scale, pic.height * scale), Image.Resampling.BICUBIC)
        # 32 grey levels: invisible here, and the GIF shrinks about six-fold
        return pic.point(lambda v: (v // 8) * 8 + 4 if v else 0)

    src = tile(image)
    tw, th = src.size
    pad, text_h = 8, 44
    width, height = 2 * tw + 3 * pad, th + 2 * pad + text_h
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    frames = []
    for dim in dims:
        for j in order:
            frame = Image.new("L", (width, height), 24)
            frame.paste(src, (pad, pad))
            frame.paste(tile(grid[dim, j]), (2 * pad + tw, pad))
            draw = ImageDraw.Draw(frame)
            y = th + 2 * pad
            draw.text((pad, y - 4), f"input{'  ' + caption if caption else ''}", fill=200,
                      font=font)
            draw.text((2 * pad + tw, y - 4), f"dim {dim:2d}: {float(offsets[j]):+.2f}",
                      fill=255, font=font)
            # slider: a line from -max to +max with a knob at the current offset
            x0, x1, ys = 2 * pad + tw, width - pad, y + 26
            draw.line([(x0, ys), (x1, ys)], fill=110, width=2)
            draw.line([(x0 + (x1 - x0) // 2, ys - 4), (x0 + (x1 - x0) // 2, ys + 4)],
                      fill=110, width=1)
            kx = x0 + (x1 - x0) * j / (s - 1)
            draw.ellipse([kx - 5, ys - 5, kx + 5, ys + 5], fill=255)
            frames.append(frame)
    return frames


def save_sweep_gif(model: torch.nn.Module, x: Tensor, path: str | Path,
                   dims: list[int] | None = None, top: int = 4, caption: str = "",
                   frame_ms: int = 80, scale: int = 5) -> list[int]:
    """Write an animated GIF (looping forever) of the perturbation sweep of image ``x``.

    ``x`` ``[C, H, W]`` in [0, 1]. ``dims``: the pose dimensions to sweep, in order (default:
    the ``top`` dimensions that change the reconstruction most). Returns the dimensions used.
    """
    offsets = perturbation_offsets()
    grid = perturbation_grid(model, x, offsets=offsets)
    if dims is None:
        dims = dimension_effect(grid).argsort(descending=True)[:top].tolist()
    frames = sweep_frames(x.cpu(), grid, offsets, dims, caption, scale)
    # a short pause at the ends of each swing
    s, durations = offsets.shape[0], []
    per_dim = len(frames) // max(1, len(dims))
    for _ in dims:
        for i in range(per_dim):
            end = i in (s // 2, s // 2 + s - 1)  # the +max and -max frames
            durations.append(frame_ms * 4 if end else frame_ms)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0,
                   optimize=False, disposal=1)
    return dims


# --------------------------------------------------------------------------- the report

def _step_curves(run_dir: Path, rows: list[dict]) -> dict | None:
    """Per-step training loss/accuracy from the run's TensorBoard log, x in epochs (or None)."""
    tb = run_dir / "tensorboard"
    if not tb.is_dir() or not rows:
        return None
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from tensorboard.backend.event_processing.event_accumulator import (
                EventAccumulator)
            acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
            acc.Reload()
        tags = acc.Tags().get("scalars", [])
        epochs = len(rows)
        out = {}
        for key, tag in (("loss", "train/loss_step"), ("acc", "train/acc_step")):
            if tag not in tags:
                continue
            events = acc.Scalars(tag)
            last_step = max(e.step for e in events) + 1
            per_epoch = last_step / epochs
            out[key] = ([(e.step + 1) / per_epoch for e in events], [e.value for e in events])
        return out or None
    except Exception:  # the per-step curve is a bonus; never fail the report over it
        return None


def _pick_distinct(true: Tensor, pred: Tensor, k: int) -> list[int]:
    """Indices of the first ``k`` correctly classified images of distinct classes."""
    picked, seen = [], set()
    for i in range(len(true)):
        c = int(true[i])
        if c == int(pred[i]) and c not in seen:
            picked.append(i)
            seen.add(c)
            if len(picked) == k:
                return picked
    for i in range(len(true)):  # not enough correct ones: fill up with any
        if len(picked) == k:
            break
        if i not in picked:
            picked.append(i)
    return picked


def _resolve_checkpoint(run_dir: Path, choice: str | None) -> str | Path:
    if choice in (None, "best", "last"):
        names = [f"{choice}.ckpt"] if choice else ["best.ckpt", "last.ckpt"]
        for name in names:
            if (run_dir / name).is_file():
                return run_dir / name
        raise CapsnetError(f"{run_dir}: no {' or '.join(names)} in this run directory")
    return choice  # a checkpoint or weights file, or a shipped model's name


def _save(fig, path: Path, dpi: int | str = 110) -> None:
    fig.savefig(path, dpi=dpi, facecolor="white")


def _after(meta: dict) -> str:
    """" (saved after epoch N)" with N counted from 1, as on the curves' axis."""
    epoch = meta.get("epoch")
    return f" (saved after epoch {epoch + 1})" if isinstance(epoch, int) else ""


def _selection(name: str) -> str:
    """How the checkpoint was chosen, in words (the test set never chooses)."""
    return {"best.ckpt": ", the epoch of highest validation accuracy",
            "last.ckpt": ", the last epoch"}.get(name, "")


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def build_report(run_dir: str | Path, checkpoint: str | None = None,
                 data_dir: str | None = None, dataset: str | None = None,
                 test_size: int | None = None, samples: int = 3, mistakes: int = 8,
                 device: str = "auto", batch_size: int = 256, log=None,
                 out: str | Path | None = None) -> Path:
    """Write ``run_dir/report/index.html`` and its figures; returns the path of index.html.

    ``run_dir`` may also be a model on its own (a shipped model's name, a weights file or a
    checkpoint): the page then has no training curves and goes to ``out`` (default
    ``report-<name>/``).
    """
    from .. import __version__, plots
    from ..metrics import read_metrics
    from ..checkpoints import load_model
    from ..models import is_capsule_model
    from ..evaluate import evaluation_data, recon_weight_of
    from ..inference import check_fits, infer, summarize
    from ..runtime import torch_device
    from ..settings import load_run_settings

    from ..shipped import check_run_or_model
    check_run_or_model(run_dir)
    spec, run_dir = str(run_dir), Path(run_dir)
    if run_dir.is_dir():
        settings = load_run_settings(run_dir)
    else:  # a model without its run: a file or a shipped model's name
        checkpoint, settings = spec, {}
        out = Path(out) if out else Path(f"report-{run_dir.stem}")
    if test_size is not None and test_size < 1:
        raise CapsnetError(f"--test-size must be positive, got {test_size}")
    if samples < 1:
        raise CapsnetError(f"--samples must be positive, got {samples}")
    ckpt = _resolve_checkpoint(run_dir, checkpoint)
    dev = torch_device(device)
    model, meta = load_model(ckpt, dev)
    if not is_capsule_model(model):
        raise CapsnetError(f"{meta['arch']} is a CNN baseline: the report shows capsules "
                           "(reconstructions, perturbations) and it has none; use "
                           "`capsnet evaluate`")
    c = model.config
    dataset = dataset or settings.get("dataset") or meta["dataset"]
    test = evaluation_data(ckpt, model, meta, "test", dataset, data_dir)
    from ..data.multi import is_pair_set
    recon_weight = recon_weight_of(meta)  # the run's own, as in evaluate
    out = Path(out) if out else run_dir / "report"
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if is_pair_set(test):
        from .pairs import build_pair_report
        return build_pair_report(model, meta, ckpt=ckpt, run_dir=run_dir, dataset=dataset,
                                 test=test, out=out, test_size=test_size,
                                 batch_size=batch_size, device=dev,
                                 recon_weight=recon_weight, log=log)
    if test.labels.dim() == 2:
        raise CapsnetError(f"{dataset}: the report covers single-label data; for multi-label "
                           "data use `capsnet evaluate` (per-label precision, recall, F2, mAP)")
    check_fits(model, test.shape, len(test.classes), dataset)
    images, labels = test.images, test.labels
    if test_size:
        images, labels = images[:test_size], labels[:test_size]
    classes = [str(c) for c in meta["classes"]]  # one per class (load_model checked)
    n, n_cls = len(labels), c.num_classes
    clear_report_files(out)
    log(f"report: {Path(str(ckpt)).name}{_after(meta)} on {n:,} {dataset} test images")

    # ---- predictions, accuracy, confusion
    run = infer(model, images, labels, batch_size, recon_weight)
    lengths = run.lengths
    losses = {"loss": run.loss, "margin_loss": run.margin_loss,
              "reconstruction_sse": run.reconstruction_sse}
    pred = lengths.argmax(dim=1)
    correct = pred == labels
    summary = summarize(lengths, labels, classes)
    accuracy, per_class = summary["accuracy"], summary["per_class"]
    confusion = torch.tensor(summary["confusion"])
    per_class_n = confusion.sum(dim=1)

    # ---- training curves
    rows = read_metrics(run_dir / "metrics.csv") if run_dir.is_dir() else []
    _save(plots.training_curves(rows, _step_curves(run_dir, rows), recon_weight),
          out / "curves.png")
    _save(plots.confusion_matrix(confusion.tolist(), classes), out / "confusion.png")
    _save(plots.per_class_accuracy(per_class, accuracy), out / "per_class.png")

    # ---- reconstructions: the first test image of each class (two rounds of classes)
    idx = []
    for _round in range(2):
        for cls in range(n_cls):
            hits = [i for i in (labels == cls).nonzero().flatten().tolist() if i not in idx]
            if hits:
                idx.append(hits[0])
    idx_t = torch.tensor(idx, dtype=torch.long)
    x = to_unit(images[idx_t])
    with torch.no_grad():
        rec = model(x.to(dev)).reconstructions.float().cpu()
    titles = [f"{classes[int(labels[i])]}\n-> {classes[int(pred[i])]}" for i in idx]
    _save(plots.reconstructions(x, rec, titles, per_row=n_cls), out / "reconstructions.png")

    # ---- most confident mistakes: wrong predictions with the longest winning capsule
    wrong = (~correct).nonzero().flatten()
    conf = lengths.max(dim=1).values
    wrong = wrong[conf[wrong].argsort(descending=True)][:mistakes]
    mis = wrong.tolist()
    _save(plots.mistakes(to_unit(images[wrong]), lengths[wrong],
                         labels[wrong].tolist(), pred[wrong].tolist(), classes),
          out / "mistakes.png")

    # ---- Figure 4 and the GIF
    offsets = perturbation_offsets()
    picks = _pick_distinct(labels, pred, min(samples, n))
    grids = torch.stack([perturbation_grid(model, to_unit(images[i]), offsets=offsets)
                         for i in picks])
    ptitles = [f"test image {i}: {classes[int(labels[i])]}"
               + ("" if int(pred[i]) == int(labels[i]) else f" (predicted {classes[int(pred[i])]})")
               for i in picks]
    _save(plots.perturbation_panels(grids, ptitles, offsets), out / "perturbation.png",
          dpi="figure")
    g = picks[0]
    gif_dims = save_sweep_gif(model, to_unit(images[g]), out / "sweep.gif",
                              caption=classes[int(pred[g])])

    # ---- the page
    page = _html(run_dir=run_dir, ckpt=ckpt, meta=meta, dataset=dataset, n=n,
                 accuracy=accuracy, losses=losses, rows=rows, classes=classes,
                 per_class=per_class, per_class_n=per_class_n.tolist(), confusion=confusion,
                 mistakes=[(i, int(labels[i]), int(pred[i]), lengths[i].tolist())
                           for i in mis],
                 picks=picks, gif_image=g, gif_dims=gif_dims, offsets=offsets,
                 version=__version__, dims=c.class_dim)
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index




def _html(*, run_dir, ckpt, meta, dataset, n, accuracy, losses, rows, classes, per_class,
          per_class_n, confusion, mistakes, picks, gif_image, gif_dims, offsets, version,
          dims) -> str:
    e = html.escape
    last = rows[-1] if rows else {}
    summary = [
        ("run directory", e(str(run_dir))),
        ("model", e(Path(str(ckpt)).name) + _after(meta) + _selection(Path(str(ckpt)).name)),
        ("dataset", f"{e(dataset)}, first {n:,} test images" if n < 10000 else e(dataset)),
        ("test accuracy", f"<span class=big>{_pct(accuracy)}</span>"),
        ("test loss", f"{losses['loss']:.4f} (margin {losses['margin_loss']:.4f}, "
                      f"reconstruction SSE {losses['reconstruction_sse']:.2f} per image)"),
        ("epochs in metrics.csv", str(len(rows))),
    ]
    if "train_acc" in last:
        summary.append(("last epoch's training accuracy", _pct(last["train_acc"])))
    s_rows = "\n".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in summary)

    pc_rows = []
    for i, name in enumerate(classes):
        row = confusion[i].clone()
        row[i] = -1
        other = int(row.argmax())
        mixed = (f"{e(classes[other])} ({int(confusion[i, other])})"
                 if int(confusion[i, other]) > 0 else "&ndash;")
        pc_rows.append(f"<tr><td>{e(name)}</td><td class=num>{per_class_n[i]}</td>"
                       f"<td class=num>{int(confusion[i, i])}</td>"
                       f"<td class=num>{_pct(per_class[name])}</td><td>{mixed}</td></tr>")

    mk_rows = []
    for i, t, p, lens in mistakes:
        mk_rows.append(f"<tr><td class=num>{i}</td><td>{e(classes[t])}</td>"
                       f"<td>{e(classes[p])}</td><td class=num>{lens[p]:.3f}</td>"
                       f"<td class=num>{lens[t]:.3f}</td></tr>")
    mk_table = ("<table><tr><th>test image</th><th>true class</th><th>predicted</th>"
                "<th>|v| predicted</th><th>|v| true</th></tr>" + "".join(mk_rows) + "</table>"
                if mk_rows else "<p>No mistakes on these test images.</p>")
    lo, hi = float(offsets[0]), float(offsets[-1])
    step = float(offsets[1] - offsets[0]) if len(offsets) > 1 else 0.0
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")

    fields = {"title": e(run_dir.name), "version": e(version), "when": when,
              "summary_rows": s_rows, "class_rows": "".join(pc_rows), "dims": dims,
              "lo": f"{lo:+.2f}", "hi": f"{hi:+.2f}", "step": f"{step:.2f}",
              "gif_image": gif_image, "gif_dims": ", ".join(map(str, gif_dims)),
              "mistakes_table": mk_table, "picks": ", ".join(map(str, picks))}
    return render("template.html", f"CapsNet report: {fields['title']}", **fields)


def render(template: str, page_title: str, **fields) -> str:
    """The page ``template`` (a file beside this module) with ``fields`` filled in, after
    the shared ``head.html`` (doctype, title, style)."""
    here = Path(__file__).parent
    head = Template((here / "head.html").read_text("utf-8")).substitute(page_title=page_title)
    return Template((here / template).read_text("utf-8")).substitute(head=head, **fields)


__all__ = ["perturbation_offsets", "perturbation_grid", "dimension_effect", "sweep_frames",
           "save_sweep_gif", "build_report"]
