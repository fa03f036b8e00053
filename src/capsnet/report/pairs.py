"""`capsnet report` on overlapping pairs (MultiFashion, :mod:`capsnet.data.multi`): the pair
accuracy, per class, and the paper's Figure 5.

Figure 5 of the paper shows MultiMNIST inputs with each digit reconstructed from its own
capsule in its own colour. Here every pair gets three pictures: the overlaid input, the two
garments decoded from the capsules of the pair's **true** classes (red: the first garment,
green: the second; the paper's "R" row), and decoded from the **two longest** capsules, the
model's answer (the paper's starred failures). Shown: the first correct pairs of the test set
and the first failures, in test-set order (nothing picked by hand).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import html
from pathlib import Path

import torch
from torch import nn

from ..data.batches import to_unit
from ..data.multi import split_packed

PAIR_FILES = ("pairs.png", "pair_failures.png")  # correct pairs, failures


@torch.no_grad()
def decode_pairs(model: nn.Module, packed: torch.Tensor, labels: torch.Tensor):
    """Capsules and reconstructions of packed pairs (``[N, 3C, H, W]`` uint8, ``labels``
    ``[N, 2]``): ``(composites [N, C, H, W], by_truth [N, 3, h, w], by_top2 [N, 3, h, w],
    top2 [N, 2])``, the two-colour pictures of :func:`capsnet.plots.two_colours`."""
    from ..plots import two_colours
    dev = next(model.parameters()).device
    composite, _, _ = split_packed(to_unit(packed.to(dev)))
    labels = labels.to(dev)
    v = model.eval().capsules(composite.contiguous())  # [N, O, D]
    top2 = v.norm(dim=-1).topk(2, dim=1).indices  # [N, 2]
    truth = two_colours(model.decoder(v, labels[:, 0]), model.decoder(v, labels[:, 1]))
    answer = two_colours(model.decoder(v, top2[:, 0]), model.decoder(v, top2[:, 1]))
    return composite.cpu(), truth.cpu(), answer.cpu(), top2.cpu()


def _figure(model, packed, labels, idx, classes, heading, path: Path) -> None:
    from ..plots import pair_reconstructions
    from . import _save
    if len(idx) == 0:
        return
    composites, truth, answer, top2 = decode_pairs(model, packed[idx], labels[idx])
    short = lambda k: classes[int(k)][:11]  # noqa: E731
    titles = [(f"{int(i)}: {short(a)} +\n{short(b)}", f"{short(a)}, {short(b)}",
               f"{short(p)}, {short(q)}")
              for i, (a, b), (p, q) in zip(idx, labels[idx].tolist(), top2.tolist())]
    _save(pair_reconstructions(composites, truth, answer, titles, heading), path)


def build_pair_report(model: nn.Module, meta: dict, *, ckpt, run_dir: Path, dataset: str,
                      test, out: Path, test_size: int | None, batch_size: int, device,
                      recon_weight: float, shown: int = 8, log=print) -> Path:
    """Write ``out/index.html`` with the pair accuracy, per-class shares and Figure 5
    (``pairs.png``: the first ``shown`` correct pairs; ``pair_failures.png``: the first
    ``shown`` failures). ``test``: a packed pair set (:func:`capsnet.data.multi.is_pair_set`).
    """
    from .. import __version__
    from ..data.multi import pair_correct
    from ..pairs import score_pairs, summarize_pairs
    from . import _after, _pct, _selection, clear_report_files, render
    images, labels = test.images, test.labels
    if test_size:
        images, labels = images[:test_size], labels[:test_size]
        test = dataclasses.replace(test, images=images, labels=labels)
    classes = list(test.classes)
    log(f"report: {Path(str(ckpt)).name}{_after(meta)} on {len(labels):,} {dataset} test pairs")
    scores, losses = score_pairs(model, test, batch_size, device, recon_weight)
    result = {**summarize_pairs(scores, labels, classes), **losses}
    correct = pair_correct(scores, labels)
    clear_report_files(out)
    right, wrong = correct.nonzero().flatten()[:shown], (~correct).nonzero().flatten()[:shown]
    _figure(model, images, labels, right, classes,
            "correct pairs: red = first garment, green = second", out / PAIR_FILES[0])
    _figure(model, images, labels, wrong, classes,
            "failures: the two longest capsules are not the pair's classes",
            out / PAIR_FILES[1])
    e = html.escape
    summary = [
        ("run directory", e(str(run_dir))),
        ("model", e(Path(str(ckpt)).name) + _after(meta) + _selection(Path(str(ckpt)).name)),
        ("dataset", f"{e(dataset)}, {result['n']:,} test pairs"),
        ("pair accuracy", f"<span class=big>{_pct(result['accuracy'])}</span> (both classes "
                          "are the two longest capsules)"),
        ("test loss", f"{result['loss']:.4f} per pair (margin {result['margin_loss']:.4f}, "
                      f"reconstruction SSE {result['reconstruction_sse']:.2f}, both garments)"),
    ]
    rows = "\n".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in summary)
    class_rows = "".join(f"<tr><td>{e(name)}</td><td class=num>{result['per_class_n'][name]}"
                         f"</td><td class=num>{_pct(result['per_class'][name])}</td></tr>"
                         for name in classes)
    correct_html = (f"<img src=\"{PAIR_FILES[0]}\" alt=\"correct pairs and each garment's "
                    "reconstruction\">" if len(right) else "<p>No correct pairs among these "
                    "test pairs.</p>")
    failures = (f"<img src=\"{PAIR_FILES[1]}\" alt=\"failed pairs and their reconstructions\">"
                if len(wrong) else "<p>No failures on these test pairs.</p>")
    page = render("template_pairs.html", f"CapsNet report on pairs: {e(run_dir.name)}",
                  title=e(run_dir.name), version=e(__version__),
                  when=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"), summary_rows=rows,
                  class_rows=class_rows, correct=correct_html, failures=failures, shown=shown)
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index

