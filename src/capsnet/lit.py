"""The LightningModule: model, loss, metrics and optimizer of a training run."""

from __future__ import annotations

import contextlib

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from .data.affine import random_placement
from .data.augment import AugmentConfig, augment, process_draws
from .data.batches import to_unit
from .data.multi import make_pairs, split_packed
from .inference import f_beta_per_image
from .losses import distillation_loss, model_loss
from .models.base import PRESENT
from .models import build_model, objective
from .pairs import mean_pair_loss, pair_losses
from .paper import RECON_WEIGHT
from .optim import (adam, ema_update, lr_factor, rng_state, sam_closure, set_rng_state,
                    swa_update, warmup_factor)


class LitCapsNet(L.LightningModule):
    """Trains a registered architecture (``arch``, :mod:`capsnet.models`) with Adam, a
    learning-rate schedule and optional weight averaging (``weight_decay > 0``: AdamW
    instead of Adam, :func:`~capsnet.optim.adam`; ``sam > 0``: sharpness-aware minimization
    with that radius, :func:`~capsnet.optim.sam_closure`).

    ``lr_schedule="exp"``: ``lr * lr_decay ** (step / lr_decay_steps)`` (the authors' schedule:
    1e-3, decayed by 0.96 every 2000 steps). ``"cosine"``: :func:`lr_factor` over the whole run.
    ``"constant"``: ``lr`` after the warm-up. ``ema > 0`` keeps an exponential moving average
    of the weights (:func:`ema_update`); ``swa`` instead their equal-weight mean over every
    step of the run (stochastic weight averaging, Izmailov et al. 2018: meant for a run
    started from trained weights at a constant learning rate). Validation, test and the
    checkpoints' exported model then use the averaged weights (kept as ``self.ema`` either
    way, so the checkpoints' keys are the same).
    Logged metrics, per split ``train``/``val``/``test``: ``{split}/loss``, ``{split}/margin``,
    ``{split}/recon`` (sum of squared errors per image), ``{split}/acc``; and ``lr``. On
    multi-label data ``acc`` is the share of images whose predicted label set is exactly the
    true one, and ``{split}/f2`` the mean F2 per image (the Planet score). ``data_options``
    (image size and test fraction of a dataset read from the user's own images) is recorded
    for evaluation, and ``train_pool``
    (:func:`~capsnet.data.datasets.split_fingerprint`) for the validation split.
    Training batches that carry a teacher's capsule lengths as a third item
    (:mod:`capsnet.distill`) add ``teacher_weight`` times :func:`distillation_loss` to the
    loss (logged as ``train/distill``).

    The CNN baselines (``model.objective`` not ``"margin"``) train on their own loss
    (:func:`capsnet.losses.model_loss`); their ``margin`` metric is that classification
    loss and ``recon`` is 0. On the sets generated from Fashion-MNIST (the dataset's
    ``protocol``, :mod:`capsnet.data.generated`) training batches are 28x28 garments: on
    ``multi`` they become overlaid pairs (:func:`capsnet.data.multi.make_pairs`; losses and
    the pair accuracy of :mod:`capsnet.pairs`; evaluation batches are packed fixed pairs),
    on ``expanded`` they are placed at random on the 40x40 canvas; the augmentation
    settings do not apply there (``capsnet train`` refuses them).
    """

    def __init__(self, model: dict | None = None, augment: dict | None = None,
                 lr: float = 1e-3, lr_decay: float = 0.96, lr_decay_steps: int = 2000,
                 recon_weight: float = RECON_WEIGHT, classes: list[str] | None = None,
                 dataset: str = "fashion-mnist", channels_last: bool = True,
                 lr_schedule: str = "exp", warmup_steps: int = 0, ema: float = 0.0,
                 arch: str = "capsnet", data_options: dict | None = None, swa: bool = False,
                 train_pool: str | None = None, teacher_weight: float = 0.0,
                 weight_decay: float = 0.0, sam: float = 0.0):
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
        self.ema = (AveragedModel(self.model, use_buffers=True,
                                  multi_avg_fn=ema_update(ema) if ema > 0 else swa_update())
                    if ema > 0 or swa else None)
        if self.ema is not None:  # updated by averaging, never by gradients (DDP checks)
            self.ema.requires_grad_(False)
        self.split_names: list[str] = ["test"]  # names of the validation dataloaders
        from .data.registry import DATASETS
        spec = DATASETS.get(dataset)
        self.protocol = spec.protocol if spec is not None else None
        self.objective = objective(self.model)
        self._sam_second_pass = False  # True while SAM takes its second gradient

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and exported: the average if there is one."""
        return self.ema.module if self.ema is not None else self.model

    def forward(self, x: Tensor, target: Tensor | None = None):
        return self.model(x, target)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """uint8 images -> floats in [0, 1] (on the device); no augmentation here."""
        images, labels, *targets = batch  # targets: a teacher's lengths, training only
        return (self._layout(to_unit(images)), labels, *targets)

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @property
    def multi_label(self) -> bool:
        return bool(getattr(self.model.config, "multi_label", False))

    def _losses(self, model: nn.Module, x: Tensor, y: Tensor, train: bool):
        """The losses and per-image scores: ``correct`` ``[B]`` (the longest capsule is the
        class; multi-label: the set of capsules longer than 0.5 is exactly the true set)
        and ``f2`` ``[B]`` (multi-label only, else None)."""
        # Training feeds the true class(es) to the decoder; evaluation the longest capsule
        # (multi-label: every capsule taken as present).
        out = model(x, y if train else None)
        loss = model_loss(self.objective, out, y, x, self.hparams.recon_weight)
        if self.multi_label:
            pred = out.lengths > PRESENT
            correct = (pred == y.bool()).all(dim=1).float()
            f2 = f_beta_per_image(pred, y).float()
        else:
            correct, f2 = (out.lengths.argmax(dim=1) == y).float(), None
        return out, loss, correct, f2

    def _pair_losses(self, model: nn.Module, composite: Tensor, first: Tensor, second: Tensor,
                     y: Tensor):
        """:func:`capsnet.pairs.pair_losses` with this run's layout and weight."""
        return pair_losses(model, self._layout(composite.contiguous()), first, second, y,
                           self.hparams.recon_weight)

    def training_step(self, batch, batch_idx):
        x, y, *teacher = batch  # only training batches are augmented
        distill = None
        # Only the augmentation draws at random here; under DDP each process its own.
        with process_draws(self.global_rank, self.trainer.world_size, x.device):
            if self.protocol == "multi":  # garments -> overlaid pairs, made here per batch
                pairs = make_pairs(x, y)
                res = self._pair_losses(self.model, pairs.composite, pairs.first,
                                        pairs.second, pairs.labels)
                loss, acc = mean_pair_loss(res, pairs.valid)
                correct, f2, n = acc.view(1), None, int(pairs.valid.sum())
            else:
                x = self._layout(random_placement(x) if self.protocol == "expanded"
                                 else augment(x, self.augment_config))
                out, loss, correct, f2 = self._losses(self.model, x, y, train=True)
                n = y.shape[0]
                if teacher:  # the lengths of the image each augmented one was drawn from
                    distill = distillation_loss(out.lengths, teacher[0]).mean()
                    loss = loss._replace(total=loss.total + self.hparams.teacher_weight
                                         * distill)
        if self._sam_second_pass:  # SAM's gradient at the moved weights: logged once, above
            return loss.total
        # Averaged over the data-parallel processes (a no-op in one process).
        kw = dict(on_step=True, on_epoch=True, batch_size=max(1, n),
                  sync_dist=self.trainer.world_size > 1)
        self.log("train/loss", loss.total, prog_bar=True, **kw)
        self.log("train/acc", correct.mean(), prog_bar=True, **kw)
        self.log("train/margin", loss.margin, **kw)
        self.log("train/recon", loss.reconstruction, **kw)
        if f2 is not None:
            self.log("train/f2", f2.mean(), **kw)
        if distill is not None:
            self.log("train/distill", distill, **kw)
        self.log("lr", self.optimizers().param_groups[0]["lr"], **kw)
        return loss.total

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        if self.hparams.sam > 0 and optimizer_closure is not None:
            optimizer_closure = sam_closure(optimizer_closure, list(self.model.parameters()),
                                            self.hparams.sam, self._second_pass)
        # The average follows every optimizer step here, not in on_train_batch_end: Lightning
        # runs the callbacks' on_train_batch_end first, so a callback saving the evaluated
        # weights there (callbacks.SaveWeightsEvery) would see the average one update behind.
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    @contextlib.contextmanager
    def _second_pass(self):
        self._sam_second_pass = True
        try:
            yield
        finally:
            self._sam_second_pass = False

    # Evaluation metrics are exact sums over each split, added up across the data-parallel
    # processes (each evaluates its own share of the images, see data.batches.ShardedBatches)
    # before they are divided: every image counts once, whatever the number of processes.
    @property
    def eval_sums(self) -> tuple[str, ...]:
        return ("loss", "margin", "recon", "acc") + (("f2",) if self.multi_label else ())

    def on_validation_epoch_start(self) -> None:
        self._sums = {}

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x, y = batch
        if self.protocol == "multi":  # packed fixed pairs: composite, first, second
            res = self._pair_losses(self.eval_model, *split_packed(x), y)
            out, f2 = None, None
            loss, _ = mean_pair_loss(res)
            correct = res.correct.to(res.total.dtype)
        else:
            out, loss, correct, f2 = self._losses(self.eval_model, x, y, train=False)
        n = y.shape[0]
        parts = [loss.total * n, loss.margin * n, loss.reconstruction * n, correct.sum()]
        if f2 is not None:
            parts.append(f2.sum())
        sums = torch.stack(parts + [torch.tensor(n, device=x.device)]).double()
        split = self.split_names[dataloader_idx]
        self._sums[split] = self._sums.get(split, 0) + sums.detach()
        return out

    def on_validation_epoch_end(self) -> None:
        for split in self.split_names:
            sums = self._sums.get(split)
            if sums is None:  # no images of this split on this process
                sums = torch.zeros(len(self.eval_sums) + 1, dtype=torch.float64,
                                   device=self.device)
            if self.trainer.world_size > 1:
                sums = self.all_gather(sums).sum(0)
            n = sums[-1].clamp(min=1)
            for name, total in zip(self.eval_sums, sums[:-1]):
                self.log(f"{split}/{name}", (total / n).float(), prog_bar=name in ("acc", "f2"),
                         rank_zero_only=False)

    def configure_optimizers(self):
        hp = self.hparams
        opt = adam(self.model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.lr_schedule == "cosine":
            total = int(self.trainer.estimated_stepping_batches)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: lr_factor(step, total, hp.warmup_steps))
        elif hp.lr_schedule == "constant":
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: warmup_factor(step, hp.warmup_steps))
        else:
            gamma = hp.lr_decay ** (1.0 / hp.lr_decay_steps)
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # Exact resume: the random state (shuffling, augmentation, dropout-free model) travels
    # with the checkpoint, as plain tensors that load without unpickling code.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        set_rng_state(checkpoint.get("rng", {}))
