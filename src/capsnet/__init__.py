"""capsnet: the CapsNet of "Dynamic Routing Between Capsules" (Sabour, Frosst & Hinton, 2017)."""

from .layers import Decoder, PrimaryCapsules, RoutingCapsules, squash
from .losses import capsule_loss, margin_loss, reconstruction_loss
from .model import CapsNet, CapsNetConfig, CapsNetOutput

__version__ = "0.1.0"

__all__ = [
    "CapsNet", "CapsNetConfig", "CapsNetOutput", "Decoder", "PrimaryCapsules",
    "RoutingCapsules", "capsule_loss", "margin_loss", "reconstruction_loss", "squash",
]
