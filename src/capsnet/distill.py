"""Distillation from a trained model (`capsnet train --teacher MODEL`): its capsule lengths as
extra targets.

The teacher scores every training image once, before the first epoch, with the mean capsule
lengths over its test-time views (``--teacher-tta``, :func:`~capsnet.inference.tta_views`,
e.g. the image, its mirror and its four one-pixel shifts). Training then adds
``teacher_weight * sum_k (|v_k| - t_k)^2`` (:func:`~capsnet.losses.distillation_loss`) to the
paper's loss, where ``t`` are the teacher's lengths for the image the augmented batch was
drawn from. Why averaged views: the student sees shifted and mirrored images, and a target
averaged over shifts and mirrors is the same for all of them. The margin loss says nothing
about a wrong class's length below ``m- = 0.1``; the teacher's lengths there (a shirt's
T-shirt capsule longer than its trouser capsule) are what the student can learn beyond the
labels (Hinton, Vinyals & Dean 2015, with lengths in the place of softened softmax outputs).

Several teachers (``--teacher A --teacher B``) give their mean lengths, the scores of
their ensemble (``capsnet evaluate A B``): a student can learn from models of another
architecture, which err on other images than its own.

The targets are kept in ``OUT/teacher.safetensors`` (no pickle), with what they were
computed from (the teacher's weights digest, the views, the training images' labels), so a
resumed run reads them instead of scoring again, and so does a second stage started with
``--init`` from a run that learned from the same teacher: the targets are read from that
run's folder (scoring is the slowest step of a start; its time is in docs/cli.md). The
teacher must have been trained on this run's training split: a teacher that saw this
run's validation images would carry them into the student and make its validation accuracy
optimistic; that is refused in one line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import Tensor

from .data.datasets import ImageDataset, refuse_changed_pool, split_fingerprint
from .errors import CapsnetError

CACHE = "teacher.safetensors"


def _key(digest: str, tta: str, train: ImageDataset) -> dict:
    """What a cached set of targets was computed from."""
    return {"teacher_sha256": digest, "tta": tta, "images": split_fingerprint(train.labels)}


def _read_cache(path: Path, n: int, num_classes: int) -> tuple[dict | None, Tensor | None]:
    """What ``path`` says its targets were computed from (:func:`_key`) and the targets
    ``[N, O]``; ``(None, None)`` when it is missing or damaged, or holds no ``[N, O]``
    finite targets (then they are computed again)."""
    from safetensors import SafetensorError
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            key = json.loads((f.metadata() or {})["capsnet_teacher"])
            lengths = f.get_tensor("lengths")
    except (OSError, SafetensorError, ValueError, KeyError, TypeError):
        return None, None
    if lengths.shape != (n, num_classes) or not bool(torch.isfinite(lengths).all()):
        return None, None
    return key, lengths.float()


def _write_cache(path: Path, key: dict, lengths: Tensor) -> None:
    from safetensors.torch import save

    from .checkpoints import atomic_write
    data = save({"lengths": lengths.contiguous()},
                metadata={"capsnet_teacher": json.dumps(key, sort_keys=True)})
    atomic_write(path, lambda f: f.write(data))


def load_teacher(spec: str, train: ImageDataset, run: dict, pool: str | None,
                 device: torch.device | str):
    """The teacher model ``spec`` (eval mode, on ``device``) and its metadata, checked against
    this run: ``run`` its settings (``dataset``, ``val_size``), ``pool`` the fingerprint of
    the images its validation split was carved from, ``train`` its training images. Refused
    in one line: a teacher that is not a capsule model, of other classes or input size, or
    trained on another split of the data."""
    from .checkpoints import load_model
    from .evaluate import recorded_run, same_classes
    from .inference import check_fits
    from .models import objective
    teacher, meta = load_model(spec, device)
    where = f"--teacher {spec}"
    if objective(teacher) != "margin":
        raise CapsnetError(f"{where}: a capsule model is needed (its capsule lengths are the "
                           f"targets), not {meta['arch']}")
    if meta.get("dataset") != run["dataset"]:
        raise CapsnetError(f"{where}: trained on {meta.get('dataset')}, this run trains on "
                           f"{run['dataset']}")
    teacher_run = recorded_run(spec, meta)
    if run["val_size"] and teacher_run.get("val_size") != run["val_size"]:
        known = teacher_run.get("val_size")
        said = ("is not recorded" if known is None else "was none (it trained on every "
                "training image)" if known == 0 else f"was {known:,} images")
        raise CapsnetError(f"{where}: its validation split {said}, this run's is "
                           f"{run['val_size']:,}; a teacher trained on other images than "
                           "this run's training split would carry validation images into it")
    refuse_changed_pool(meta.get("train_pool"), pool, where,
                        "its validation split is not this run's")
    same_classes(train, meta, where)
    check_fits(teacher, train.shape, len(train.classes))
    return teacher, meta


def teacher_specs(setting: str | list[str]) -> list[str]:
    """The teachers a ``teacher`` setting names: one, or several (an ensemble)."""
    return [setting] if isinstance(setting, str) else list(setting)


def teacher_targets(teachers: list[tuple], spec: str | list[str], train: ImageDataset,
                    tta: str, batch_size: int, out: Path, main: bool = True,
                    resume: bool = False, earlier: Path | None = None) -> Tensor:
    """The teachers' mean capsule lengths ``[N, O]`` (float32, on the CPU) on the ``N``
    training images ``train`` (uint8, as served), over their ``tta`` views and, for several
    teachers, over the teachers (the lengths an ensemble scores by, as in ``capsnet evaluate
    A B``).

    ``teachers``: ``(model, meta)`` pairs as :func:`load_teacher` returned them for the
    teacher setting ``spec`` (:func:`teacher_specs`). Read from
    ``out/teacher.safetensors`` when that holds the same targets; otherwise computed. Only
    the ``main`` process of a data-parallel run writes the file and prints. A ``resume``d
    run whose file was computed from other weights (the file behind ``spec`` replaced
    since), other views or other images is refused in one line: its targets would change
    in the middle of the run. ``earlier``: the folder of the run this one starts from
    (``--init``); its targets are read (and copied to ``out``) when they are the same.
    """
    from .evaluate import recon_weight_of
    from .inference import infer
    from .weights import model_digest
    name = " + ".join(teacher_specs(spec))
    key = _key(" + ".join(model_digest(model) for model, _ in teachers), tta, train)
    cache = out / CACHE
    stored, cached = _read_cache(cache, len(train), len(train.classes))
    if stored == key:
        if main:
            print(f"teacher {name}: targets read from {cache}", flush=True)
        return cached
    if stored is not None and resume:
        what = {"teacher_sha256": "teacher weights", "tta": "views", "images": "training images"}
        changed = " and ".join(what[k] for k in what if stored.get(k) != key[k]) or "settings"
        raise CapsnetError(f"--resume: {cache} was computed from other {changed} than this run "
                           "has now; a resumed run keeps its teacher's targets (start a new "
                           "run for another teacher)")
    if earlier is not None and not resume:
        prior = earlier / CACHE
        stored, cached = _read_cache(prior, len(train), len(train.classes))
        if stored == key:
            if main:
                print(f"teacher {name}: targets read from {prior}", flush=True)
                _write_cache(cache, key, cached)
            return cached
    start = time.perf_counter()
    lengths = torch.stack([infer(model, train.images, train.labels, batch_size,
                                 recon_weight_of(meta), tta).lengths.float().cpu()
                           for model, meta in teachers]).mean(0)
    if main:
        print(f"teacher {name}: targets for {len(train):,} training images ({tta} views) in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        _write_cache(cache, key, lengths)
    return lengths
