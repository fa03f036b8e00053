"""Evaluation of a trained model on a test set, and prediction on image files."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from .data.datasets import ImageDataset
from .errors import CapsnetError
from .inference import check_fits, infer, summarize
from .paper import RECON_WEIGHT


def evaluate(model: nn.Module, data: ImageDataset, batch_size: int = 512,
             device: str | torch.device = "cpu", recon_weight: float = RECON_WEIGHT) -> dict:
    """Accuracy, losses, per-class accuracy and confusion matrix of ``model`` on ``data``.

    ``confusion[t][p]`` counts images of true class ``t`` predicted as ``p``.
    """
    check_fits(model, data.shape, len(data.classes))
    model = model.to(device)
    run = infer(model, data.images, data.labels, batch_size, recon_weight)
    return {**summarize(run.lengths, data.labels, list(data.classes)),
            "loss": run.loss, "margin_loss": run.margin_loss,
            "reconstruction_sse": run.reconstruction_sse}


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
def predict(model: nn.Module, images: torch.Tensor, classes: list[str]) -> list[dict]:
    """Class name, index and capsule lengths for a batch ``[B, C, H, W]`` of inputs."""
    lengths = model(images).lengths.cpu()
    return [{"class": classes[int(row.argmax())], "index": int(row.argmax()),
             "lengths": [round(float(v), 6) for v in row]} for row in lengths]
