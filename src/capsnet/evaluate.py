"""Evaluation of a trained model on a test set, and prediction on image files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, ImageStat, UnidentifiedImageError
from torch import nn

from .data.datasets import ImageDataset
from .errors import CapsnetError
from .inference import check_fits, infer, paired_comparison, summarize, summarize_multilabel
from .paper import RECON_WEIGHT
from .settings import FITS

IMAGE_FITS = tuple(f for f in FITS if f != "auto")  # load_image's; "auto" is model_input's


def recon_weight_of(meta: dict) -> float:
    """The reconstruction weight a model was trained with (its losses are reported with
    it), from the metadata of its checkpoint or weights file; the paper's when unrecorded.
    A recorded 0 (trained without the decoder's loss) stays 0."""
    weight = meta.get("recon_weight")
    return RECON_WEIGHT if weight is None else float(weight)


def evaluate(model: nn.Module, data: ImageDataset, batch_size: int = 512,
             device: str | torch.device = "cpu", recon_weight: float = RECON_WEIGHT,
             tta: str = "none", keep_lengths: bool = False) -> dict:
    """Accuracy, losses, per-class accuracy and confusion matrix of ``model`` on ``data``.

    ``confusion[t][p]`` counts images of true class ``t`` predicted as ``p``. Multi-label
    data (k-hot labels ``[N, K]``) get :func:`~capsnet.inference.summarize_multilabel`
    instead (per-label precision/recall/F1, F2, mAP); a packed pair set (MultiFashion,
    labels ``[N, 2]`` int64) :func:`~capsnet.pairs.evaluate_pairs` (the pair accuracy: the
    two highest scores are the pair's two classes). ``objective`` says how the model was
    trained (``"margin"`` for capsule models; the CNN baselines' ``margin_loss`` is their
    classification loss and their ``reconstruction_sse`` 0). ``tta``: score each image by the
    mean capsule lengths of its views (:func:`~capsnet.inference.tta_views`: mirror image,
    one-pixel shifts, grids of shifts; not for pairs). ``keep_lengths``: the result also
    holds ``lengths``, the scores ``[N, O]`` (for :func:`write_predictions`).
    """
    from .data.multi import is_pair_set
    from .models import objective as objective_of
    objective = objective_of(model)
    if is_pair_set(data):
        if tta != "none":
            raise CapsnetError(f"--tta {tta} is not offered for pairs")
        from .pairs import evaluate_pairs
        return {**evaluate_pairs(model, data, batch_size, device, recon_weight),
                "objective": objective}
    check_fits(model, data.shape, len(data.classes))
    model = model.to(device)
    run = infer(model, data.images, data.labels, batch_size, recon_weight, tta)
    scores = summarize_multilabel if data.labels.dim() == 2 else summarize
    return {**scores(run.lengths, data.labels, list(data.classes)),
            "loss": run.loss, "margin_loss": run.margin_loss,
            "reconstruction_sse": run.reconstruction_sse, "objective": objective,
            **({"lengths": run.lengths} if keep_lengths else {})}


def evaluate_ensemble(models: list[nn.Module], data: ImageDataset, batch_size: int = 512,
                      device: str | torch.device = "cpu",
                      recon_weights: list[float] | None = None, tta: str = "none",
                      keep_lengths: bool = False) -> dict:
    """:func:`evaluate` for an ensemble: each image is scored by the mean of the members'
    capsule lengths ``[N, O]`` (the paper's CIFAR-10 result is an ensemble of 7 models).

    ``recon_weights``: each member's own (default the paper's); ``loss``,
    ``margin_loss`` and ``reconstruction_sse`` are the members' means, ``member_accuracy``
    each member's own accuracy, ``member_against_first`` each further member's
    :func:`~capsnet.inference.paired_comparison` with the first. Single-label
    classification only (not pairs, not multi-label); the members must be of one kind
    (capsule models or CNN baselines). ``keep_lengths``: as for :func:`evaluate`, the
    ensemble's mean scores.
    """
    from .data.multi import is_pair_set
    if is_pair_set(data) or data.labels.dim() == 2:
        raise CapsnetError("an ensemble is evaluated on single-label classification only, "
                           "not on pairs or multi-label data")
    kind = ensemble_kind(models)
    recon_weights = recon_weights or [RECON_WEIGHT] * len(models)
    classes = list(data.classes)
    runs = []
    for model, weight in zip(models, recon_weights):
        check_fits(model, data.shape, len(classes))
        runs.append(infer(model.to(device), data.images, data.labels, batch_size, weight,
                          tta))
    lengths = torch.stack([r.lengths for r in runs]).mean(0)  # [N, O]

    def mean(key: str) -> float:
        return sum(getattr(r, key) for r in runs) / len(runs)

    right = [r.lengths.argmax(1) == data.labels for r in runs]  # [N] per member
    return {**summarize(lengths, data.labels, classes),
            "loss": mean("loss"), "margin_loss": mean("margin_loss"),
            "reconstruction_sse": mean("reconstruction_sse"), "objective": kind,
            "member_accuracy": [float(r.float().mean()) for r in right],
            "member_against_first": [paired_comparison(r, right[0]) for r in right[1:]],
            **({"lengths": lengths} if keep_lengths else {})}


def ensemble_kind(models: list[nn.Module]) -> str:
    """The members' common objective (:func:`~capsnet.models.objective`); one-line error if
    they mix capsule models and CNN baselines, whose scores cannot be averaged."""
    from .models import objective
    kinds = {objective(m) for m in models}
    if len(kinds) > 1:
        raise CapsnetError("an ensemble's members must all be capsule models or all CNN "
                           f"baselines, not a mix ({', '.join(sorted(kinds))})")
    return kinds.pop()


def check_ensemble(specs: list, loaded: list[tuple[nn.Module, dict]]) -> None:
    """One-line error unless the models ``loaded`` (``(model, meta)`` as
    :func:`~capsnet.checkpoints.load_model` returns them, for ``specs``) can be averaged as
    an ensemble (``capsnet evaluate A B``, ``capsnet predict -m A -m B``): the same classes in
    the same order, and one kind (:func:`ensemble_kind`)."""
    meta = loaded[0][1]
    for spec, (_, other_meta) in zip(specs[1:], loaded[1:]):
        if list(other_meta["classes"]) != list(meta["classes"]):
            raise CapsnetError(f"{spec}: its classes are not those of {specs[0]}; an "
                               "ensemble averages the scores of one set of classes")
    ensemble_kind([m for m, _ in loaded])


PREDICTIONS_HEADER = "index,label,predicted,correct"  # then one column per class


def write_predictions(path: str | Path, lengths: torch.Tensor, labels: torch.Tensor,
                      classes: list[str]) -> None:
    """``capsnet evaluate --predictions``: one CSV row per image, in the evaluated order
    (the test set's own; for ``--split val`` the validation split's), with its true and
    predicted class, whether they agree, and every class's score (capsule length; class
    probability for the CNN baselines). ``lengths`` ``[N, O]``, ``labels`` ``[N]``.

    Two such files of the same images compare two models image by image
    (:func:`read_correct` and :func:`~capsnet.inference.paired_comparison`), whatever their
    kinds. Written to a temporary file and renamed, so an interrupted write leaves no half
    file (nor loses an earlier one)."""
    import csv
    import io

    from .checkpoints import atomic_write
    pred = lengths.argmax(dim=1)
    text = io.StringIO()
    out = csv.writer(text, lineterminator="\n")
    out.writerow([*PREDICTIONS_HEADER.split(","), *classes])
    for i, (t, p, row) in enumerate(zip(labels.tolist(), pred.tolist(), lengths.tolist())):
        out.writerow([i, classes[t], classes[p], int(t == p), *(f"{v:.6f}" for v in row)])
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def is_predictions_file(path: Path) -> bool:
    """Whether ``path`` starts as a :func:`write_predictions` file does (one may replace it)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().startswith(PREDICTIONS_HEADER)
    except OSError:
        return False


def read_correct(path: str | Path) -> torch.Tensor:
    """The ``correct`` column ``[N]`` (bool) of a :func:`write_predictions` file; a file
    without it is a one-line :class:`CapsnetError`."""
    import csv
    try:
        with open(path, newline="") as f:
            return torch.tensor([row["correct"] == "1" for row in csv.DictReader(f)])
    except (OSError, KeyError, csv.Error) as e:
        raise CapsnetError(f"{path}: not a predictions file of capsnet evaluate ({e})") from None


def evaluation_data(model_path: str | Path, model: nn.Module, meta: dict, split: str = "test",
                    dataset: str | None = None, data_dir: str | None = None) -> ImageDataset:
    """The images to evaluate a model on, read with the data options it was trained with.

    ``model``/``meta`` as :func:`~capsnet.checkpoints.load_model` returned them for
    ``model_path``. ``split="test"``: the test set of ``dataset`` (default: the model's own).
    ``split="val"``: the validation images of the run ``model_path`` belongs to, carved again
    as training carved them: the dataset and ``val_size`` a weights file recorded (``meta``),
    else those of the run's ``config.yaml`` beside the file (a file copied into another run's
    folder keeps its own split); the split's seed is fixed
    (:class:`~capsnet.data.datamodule.ImageDataModule`), and a run that recorded the images
    it was carved from (``train_pool``) refuses others.
    ``data_dir``: ``--data-dir``, else the run's own (:func:`~capsnet.settings.run_data_dir`).
    """
    from .data.registry import load_test_split, recorded_options
    from .settings import run_data_dir
    run = recorded_run(model_path, meta)
    dataset = dataset or meta["dataset"]
    data_dir = run_data_dir(data_dir, run)
    options = recorded_options(dataset, meta.get("data_options"), run,
                               image_size=model.config.image_size)
    if split == "test":
        test = load_test_split(dataset, data_dir, channels=model.config.in_channels, **options)
        return same_classes(test, meta, model_path)
    if not run:
        raise CapsnetError(f"{model_path}: the validation split needs a checkpoint or weights "
                           "file with its run's config.yaml beside it, or a weights file that "
                           "records its run's split (the split is the run's own)")
    if not run.get("val_size"):
        raise CapsnetError(f"{model_path}: its run had no validation split (--val-size 0)")
    if dataset != run.get("dataset"):
        raise CapsnetError(f"the validation split is the run's split of {run.get('dataset')}, "
                           f"not of {dataset}; leave --dataset out")
    from .data.datamodule import ImageDataModule
    dm = ImageDataModule(dataset, data_dir, val_size=run["val_size"], options=options,
                         val_size_origin=f"{model_path}: its run's val_size")
    dm.setup("fit")
    from .data.datasets import refuse_changed_pool
    refuse_changed_pool(meta.get("train_pool"), dm.pool, model_path, "its validation split "
                        "cannot be carved again (other images, some of them trained on)")
    return same_classes(dm.val, meta, model_path)


def recorded_run(model_path: str | Path, meta: dict) -> dict:
    """The settings of the run a model was trained in, as far as they are known: those of
    the ``config.yaml`` beside ``model_path``, or, for a weights file that recorded its
    run's split (``meta``), its ``dataset`` and ``val_size`` (another run's folder then lends
    it no settings either, unless that run's dataset is the file's); ``{}`` if unknown."""
    from .settings import settings_beside
    from .shipped import resolve
    run = settings_beside(model_path)
    if resolve(model_path).suffix == ".safetensors" and meta.get("val_size") is not None:
        if run.get("dataset") != meta["dataset"]:
            run = {}
        run = {**run, "dataset": meta["dataset"], "val_size": meta["val_size"]}
    return run


def same_classes(data: ImageDataset, meta: dict, model_path: str | Path) -> ImageDataset:
    """``data``, after checking that its class names are the model's, in the same order:
    a folder of images with one class renamed or another set of classes would otherwise be
    scored against the wrong names. (Different counts are refused where the data meet the
    model, :func:`~capsnet.inference.check_fits`.)"""
    recorded = list(meta.get("classes") or [])
    unnamed = all(isinstance(c, int) for c in recorded)  # the loaders' 0..n-1: no names kept
    mine, theirs = [str(c) for c in recorded], [str(c) for c in data.classes or []]
    if mine and theirs and len(mine) == len(theirs) and mine != theirs and not unnamed:
        k = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
        raise CapsnetError(f"{model_path}: its class {k} is {mine[k]!r}, the data's is "
                           f"{theirs[k]!r}; the model was trained on other classes")
    return data


def load_image(path: str | Path, channels: int, size: int, invert: str = "auto",
               fit: str = "pad", served: int | None = None) -> torch.Tensor:
    """An image file as a model input ``[C, size, size]`` in [0, 1].

    Any file gives this or a one-line CapsnetError naming the file and the problem: missing,
    empty, a folder, not an image, truncated, or over Pillow's decompression-bomb limit
    (2 x ``Image.MAX_IMAGE_PIXELS``, about 179 megapixels), refused from its header before
    decoding. Pillow's warning between 1x and 2x that limit is silenced: it is the user's file.

    The first frame of an animation is used, turned upright as its EXIF orientation says, and
    converted to grey (1 channel) or RGB (3), or grey for both cameras of a stereo model
    (smallNORB's 2 channels); 16-bit values are scaled to 8 bits (/257).
    Fashion-MNIST shows light objects on black: ``invert="auto"`` inverts images whose border
    is mostly light (a photo on a white background), ``"yes"``/``"no"`` force it. Transparent
    areas become the background that ends up black: black for ``"no"``, white for ``"yes"``,
    and for ``"auto"`` black behind a light object, white behind a dark one (then inverted).
    A non-square image is, with ``fit="pad"`` (the default), centred on a square of its
    border's mean colour, so the object keeps its proportions as Fashion-MNIST's centred
    garments do; ``fit="stretch"`` stretches it to the square instead, ``fit="crop"``
    takes its centre square. ``served``: resize to ``served x served`` and take the centre
    ``size x size`` (smallNORB: the model sees the centre 32x32 of pairs served at 48x48).
    A large one is first reduced cheaply (a JPEG decoded at 1/2 to 1/8 scale, then by whole
    factors before the Lanczos filter), so a 5000x3000 photo is fast.
    """
    if fit not in IMAGE_FITS:
        raise ValueError(f"fit must be one of {IMAGE_FITS}, not {fit!r}")
    if served is not None and served < size:
        raise ValueError(f"served ({served}) must be at least size ({size})")
    side = served or size
    if channels not in (1, 2, 3):
        raise CapsnetError(f"a model with {channels} input channels takes no image files")
    mode = "RGB" if channels == 3 else "L"  # 2: smallNORB's stereo pair, one picture for both
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:  # decoding happens in here, where a truncated file raises
            img.draft(mode, (side, side))
            img = _flatten(ImageOps.exif_transpose(img), mode, invert)
            if fit == "pad":
                img = _pad_to_square(img)
            elif fit == "crop":
                img = _centre_square(img)
            img = img.resize((side, side), Image.Resampling.LANCZOS, reducing_gap=3.0)
            img = _centre_square(img, size)
            x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    except FileNotFoundError:
        raise CapsnetError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CapsnetError(f"{path}: is a folder, not an image file") from None
    except Image.DecompressionBombError as e:  # "Image size (N pixels) exceeds limit of M pixels"
        raise CapsnetError(f"{path}: image too large to open safely "
                           f"({str(e).split(', could')[0]})") from None
    except UnidentifiedImageError:
        what = "empty file (0 bytes)" if Path(path).stat().st_size == 0 else \
            "not an image, or in a format Pillow cannot read"
        raise CapsnetError(f"{path}: {what}") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds on a malformed file
        why = getattr(e, "strerror", None) or str(e).strip() or type(e).__name__
        raise CapsnetError(f"{path}: cannot read the image ({why.splitlines()[0]})") from None
    x = x.view(size, size, len(mode)).permute(2, 0, 1).float() / 255
    x = x.expand(channels, -1, -1).contiguous()  # grey to both of a stereo pair's cameras
    if invert == "auto":
        border = torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], dim=1)
        invert = "yes" if border.mean() > 0.5 else "no"
    return 1 - x if invert == "yes" else x


def _centre_square(img: Image.Image, side: int | None = None) -> Image.Image:
    """The centre ``side x side`` of ``img`` (default: the largest square)."""
    w, h = img.size
    side = side or min(w, h)
    if (w, h) == (side, side):
        return img
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def model_input(path: str | Path, config, dataset: str, invert: str = "auto",
                fit: str = "auto") -> torch.Tensor:
    """An image file as the input ``[C, H, W]`` in [0, 1] of a model (``config``: its
    :class:`~capsnet.models.base.ModelConfig`) trained on ``dataset``.

    ``invert="auto"``: only for a model of light-on-dark data (Fashion-MNIST, MNIST and the
    sets made from them) is a light-bordered picture inverted (:func:`load_image`); photos
    stay as they are for every other model. ``fit="auto"`` prepares the picture as that
    dataset's images were: for the folder datasets exactly as their reader did in training
    (:func:`capsnet.data.folder.load_image`: the centre square, bilinear; then grey or colour
    as the model takes); for smallNORB the centre of the picture resized to the served side
    (:func:`load_image`'s ``served``); else :func:`load_image` with ``fit="pad"``. Other
    values of ``fit`` go to :func:`load_image`.
    """
    from .data.registry import DATASETS
    channels, size = config.in_channels, config.image_size
    spec = DATASETS.get(dataset)
    # only light-on-dark data invert a light-bordered picture (an unknown dataset, named by
    # an old file, counts as Fashion-MNIST)
    if invert == "auto" and spec is not None and not spec.light_on_dark:
        invert = "no"
    if fit != "auto" or spec is None:
        return load_image(path, channels, size, invert, "pad" if fit == "auto" else fit)
    if spec.name in ("folder", "multilabel"):
        return _as_folder_image(path, channels, size, invert)
    return load_image(path, channels, size, invert, "pad", spec.served)


def _as_folder_image(path: str | Path, channels: int, size: int, invert: str) -> torch.Tensor:
    """What :func:`capsnet.data.folder.load_images` makes of one file, for a model of
    ``channels`` (1 or 3), in [0, 1]; ``invert="yes"`` inverts it."""
    from .data import folder
    if channels not in (1, 3):
        raise CapsnetError(f"a model with {channels} input channels takes no image files")
    if Path(path).is_dir():
        raise CapsnetError(f"{path}: is a folder, not an image file")
    if not Path(path).exists():
        raise CapsnetError(f"{path}: no such file")
    a, grey = folder.load_image(Path(path), size)
    if channels == 1 and not grey:  # a colour picture for a model trained on grey images
        a = np.asarray(Image.fromarray(a).convert("L"))
    x = torch.from_numpy(np.array(a)).float() / 255
    x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
    x = x.expand(channels, -1, -1).contiguous()  # grey to R = G = B, as load_images does
    return 1 - x if invert == "yes" else x


def _pad_to_square(img: Image.Image) -> Image.Image:
    """``img`` centred on a square canvas filled with the mean colour of its border pixels."""
    w, h = img.size
    if w == h:
        return img
    edges = [img.crop(box) for box in ((0, 0, w, 1), (0, h - 1, w, h), (0, 0, 1, h),
                                       (w - 1, 0, w, h))]
    counts = [e.size[0] * e.size[1] for e in edges]
    means = [ImageStat.Stat(e).mean for e in edges]
    colour = tuple(round(sum(m[b] * n for m, n in zip(means, counts)) / sum(counts))
                   for b in range(len(means[0])))
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), colour if len(colour) > 1 else colour[0])
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def _flatten(img: Image.Image, mode: str, invert: str) -> Image.Image:
    """``img`` as 8-bit ``mode`` ("L" or "RGB"), transparency composited (see load_image)."""
    if img.mode.startswith("I"):  # "I;16", "I;16B", "I": 16-bit grey, 0..65535
        img = img.convert("I").point(lambda v: v / 257)
    elif img.has_transparency_data:
        img = img.convert("RGBA")
        alpha = img.getchannel("A")
        if invert == "auto":  # mean grey of the visible part: a light object or a dark one?
            light = alpha.getextrema()[1] == 0 or \
                ImageStat.Stat(img.convert("L"), alpha).mean[0] >= 128
            invert = "no" if light else "yes"
        grey = 255 if invert == "yes" else 0
        img = Image.alpha_composite(Image.new("RGBA", img.size, (grey, grey, grey, 255)), img)
    return img.convert(mode)


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, classes: list[str],
            tta: str = "none") -> list[dict]:
    """Class name, index and capsule lengths for a batch ``[B, C, H, W]`` of inputs; for a
    multi-label model also ``present``: every class whose capsule is longer than 0.5.
    ``tta``: the lengths are :func:`~capsnet.inference.tta_lengths`, as in :func:`evaluate`."""
    return predict_ensemble([(model, images)], classes, tta)


@torch.inference_mode()
def predict_ensemble(members: list[tuple[nn.Module, torch.Tensor]], classes: list[str],
                     tta: str = "none") -> list[dict]:
    """:func:`predict` for an ensemble: ``members`` pairs each model with the batch made for
    it (``[B, C, H, W]``, its own input size), and the lengths are the members' mean. The
    models share ``classes`` (the caller checks); ``present`` comes with the first model's
    being multi-label."""
    from .inference import tta_lengths
    from .models.base import PRESENT
    lengths = sum(tta_lengths(m, x, tta).cpu() for m, x in members) / len(members)  # [B, O]
    multi = getattr(members[0][0].config, "multi_label", False)
    classes = [str(c) for c in classes]  # a file without names: "0", "1", ...
    return [{"class": classes[int(row.argmax())], "index": int(row.argmax()),
             **({"present": [c for c, v in zip(classes, row) if v > PRESENT]} if multi else {}),
             "lengths": [round(float(v), 6) for v in row]} for row in lengths]
