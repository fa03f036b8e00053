"""Lightning plug-ins of a run: metrics.csv, best.ckpt and last.ckpt, the divergence stop,
the time budget, safe checkpoint IO, the progress bar."""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from .checkpoints import atomic_torch_save, atomic_write, refuse_non_finite, safe_load
from .errors import CapsnetError
from .metrics import COLUMNS, read_metrics


class EpochMetricsCSV(L.Callback):
    """Appends one row per finished epoch (after its evaluation) to ``path``.

    On resume, rows of epochs at or after the resumed epoch are dropped first, so a run that
    was killed between writing a row and saving its checkpoint never shows an epoch twice.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:  # after a resume's restore
        if trainer.global_rank != 0:
            return
        keep = [r for r in read_metrics(self.path) if r["epoch"] < trainer.current_epoch]
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, COLUMNS)
        w.writeheader()
        w.writerows(keep)
        # replaced whole: a run killed now keeps its earlier epochs' rows
        atomic_write(self.path, lambda f: f.write(text.getvalue().encode()))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        # In every process: reading the epoch's metrics averages them over the processes
        # (collectives), which the processes must do at the same point of the epoch's end,
        # or a later collective of one (StopAtTimeBudget's) would meet another's average.
        m = trainer.callback_metrics
        if trainer.global_rank != 0:
            return
        row = {"epoch": trainer.current_epoch,
               "epoch_time_s": round(time.perf_counter() - self._start, 3)}
        for col in COLUMNS[1:-1]:  # the metrics logged by LitCapsNet
            key = col.replace("_", "/", 1)
            for name in (key + "_epoch", key):
                if name in m:
                    row[col] = float(m[name])
                    break
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS).writerow(row)


def budget_left(rows: list[dict], minutes: float) -> tuple[bool, float, float]:
    """Whether another epoch fits in a budget of ``minutes`` of training, by the rows of a
    run's metrics.csv: ``(fits, minutes used, minutes of the last epoch)``. The clock is
    the sum of their ``epoch_time_s`` (training and evaluation, every resume included;
    the clock of ``scripts/clock.py``), and the next epoch is expected to take as long as
    the last one."""
    used = sum(r.get("epoch_time_s", 0.0) for r in rows) / 60
    last = rows[-1].get("epoch_time_s", 0.0) / 60 if rows else 0.0
    return used + last <= minutes, used, last


class StopAtTimeBudget(L.Callback):
    """``--max-minutes``: ends the run after an epoch when the next one is not expected to
    end within the budget (:func:`budget_left`), with its checkpoints saved as after any
    epoch, so ``--resume`` with a larger budget continues it. Comes after
    :class:`EpochMetricsCSV`, whose row of the epoch it reads; the main process decides
    for all."""

    def __init__(self, out: str | Path, minutes: float):
        self.out, self.minutes = Path(out), minutes
        self.path = self.out / "metrics.csv"

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.current_epoch + 1 >= trainer.max_epochs:
            return
        note = None
        if trainer.global_rank == 0:
            fits, used, last = budget_left(read_metrics(self.path), self.minutes)
            if not fits:
                note = (f"capsnet: stopped after epoch {trainer.current_epoch + 1} of "
                        f"{trainer.max_epochs}: {used:.2f} of --max-minutes {self.minutes:g} "
                        f"used, and the next epoch (about {last:.2f} minutes) would not fit "
                        f"(the learning rate, scheduled over --epochs, is at "
                        f"{trainer.optimizers[0].param_groups[0]['lr']:.3g}); continue with: "
                        f"capsnet train --resume {self.out} --max-minutes M (M larger, or 0 "
                        "for no budget)")
        note = trainer.strategy.broadcast(note, src=0)
        if note is not None:
            trainer.should_stop = True
            if trainer.global_rank == 0:
                print(note, flush=True)


class SaveWeightsEvery(L.Callback):
    """Writes the evaluated weights (the average, if the run keeps one) every ``every``
    training steps to ``out/step-NNNNNN.safetensors`` (``NNNNNN``: the global step), a
    weights file like ``capsnet export`` writes, recording the run's ``val_size`` (so that
    ``evaluate --split val`` finds the split from the file alone). For comparisons at a finer
    grain than the epoch (``docs/robustness.md``: the affine experiment's equal-accuracy
    match). Weights that are not finite stop the run instead (a one-line error)."""

    def __init__(self, out: str | Path, every: int, val_size: int | None = None):
        self.out, self.every, self.val_size = Path(out), every, val_size

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every:
            return
        path = self.out / f"step-{step:06d}.safetensors"
        # checked in every process (their weights are the same), so that all stop together
        refuse_non_finite(pl_module.eval_model.state_dict(), path)
        if trainer.global_rank != 0:
            return
        from .weights import describe, save_weights
        info = describe({**pl_module.hparams, "epoch": trainer.current_epoch,
                         "val_size": self.val_size}, f"step {step}")
        save_weights(pl_module.eval_model, path, info)


class StopOnNonFinite(L.Callback):
    """Stop the run at the first training step whose loss is NaN or infinite.

    The step's weights are not saved: the error propagates out of ``trainer.fit`` before any
    checkpoint of this epoch is written, and :class:`~capsnet.checkpoints.SafeCheckpointIO`
    refuses non-finite weights in any case, so ``last.ckpt`` and ``best.ckpt`` keep the last
    good epoch. Weights that became non-finite with a finite loss are caught after each
    validation, before the checkpoints are written (Lightning runs checkpoint callbacks
    last), in every process: under DDP only process 0 writes, and a refusal there alone
    would leave the others waiting for it.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        mine = loss is not None and not math.isfinite(float(loss))
        bad = mine
        if trainer.world_size > 1:
            # every process stops at this step: one going on alone would wait forever in the
            # next gradient all-reduce for those that stopped
            bad = trainer.strategy.reduce_boolean_decision(mine, all=False)
        if bad:
            lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
            became = float(loss) if mine else "non-finite in another process"
            raise CapsnetError(
                f"the training loss became {became} at step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}); the run diverged, most likely a learning "
                f"rate too high (lr {lr:g}); checkpoints on disk keep the last good epoch")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        where = getattr(trainer.checkpoint_callback, "dirpath", None) or "."
        refuse_non_finite(pl_module.state_dict(), Path(where) / "last.ckpt")


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` for ``best.ckpt`` (the epoch of the highest score,
    the first on ties) and ``last.ckpt``, with what a ``--resume`` needs:

    * best.ckpt's callback must come before last.ckpt's (Lightning keeps checkpoint
      callbacks in their order): the score best.ckpt is compared with on a resume is the one
      last.ckpt recorded, and last.ckpt written first would not know its own epoch's, so the
      first epoch after a resume could replace a better best.ckpt;
    * a run folder that was moved or renamed since (Lightning compares real paths)
      would restore no score at all (Lightning: "The dirpath has changed"), with the same
      effect: the recorded paths are taken as the files of the same name in this folder.
    """

    @property
    def state_key(self) -> str:  # ModelCheckpoint's: runs saved before this class resume too
        return "ModelCheckpoint" + super().state_key.removeprefix(type(self).__qualname__)

    def load_state_dict(self, state_dict: dict) -> None:
        def here(path):
            return str(Path(self.dirpath) / Path(path).name) if path else path
        state_dict = {**state_dict, "dirpath": self.dirpath,
                      "best_model_path": here(state_dict.get("best_model_path")),
                      "kth_best_model_path": here(state_dict.get("kth_best_model_path")),
                      "last_model_path": here(state_dict.get("last_model_path")),
                      "best_k_models": {here(k): v for k, v in
                                        state_dict.get("best_k_models", {}).items()}}
        super().load_state_dict(state_dict)


class SameWeightsOnAllRanks(L.Callback):
    """After data-parallel training, check that every process ends with the same weights.

    DDP keeps the replicas equal by averaging gradients; a replica that drifted (a
    non-deterministic op, a parameter outside the optimizer) would make rank 0's checkpoint
    a model the other processes did not train. Gathers every parameter (a copy of the model
    per process, once per run) and compares them bit for bit.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.world_size == 1:
            return
        flat = torch.cat([p.detach().flatten().float() for p in pl_module.parameters()])
        gathered = pl_module.all_gather(flat)  # [world, P]
        differ = [r for r in range(1, gathered.shape[0]) if not torch.equal(gathered[0],
                                                                           gathered[r])]
        if differ:
            raise CapsnetError(f"data-parallel processes {differ} ended with weights "
                               "different from process 0's")
        if trainer.global_rank == 0:
            print(f"weights identical on all {trainer.world_size} processes", flush=True)


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar (it shows the ETA), with short names for the live metrics."""

    SHORT = {"train/loss_step": "loss", "train/acc_step": "acc", "val/acc": "val_acc",
             "test/acc": "test_acc", "test/loss": "test_loss"}

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        return {short: metrics[key] for key, short in self.SHORT.items() if key in metrics}


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, with atomic writes and code-free (weights-only) reads."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        refuse_non_finite(checkpoint.get("state_dict", {}), path)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return safe_load(path, map_location if map_location is not None else "cpu")
