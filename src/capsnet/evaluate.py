"""Evaluation of a trained model on a test set, and prediction on image files."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchmetrics.functional.classification import multiclass_confusion_matrix

from .data import batch_loader
from .datasets import ImageDataset
from .errors import CapsnetError
from .losses import capsule_loss
from .model import CapsNet


@torch.inference_mode()
def evaluate(model: CapsNet, data: ImageDataset, batch_size: int = 512,
             device: str | torch.device = "cpu", recon_weight: float = 0.0005) -> dict:
    """Accuracy, losses, per-class accuracy and confusion matrix of ``model`` on ``data``.

    ``confusion[t][p]`` counts images of true class ``t`` predicted as ``p``.
    """
    c = model.config
    if data.shape != (c.in_channels, c.image_size, c.image_size):
        raise CapsnetError(f"the model expects images of shape "
                           f"{(c.in_channels, c.image_size, c.image_size)}, the data has "
                           f"{data.shape}")
    if len(data.classes) != c.num_classes:
        raise CapsnetError(f"the model has {c.num_classes} classes, the data "
                           f"{len(data.classes)}")
    model = model.to(device).eval()
    preds, totals = [], torch.zeros(3, dtype=torch.float64)
    for images, labels in batch_loader(data.images, data.labels, batch_size, False):
        x, y = images.to(device).float().div_(255), labels.to(device)
        out = model(x)
        loss = capsule_loss(out.lengths, y, out.reconstructions, x, recon_weight)
        totals += torch.tensor([loss.total.item(), loss.margin.item(),
                                loss.reconstruction.item()], dtype=torch.float64) * len(y)
        preds.append(out.lengths.argmax(dim=1).cpu())
    pred = torch.cat(preds)
    n = len(data)
    confusion = multiclass_confusion_matrix(pred, data.labels, c.num_classes)
    per_class_n = confusion.sum(dim=1).clamp(min=1)
    per_class = (confusion.diagonal() / per_class_n).tolist()
    loss, margin, recon = (totals / n).tolist()
    return {
        "accuracy": float((pred == data.labels).float().mean()),
        "n": n,
        "loss": loss, "margin_loss": margin, "reconstruction_sse": recon,
        "per_class": {name: acc for name, acc in zip(data.classes, per_class)},
        "confusion": confusion.tolist(),
        "classes": list(data.classes),
    }


def load_image(path: str | Path, channels: int, size: int, invert: str = "auto") -> torch.Tensor:
    """An image file as a model input ``[C, size, size]`` in [0, 1].

    Converted to grey (1 channel) or RGB (3) and resized to ``size`` x ``size``. Fashion-MNIST
    shows light objects on black; ``invert="auto"`` inverts images whose border is mostly
    light (a photo on a white background), ``"yes"``/``"no"`` force it.
    """
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            img = img.resize((size, size), Image.Resampling.LANCZOS)
            x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    except FileNotFoundError:
        raise CapsnetError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise CapsnetError(f"{path}: not a readable image ({e.__class__.__name__})") from None
    x = x.view(size, size, channels).permute(2, 0, 1).float() / 255
    if invert == "auto":
        border = torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], dim=1)
        invert = "yes" if border.mean() > 0.5 else "no"
    return 1 - x if invert == "yes" else x


@torch.inference_mode()
def predict(model: CapsNet, images: torch.Tensor, classes: list[str]) -> list[dict]:
    """Class name, index and capsule lengths for a batch ``[B, C, H, W]`` of inputs."""
    lengths = model(images).lengths.cpu()
    return [{"class": classes[int(row.argmax())], "index": int(row.argmax()),
             "lengths": [round(float(v), 6) for v in row]} for row in lengths]
