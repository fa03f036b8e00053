"""The convolutional baselines the paper compares CapsNet with ("Dynamic Routing Between
Capsules", Sabour, Frosst & Hinton 2017), every size inferred from the input shape.

``baseline-cnn`` (:class:`BaselineCNN`), the paper's MNIST/affNIST baseline, section 5: "three
convolutional layers with 256, 256, 128 channels. Each has 5x5 kernels and stride of 1. The
last convolutional layers are followed by two fully connected layers of size 328, 192. The
last fully connected layer is connected with dropout to a 10 class softmax layer with cross
entropy loss." The text names no pooling, and none is what its parameter count says: with
"same" padding and no pooling the network has 35,445,522 parameters at 28x28, the paper's
"35.4M"; any 2x2 pooling would shrink the first fully connected layer several times. So:
three 5x5 convolutions (padding 2) with ReLU, flatten, FC 328 + ReLU, FC 192 + ReLU, dropout,
FC classes, softmax. The dropout rate is not given; 0.5 is used.

``baseline-cnn-multi`` (:class:`BaselineCNNMulti`), the MultiMNIST baseline. The paper's own
description of it could not be read here (see docs/robustness.md); what is built is the
baseline as the project's brief summarises the paper (a 9x9 convolution of 512 channels, a 5x5
one of 256, each with ReLU and 2x2 max pooling ("same"), FC 1024 + ReLU, FC classes). On 36x36
inputs it has 24,563,978 parameters, the paper's "24.56M" for its MultiMNIST baseline to
every digit given (with a 5x5 first convolution, as capsnet had it until this was found, it
has 24,535,306). It scores the classes with one sigmoid each (binary cross-entropy summed over
the classes), so two present garments are two independent yes/no answers, and a pair is
scored like CapsNet's: its two highest scores must be its two classes.

Neither is a capsule model: ``objective`` says how they are trained (``"cross_entropy"``,
``"sigmoid"``; every capsule model says ``"margin"``), and ``forward`` returns a
:class:`~capsnet.models.base.CapsuleOutput` with the class probabilities as ``lengths``, the
``logits``, and no poses and no reconstructions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import CapsuleOutput, ConfigBase

KERNEL = 5


def feature_side(image_size: int, convs: int, pool: bool) -> int:
    """Side of the last convolution's output: "same" convolutions keep it, each 2x2 max
    pooling ("same", as TensorFlow's) halves it, rounding up."""
    side = image_size
    for _ in range(convs if pool else 0):
        side = -(-side // 2)
    return side


@dataclass(frozen=True)
class BaselineCNNConfig(ConfigBase):
    """Every size of :class:`BaselineCNN`; the defaults are the paper's MNIST baseline.

    ``pool``: 2x2 max pooling after every convolution (the paper's text has none).
    ``first_kernel``: side of the first convolution's kernel (the others are 5x5).
    ``dropout``: rate of the dropout before the output layer (0: none).
    """

    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    conv_channels: tuple[int, ...] = (256, 256, 128)
    pool: bool = False
    first_kernel: int = KERNEL
    hidden: tuple[int, ...] = (328, 192)
    dropout: float = 0.5
    multi_label: bool = False  # refused by `capsnet train` for the softmax baseline

    @property
    def features(self) -> int:
        """Inputs of the first fully connected layer: ``side^2 * last conv channels``."""
        side = feature_side(self.image_size, len(self.conv_channels), self.pool)
        return side * side * self.conv_channels[-1]


@dataclass(frozen=True)
class BaselineCNNMultiConfig(BaselineCNNConfig):
    """:class:`BaselineCNNMulti`'s sizes: the authors' released baseline (see the module
    docstring), 36x36 MultiMNIST-style inputs by default."""

    image_size: int = 36
    conv_channels: tuple[int, ...] = (512, 256)
    pool: bool = True
    first_kernel: int = 9
    hidden: tuple[int, ...] = (1024,)
    dropout: float = 0.0


class BaselineCNN(nn.Module):
    """Convolutions (``first_kernel``, then 5x5; stride 1, "same", ReLU[, 2x2 max pooling])
    -> fully connected layers (ReLU) -> dropout -> one output per class.

    ``forward(x, target=None)``: ``x`` ``[B, C, H, W]`` in [0, 1] -> :class:`CapsuleOutput`
    with ``lengths`` ``[B, O]`` the class probabilities (softmax here; one sigmoid per class
    in :class:`BaselineCNNMulti`), ``logits`` ``[B, O]``, ``selected`` ``[B]`` the most
    probable class, ``poses`` and ``reconstructions`` None. ``target`` is accepted for the
    common interface and ignored (nothing is decoded).
    """

    objective = "cross_entropy"
    config_class = BaselineCNNConfig

    def __init__(self, config: BaselineCNNConfig | None = None, **overrides):
        super().__init__()
        config = config or self.config_class()
        if overrides:
            config = self.config_class.from_dict({**config.to_dict(), **overrides})
        if not config.conv_channels or config.features < 1:
            raise ValueError(f"images of {config.image_size}x{config.image_size} are too small "
                             "for the convolutions")
        if not 0 <= config.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {config.dropout}")
        self.config = c = config
        layers, channels = [], c.in_channels
        if c.first_kernel < 1 or c.first_kernel % 2 == 0:
            raise ValueError(f"first_kernel must be odd and positive, got {c.first_kernel}")
        for i, width in enumerate(c.conv_channels):
            k = c.first_kernel if i == 0 else KERNEL
            layers += [nn.Conv2d(channels, width, k, padding=k // 2), nn.ReLU(inplace=True)]
            if c.pool:
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            channels = width
        self.convs = nn.Sequential(*layers)
        fcs, width = [], c.features
        for size in c.hidden:
            fcs += [nn.Linear(width, size), nn.ReLU(inplace=True)]
            width = size
        if c.dropout > 0:
            fcs.append(nn.Dropout(c.dropout))
        fcs.append(nn.Linear(width, c.num_classes))
        self.classifier = nn.Sequential(*fcs)
        self.to(memory_format=torch.channels_last)  # faster convolutions on CPU, as CapsNet

    def logits(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, O]`` class logits."""
        # flatten in NCHW order, whatever the activations' memory layout
        return self.classifier(self.convs(x).contiguous().flatten(1))

    def scores(self, logits: Tensor) -> Tensor:
        """Class probabilities from logits: ``[B, O]`` -> ``[B, O]`` (softmax)."""
        return torch.softmax(logits, dim=1)

    def forward(self, x: Tensor, target: Tensor | None = None) -> CapsuleOutput:
        logits = self.logits(x)
        probs = self.scores(logits)
        return CapsuleOutput(probs, None, None, probs.argmax(dim=1), logits)

    def num_parameters(self, decoder: bool = True) -> int:
        """Trainable parameters (there is no decoder; ``decoder`` is accepted and ignored)."""
        return sum(p.numel() for p in self.parameters())


class BaselineCNNMulti(BaselineCNN):
    """:class:`BaselineCNN` with the authors' MultiMNIST sizes and one sigmoid per class
    (``lengths`` are independent probabilities, trained with binary cross-entropy)."""

    objective = "sigmoid"
    config_class = BaselineCNNMultiConfig

    def scores(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)
