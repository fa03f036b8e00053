"""`capsnet train`: every setting as one flat dict, a Lightning Trainer to run it.

Settings come, lowest priority first, from :data:`DEFAULTS`, a YAML file (``--config``), the
``config.yaml`` of a run being resumed, and the command-line flags.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from .callbacks import EpochMetricsCSV, ProgressBar, read_metrics
from .checkpoints import SafeCheckpointIO
from .data import ImageDataModule
from .errors import CapsnetError
from .lit import LitCapsNet

DEFAULTS: dict = {
    "dataset": "fashion-mnist", "data_dir": None, "out": "runs/capsnet",
    "epochs": 10, "batch_size": 128, "eval_batch_size": 512,
    "lr": 1e-3, "lr_decay": 0.96, "lr_decay_steps": 2000,
    "routing_iterations": 3, "detach_routing": False, "recon_weight": 0.0005,
    "shift": 2, "rotate": 0.0, "scale": 0.0, "shear": 0.0, "translate": 0.0, "hflip": False,
    "train_size": None, "val_size": 0, "test_size": None,
    "seed": 0, "device": "auto", "threads": None, "channels_last": True,
    "log_every": 20, "tensorboard": True, "progress": True,
    "visdom": False, "visdom_server": "http://127.0.0.1", "visdom_port": 8097,
    "visdom_env": "capsnet",
}

# Settings that must be positive numbers, and those that must not be negative.
_POSITIVE = ("epochs", "batch_size", "eval_batch_size", "lr", "lr_decay", "lr_decay_steps",
             "routing_iterations", "train_size", "test_size", "log_every", "threads")
_NON_NEGATIVE = ("recon_weight", "shift", "rotate", "scale", "shear", "translate", "val_size")


def retain_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of returning it to the kernel.

    By default glibc serves every allocation above 32 MB with a fresh ``mmap`` and unmaps it
    when freed, so each large tensor of every step faults its pages in again (about a GB per
    training step of the naive model; on this virtual machine page faults cost more than the
    arithmetic of many layers). Allocating from the heap and never trimming it makes a step
    reuse the memory of the previous one. Process-wide; returns False where not glibc.
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def read_config(path: str | Path) -> dict:
    """Settings from a YAML file (keys with ``-`` or ``_``), checked against :data:`DEFAULTS`."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise CapsnetError(f"{path}: cannot read config ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise CapsnetError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CapsnetError(f"{path}: a config file must be a mapping of setting: value")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in DEFAULTS:
            raise CapsnetError(f"{path}: unknown setting {key!r}")
        out[name] = value
    return out


def check_settings(s: dict) -> dict:
    """Type-check and range-check merged settings; returns them with numbers coerced."""
    s = dict(s)
    for key, default in DEFAULTS.items():
        value = s.get(key)
        if value is None or default is None:
            continue
        kind = type(default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CapsnetError(f"setting {key!r} must be {kind.__name__}, got {value!r}")
        s[key] = value
    for key in ("train_size", "test_size", "threads"):  # optional whole numbers
        v = s.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise CapsnetError(f"setting {key!r} must be int, got {v!r}")
    for key in _POSITIVE:
        v = s.get(key)
        if v is not None and (not math.isfinite(v) or v <= 0):
            raise CapsnetError(f"setting {key!r} must be positive, got {v!r}")
    for key in _NON_NEGATIVE:
        v = s.get(key)
        if v is not None and (not math.isfinite(v) or v < 0):
            raise CapsnetError(f"setting {key!r} must not be negative, got {v!r}")
    if s["lr_decay"] > 1:
        raise CapsnetError(f"setting 'lr_decay' must be at most 1, got {s['lr_decay']}")
    return s


def resolve_device(device: str) -> tuple[str, list[int] | str]:
    """``auto``/``cpu``/``cuda``/``cuda:N`` -> Lightning ``(accelerator, devices)``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu", 1
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise CapsnetError(f"--device {device}: CUDA is not available on this machine")
        index = device.split(":")[1] if ":" in device else "0"
        if index.isdigit():
            return "gpu", [int(index)]
    raise CapsnetError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")


def torch_device(device: str) -> torch.device:
    """``auto``/``cpu``/``cuda``/``cuda:N`` -> the ``torch.device`` to run on."""
    accelerator, devices = resolve_device(device)
    return torch.device("cpu") if accelerator == "cpu" else torch.device("cuda", devices[0])


def build_module(s: dict, classes, shape) -> LitCapsNet:
    model = {"in_channels": shape[0], "image_size": shape[1], "num_classes": len(classes),
             "routing_iterations": s["routing_iterations"], "detach_routing": s["detach_routing"]}
    if shape[1] != shape[2]:
        raise CapsnetError(f"square images expected, got {shape[1]}x{shape[2]}")
    augment = {k: s[k] for k in ("shift", "rotate", "scale", "shear", "translate", "hflip")}
    return LitCapsNet(model=model, augment=augment, lr=s["lr"], lr_decay=s["lr_decay"],
                      lr_decay_steps=s["lr_decay_steps"], recon_weight=s["recon_weight"],
                      classes=list(classes), dataset=s["dataset"],
                      channels_last=s["channels_last"])


def _extra_callbacks(s: dict, datamodule) -> list:
    """Live dashboards: reconstruction images in TensorBoard, the optional Visdom page."""
    if not (s["visdom"] or s["tensorboard"]):
        return []
    from .dashboards import EvalSamples, TensorBoardImages, VisdomDashboard
    samples = EvalSamples(num_classes=len(datamodule.classes))
    callbacks = [samples]
    if s["tensorboard"]:
        callbacks.append(TensorBoardImages(samples))
    if s["visdom"]:
        callbacks.append(VisdomDashboard(samples, datamodule.classes, server=s["visdom_server"],
                                         port=s["visdom_port"], env=s["visdom_env"],
                                         every_n_steps=s["log_every"]))
    return callbacks


def train(settings: dict, resume: bool = False) -> list[dict]:
    """Run (or continue, with ``resume``) a training run; returns the rows of metrics.csv."""
    s = check_settings({**DEFAULTS, **settings})
    out = Path(s["out"])
    last = out / "last.ckpt"
    if resume and not last.is_file():
        raise CapsnetError(f"--resume {out}: no last.ckpt there to resume from")
    if not resume and last.exists():
        raise CapsnetError(f"{out} already holds a run (last.ckpt); use --resume {out} to "
                           "continue it or --out to start a new one")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.ckpt.*.tmp"):  # left by a run killed while saving
        stale.unlink()
    with open(out / "config.yaml", "w") as f:
        yaml.safe_dump(s, f, sort_keys=False)

    if s["threads"]:
        torch.set_num_threads(s["threads"])
    accelerator, devices = resolve_device(s["device"])
    if accelerator == "cpu":
        retain_freed_memory()  # 3-12% faster CPU steps: `capsnet bench --no-retain-memory`
    L.seed_everything(s["seed"], verbose=False)
    dm = ImageDataModule(s["dataset"], s["data_dir"], s["batch_size"], s["eval_batch_size"],
                         s["train_size"], s["val_size"], s["test_size"], split_seed=s["seed"])
    dm.setup("fit")
    module = build_module(s, dm.classes, dm.shape)
    module.split_names = list(dm.eval_splits())
    n = module.model.num_parameters()
    print(f"CapsNet: {n:,} parameters ({n / 1e6:.1f}M); {len(dm.train):,} training images, "
          f"{', '.join(f'{len(d):,} {k}' for k, d in dm.eval_splits().items())}; "
          f"device {accelerator}; {torch.get_num_threads()} threads", flush=True)

    monitor = "val/acc" if dm.val is not None else "test/acc"
    checkpoint = ModelCheckpoint(dirpath=out, filename="best", monitor=monitor, mode="max",
                                 save_last=True, save_top_k=1, enable_version_counter=False,
                                 auto_insert_metric_name=False)
    callbacks = [checkpoint, EpochMetricsCSV(out / "metrics.csv")]
    if s["progress"]:
        callbacks.append(ProgressBar(refresh_rate=max(1, s["log_every"] // 4)))
    callbacks += _extra_callbacks(s, dm)
    logger = (TensorBoardLogger(save_dir=out, name="tensorboard", version="")
              if s["tensorboard"] else False)
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, max_epochs=s["epochs"],
        logger=logger, callbacks=callbacks, plugins=[SafeCheckpointIO()],
        enable_progress_bar=s["progress"], enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=s["log_every"], deterministic=False,
        default_root_dir=out,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*bottleneck.*")
        warnings.filterwarnings("ignore", ".*exists and is not empty.*")
        warnings.filterwarnings("ignore", ".*overridden `on_after_batch_transfer`.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=str(last) if resume else None,
                        weights_only=True)
        except SystemExit:  # Lightning's graceful shutdown after Ctrl-C
            if last.is_file():
                print(f"capsnet: interrupted; continue with: capsnet train --resume {out}")
            raise
    return read_metrics(out / "metrics.csv")


def load_run_settings(run_dir: str | Path) -> dict:
    """The settings a run was started with (its ``config.yaml``)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CapsnetError(f"{run_dir}: not a capsnet run directory (no config.yaml)")
    s = read_config(path)
    s["out"] = str(run_dir)
    return s


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # quiet TensorBoard's optional TF import
# Lightning's start-up banner (GPU/TPU availability, tips) is noise in a CLI.
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
