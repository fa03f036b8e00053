"""The LightningModule: model, loss, metrics and optimizer of a CapsNet training run."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from .augment import AugmentConfig, augment
from .losses import capsule_loss
from .model import CapsNet, CapsNetConfig


def adam(params, lr: float = 1e-3) -> torch.optim.Adam:
    """Adam with the fused (one kernel for all parameters) implementation where available.

    On CPU the default implementation loops over the parameters in Python; the fused one is
    measurably faster (``scripts/ablation.py``) and computes the same update.
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr)


class LitCapsNet(L.LightningModule):
    """Trains :class:`CapsNet` with Adam and an exponential learning-rate decay per step.

    The learning rate is ``lr * lr_decay ** (step / lr_decay_steps)`` (the authors' schedule:
    1e-3, decayed by 0.96 every 2000 steps). Logged metrics, per split ``train``/``val``/``test``:
    ``{split}/loss``, ``{split}/margin``, ``{split}/recon`` (sum of squared errors per image),
    ``{split}/acc``; and ``lr``.
    """

    def __init__(self, model: dict | None = None, augment: dict | None = None,
                 lr: float = 1e-3, lr_decay: float = 0.96, lr_decay_steps: int = 2000,
                 recon_weight: float = 0.0005, classes: list[str] | None = None,
                 dataset: str = "fashion-mnist", channels_last: bool = True):
        super().__init__()
        self.save_hyperparameters()
        self.model_config = CapsNetConfig.from_dict(model or {})
        self.augment_config = AugmentConfig(**(augment or {}))
        self.model = CapsNet(self.model_config)
        self.channels_last = channels_last
        if channels_last:  # measured faster for the convolutions on CPU (see `capsnet bench`)
            self.model.to(memory_format=torch.channels_last)
        self.split_names: list[str] = ["test"]  # names of the validation dataloaders

    def forward(self, x: Tensor, target: Tensor | None = None):
        return self.model(x, target)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """uint8 images -> floats in [0, 1] (on the device); no augmentation here."""
        images, labels = batch
        return self._layout(images.float().div_(255)), labels

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _step(self, batch, split: str):
        x, y = batch
        # Training feeds the true class to the decoder; evaluation uses the longest capsule.
        out = self.model(x, y if split == "train" else None)
        loss = capsule_loss(out.lengths, y, out.reconstructions, x,
                            self.hparams.recon_weight)
        acc = (out.lengths.argmax(dim=1) == y).float().mean()
        on_step = split == "train"
        kw = dict(on_epoch=True, batch_size=y.shape[0], add_dataloader_idx=False)
        self.log(f"{split}/loss", loss.total, prog_bar=True, on_step=on_step, **kw)
        self.log(f"{split}/acc", acc, prog_bar=True, on_step=on_step, **kw)
        self.log(f"{split}/margin", loss.margin, on_step=on_step, **kw)
        self.log(f"{split}/recon", loss.reconstruction, on_step=on_step, **kw)
        return loss.total, out

    def training_step(self, batch, batch_idx):
        x, y = batch  # only training batches are augmented
        loss, _ = self._step((self._layout(augment(x, self.augment_config)), y), "train")
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=True,
                 batch_size=batch[1].shape[0])
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        _, out = self._step(batch, self.split_names[dataloader_idx])
        return out

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        opt = adam(self.parameters(), lr=self.hparams.lr)
        gamma = self.hparams.lr_decay ** (1.0 / self.hparams.lr_decay_steps)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # Exact resume: the random state (shuffling, augmentation, dropout-free model) travels
    # with the checkpoint, as plain tensors that load without unpickling code.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
