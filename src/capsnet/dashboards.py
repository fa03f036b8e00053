"""Live dashboards as Lightning callbacks: a Visdom page and TensorBoard images.

:class:`EvalSamples` collects, during each epoch's evaluation of the ``test`` split, the
predicted and true classes and the first few images with their reconstructions.
:class:`VisdomDashboard` streams the scalars logged by :class:`~capsnet.lit.LitCapsNet` and
those samples to a Visdom server; :class:`TensorBoardImages` adds the reconstruction grid to
the run's TensorBoard log. Nothing here touches the model.
"""

from __future__ import annotations

import contextlib
import io
import sys

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid

from .inference import confusion_matrix
from .plots import channels_side_by_side

RECON_CAPTION = "test images, each followed by its reconstruction"


def recon_grid(images: torch.Tensor, recons: torch.Tensor, pairs_per_row: int = 4) -> torch.Tensor:
    """``[3, H, W]`` grid in [0, 1]: each image with its reconstruction to its right (a
    smaller reconstruction, from a decoder with ``recon_size``, enlarged to the image's size;
    images of C other than 1 or 3 channels as their channels side by side, C*W wide)."""
    if recons.shape[-2:] != images.shape[-2:]:
        recons = torch.nn.functional.interpolate(recons.float(), size=images.shape[-2:],
                                                 mode="nearest")
    images, recons = channels_side_by_side(images), channels_side_by_side(recons)
    both = torch.stack([images, recons.clamp(0, 1)], dim=1).flatten(0, 1)  # x0, r0, x1, r1, ...
    return make_grid(both.float(), nrow=2 * pairs_per_row, padding=2, pad_value=0.5)


class EvalSamples(L.Callback):
    """Per epoch: predictions/targets on the ``test`` split and its first ``n_images`` images
    with their reconstructions (from the predicted class, as at evaluation)."""

    def __init__(self, num_classes: int, n_images: int = 16):
        self.num_classes = num_classes
        self.n_images = n_images
        self._reset()

    def _reset(self) -> None:
        self.preds: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.images: torch.Tensor | None = None
        self.recons: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None  # all processes' confusion, epoch end

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or pl_module.split_names[dataloader_idx] != "test":
            return
        x, y = batch
        if outputs is None or y.dim() != 1:  # pairs or multi-label: no single class
            return
        self.preds.append(outputs.lengths.argmax(dim=1).long().cpu())
        self.targets.append(y.long().cpu())
        if self.images is None:
            k = self.n_images
            self.images = x[:k].detach().float().cpu().contiguous()
            recons = outputs.reconstructions  # None for the CNN baselines
            self.recons = (None if recons is None else
                           recons[:k].detach().float().cpu().contiguous())

    def local_confusion(self) -> torch.Tensor:
        """Counts ``[true, predicted]`` over this process's share of the last test pass."""
        if not self.preds:
            return torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        return confusion_matrix(torch.cat(self.targets), torch.cat(self.preds),
                                self.num_classes)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        """Sum the counts of every process (each evaluated its own share of the test set):
        a collective, so every rank runs it."""
        if trainer.sanity_checking:
            return
        counts = self.local_confusion()
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts.to(pl_module.device), reduce_op="sum")
        self.counts = counts.cpu()

    def confusion(self) -> np.ndarray:
        """Counts ``[true, predicted]`` over the last test pass, over all processes."""
        counts = self.counts if self.counts is not None else self.local_confusion()
        return counts.numpy()

    def grid(self) -> torch.Tensor | None:
        if self.images is None or self.recons is None:
            return None
        return recon_grid(self.images, self.recons)


class TensorBoardImages(L.Callback):
    """Logs the test reconstruction grid as image ``test/reconstructions`` every epoch."""

    def __init__(self, samples: EvalSamples):
        self.samples = samples

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        grid = self.samples.grid()
        if trainer.sanity_checking or grid is None or trainer.global_rank != 0:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("test/reconstructions", grid, trainer.global_step)


def _connect(server: str, port: int, env: str):
    """A Visdom client that raises on errors and times out after 10 s (visdom imported here)."""
    import logging

    import visdom
    logging.getLogger("visdom").setLevel(logging.ERROR)  # its chatter about sockets

    class Client(visdom.Visdom):
        def _handle_post(self, url, data=None):  # a hung server must not stall training
            return self.session.post(url, data=data or {}, timeout=10).text

    with contextlib.redirect_stdout(io.StringIO()):  # visdom prints errors as it raises them
        vis = Client(server=server, port=port, env=env, raise_exceptions=True,
                     use_incoming_socket=False)
        if not vis.check_connection():
            raise ConnectionError(f"no answer from {server}:{port}")
    return vis


# Line-plot windows: id -> (title, y label). Every x axis is the training step.
_LINES = {"loss": ("loss (total and margin part)", "loss"),
          "recon": ("reconstruction error (sum of squares per image)", "SSE"),
          "acc": ("accuracy", "accuracy"),
          "lr": ("learning rate", "lr")}
# (window, trace, metric) sent every `every_n_steps` training steps.
_STEP_TRACES = [("loss", "train loss", "train/loss_step"),
                ("loss", "train margin", "train/margin_step"),
                ("recon", "train", "train/recon_step"),
                ("acc", "train", "train/acc_step"),
                ("lr", "lr", "lr_step")]


class VisdomDashboard(L.Callback):
    """Streams training to a Visdom server; on any failure it says so once and stops.

    Every ``every_n_steps`` steps: train loss, margin, reconstruction error, accuracy and the
    learning rate. Every epoch: the same for the epoch (train mean and each evaluated split),
    the test confusion matrix and a grid of test images beside their reconstructions.
    """

    def __init__(self, samples: EvalSamples, classes, server: str = "http://127.0.0.1",
                 port: int = 8097, env: str = "capsnet", every_n_steps: int = 20):
        self.samples, self.classes = samples, [str(c) for c in classes]
        self.server, self.port, self.env = server, port, env
        self.every_n_steps = every_n_steps
        self.url = f"{server.rstrip('/')}:{port}"
        self.vis = None

    def _say(self, message: str) -> None:
        print(f"capsnet: {message}; training continues without the dashboard",
              file=sys.stderr, flush=True)

    def _send(self, fn, *args, **kwargs) -> None:
        """Call a Visdom method; the first failure disables the dashboard with one notice."""
        if self.vis is None:
            return
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # visdom prints its own errors
                fn(*args, **kwargs)
        except OSError as e:  # ConnectionError, and requests' errors derive from it
            self.vis = None
            self._say(f"lost the Visdom server at {self.url} ({type(e).__name__})")
        except Exception as e:  # noqa: BLE001 - a dashboard must never stop training
            self.vis = None
            self._say(f"the Visdom dashboard failed ({type(e).__name__}: {e})")

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        try:
            vis = _connect(self.server, self.port, self.env)
        except ImportError as e:
            self._say(f"cannot stream to Visdom ({e}; run `make setup`)")
            return
        except Exception:  # noqa: BLE001
            self._say(f"Visdom server at {self.url} not reachable")
            return
        self.vis = vis
        if trainer.ckpt_path is None:  # a new run: start from empty windows
            for win in [*_LINES, "confusion", "reconstructions"]:
                self._send(vis.close, win=win)
        print(f"capsnet: live dashboard at {self.url}/env/{self.env}", flush=True)

    def _point(self, win: str, trace: str, x: int, y: float, markers: bool = False) -> None:
        if self.vis is None:
            return
        title, ylabel = _LINES[win]
        opts = {"title": title, "xlabel": "step", "ylabel": ylabel, "showlegend": win != "lr",
                "markers": markers, "markersize": 6}
        if win == "lr":  # tiny changes of a small number: show them as 9.9996e-4
            opts["layoutopts"] = {"plotly": {"yaxis": {"title": ylabel, "tickformat": ".5~e"}}}
        self._send(self.vis.line, X=np.array([x]), Y=np.array([float(y)]), win=win,
                   name=trace, update="append", opts=opts)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.vis is None or step % self.every_n_steps:
            return
        m = trainer.callback_metrics
        for win, trace, key in _STEP_TRACES:
            if key in m:
                self._point(win, trace, step, m[key])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.vis is None:
            return
        m, step, epoch = trainer.callback_metrics, trainer.global_step, trainer.current_epoch
        for split, suffix in [("train", "_epoch"), *((s, "") for s in pl_module.split_names)]:
            label = f"{split} (epoch)" if split == "train" else split
            for win, trace, key in [("loss", f"{label} loss", "loss"),
                                    ("loss", f"{label} margin", "margin"),
                                    ("recon", label, "recon"), ("acc", label, "acc")]:
                if f"{split}/{key}{suffix}" in m:
                    self._point(win, trace, step, m[f"{split}/{key}{suffix}"], markers=True)
        confusion = self.samples.confusion()
        if confusion.sum() > 0:  # rows reversed: plotly draws row 0 at the bottom
            opts = {"title": "test confusion matrix", "rownames": self.classes[::-1],
                    "columnnames": self.classes, "xlabel": f"predicted (epoch {epoch})",
                    "ylabel": "true", "marginleft": 90, "marginbottom": 90}
            self._send(self.vis.heatmap, X=confusion[::-1].copy(),
                       win="confusion", opts=opts)
        grid = self.samples.grid()
        if grid is not None:
            opts = {"title": "test reconstructions", "caption": f"{RECON_CAPTION} (epoch {epoch})",
                    "width": 2 * grid.shape[2], "height": 2 * grid.shape[1] + 20}  # + caption
            self._send(self.vis.image, grid.numpy(), win="reconstructions", opts=opts)
