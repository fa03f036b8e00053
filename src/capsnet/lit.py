"""The LightningModule: model, loss, metrics and optimizer of a training run."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from .data.augment import AugmentConfig, augment
from .data.batches import to_unit
from .losses import capsule_loss
from .models import build_model
from .paper import RECON_WEIGHT
from .optim import adam, ema_update, lr_factor


class LitCapsNet(L.LightningModule):
    """Trains a registered architecture (``arch``, :mod:`capsnet.models`) with Adam, a learning-rate schedule and optional weight averaging.

    ``lr_schedule="exp"``: ``lr * lr_decay ** (step / lr_decay_steps)`` (the authors' schedule:
    1e-3, decayed by 0.96 every 2000 steps). ``"cosine"``: :func:`lr_factor` over the whole run.
    ``ema > 0`` keeps an exponential moving average of the weights (:func:`ema_update`);
    validation, test and the checkpoints' exported model then use the averaged weights.
    Logged metrics, per split ``train``/``val``/``test``: ``{split}/loss``, ``{split}/margin``,
    ``{split}/recon`` (sum of squared errors per image), ``{split}/acc``; and ``lr``.
    """

    def __init__(self, model: dict | None = None, augment: dict | None = None,
                 lr: float = 1e-3, lr_decay: float = 0.96, lr_decay_steps: int = 2000,
                 recon_weight: float = RECON_WEIGHT, classes: list[str] | None = None,
                 dataset: str = "fashion-mnist", channels_last: bool = True,
                 lr_schedule: str = "exp", warmup_steps: int = 0, ema: float = 0.0,
                 arch: str = "capsnet"):
        super().__init__()
        self.save_hyperparameters()
        self.augment_config = AugmentConfig(**(augment or {}))
        self.model = build_model(arch, model)
        self.model_config = self.model.config
        self.channels_last = channels_last
        # Channels-last is faster for the convolutions on CPU (`capsnet bench`); the models
        # build in it, so --no-channels-last converts them back.
        self.model.to(memory_format=torch.channels_last if channels_last
                      else torch.contiguous_format)
        self.ema = (AveragedModel(self.model, multi_avg_fn=ema_update(ema), use_buffers=True)
                    if ema > 0 else None)
        self.split_names: list[str] = ["test"]  # names of the validation dataloaders

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and exported: the average if there is one."""
        return self.ema.module if self.ema is not None else self.model

    def forward(self, x: Tensor, target: Tensor | None = None):
        return self.model(x, target)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """uint8 images -> floats in [0, 1] (on the device); no augmentation here."""
        images, labels = batch
        return self._layout(to_unit(images)), labels

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _step(self, batch, split: str):
        x, y = batch
        # Training feeds the true class to the decoder; evaluation uses the longest capsule.
        model = self.model if split == "train" else self.eval_model
        out = model(x, y if split == "train" else None)
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

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        _, out = self._step(batch, self.split_names[dataloader_idx])
        return out

    def configure_optimizers(self):
        hp = self.hparams
        opt = adam(self.model.parameters(), lr=hp.lr)
        if hp.lr_schedule == "cosine":
            total = int(self.trainer.estimated_stepping_batches)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: lr_factor(step, total, hp.warmup_steps))
        else:
            gamma = hp.lr_decay ** (1.0 / hp.lr_decay_steps)
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
