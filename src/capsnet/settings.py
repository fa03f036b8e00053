"""Every setting of a run, defined once: defaults, YAML files, validation, one-line errors.

Settings come, lowest priority first, from :data:`DEFAULTS`, a YAML file (``--config``), the
``config.yaml`` of a run being resumed, and the command-line flags. ``capsnet train``,
``evaluate``, ``report`` and the dashboards all read a run's settings through here. This
module imports neither torch nor Lightning, so the command line starts fast.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from .errors import CapsnetError
from .paper import RECON_WEIGHT, ROUTING_ITERATIONS

LR_SCHEDULES = ("exp", "cosine", "constant")
PRECISIONS = ("32", "bf16-mixed", "16-mixed")  # Lightning's names
# How `capsnet predict` makes a picture square (capsnet.evaluate.load_image; "auto":
# capsnet.evaluate.model_input, as the model's training images were made).
FITS = ("auto", "pad", "stretch", "crop")
# Test-time augmentation of `capsnet evaluate/predict --tta` (capsnet.inference.tta_views):
# each choice and the words `capsnet evaluate` prints for it after "accuracy A on N test images".
TTA_WORDS = {"none": "", "hflip": ", each with its mirror image",
             "shift": ", each with its four one-pixel shifts",
             "shift+hflip": ", each with its mirror image and four one-pixel shifts",
             "grid1": ", each with its 8 shifts by up to one pixel",
             "grid1+hflip": ", each with its 8 shifts by up to one pixel and their mirrors",
             "grid2": ", each with its 24 shifts by up to two pixels",
             "grid2+hflip": ", each with its 24 shifts by up to two pixels and their mirrors"}
TTA = tuple(TTA_WORDS)
STRATEGIES = ("auto", "ddp")  # Lightning's: one process, or one process per device

DEFAULTS: dict = {
    "arch": "capsnet", "dataset": "fashion-mnist", "data_dir": None, "out": "runs/capsnet",
    "epochs": 10, "batch_size": 128, "eval_batch_size": 512,
    "max_minutes": 0.0,  # a training-time budget (capsnet.callbacks.StopAtTimeBudget); 0: none
    "lr": 1e-3, "lr_schedule": "exp", "lr_decay": 0.96, "lr_decay_steps": 2000,
    "warmup_steps": 0, "ema": 0.0, "swa": False,
    "weight_decay": 0.0,  # decoupled (AdamW) on weight matrices and kernels; 0: plain Adam
    "sam": 0.0,  # sharpness-aware minimization's radius (capsnet.optim.sam_closure); 0: off
    "init": None,  # start from these weights (a checkpoint, weights file or shipped name)
    # Distillation (capsnet.distill): a trained model's capsule lengths on the training
    # images, averaged over its test-time views, as extra targets with this weight.
    "teacher": None, "teacher_weight": 1.0, "teacher_tta": "shift+hflip",
    "routing_iterations": ROUTING_ITERATIONS, "detach_routing": False,
    "stem": 0, "stem_channels": 64,  # CapsNet's downsampling stem (0: none, the paper's model)
    "recon_size": 0,  # CapsNet's decoder output side (0: the image's, the paper's decoder)
    "recon_weight": RECON_WEIGHT,
    "shift": 2, "rotate": 0.0, "scale": 0.0, "shear": 0.0, "translate": 0.0, "hflip": False,
    "erase": 0.0,
    "train_size": None, "val_size": 5000, "test_size": None,
    "image_size": None, "test_fraction": 0.2,
    "seed": 0, "device": "auto", "devices": 1, "num_nodes": 1, "strategy": "auto",
    "precision": "32", "threads": None, "channels_last": True,
    "log_every": 20, "save_every_steps": 0, "tensorboard": True, "progress": True,
    "visdom": False, "visdom_server": "http://127.0.0.1", "visdom_port": 8097,
    "visdom_env": "capsnet",
}

# Settings that must be positive numbers, and those that must not be negative.
_POSITIVE = ("epochs", "batch_size", "eval_batch_size", "lr", "lr_decay", "lr_decay_steps",
             "routing_iterations", "train_size", "test_size", "log_every", "threads",
             "devices", "num_nodes", "image_size", "stem_channels")
_NON_NEGATIVE = ("warmup_steps", "ema", "recon_weight", "shift", "rotate", "scale", "shear",
                 "translate", "erase", "val_size", "stem", "recon_size", "save_every_steps",
                 "teacher_weight", "weight_decay", "sam", "max_minutes")


def read_config(path: str | Path) -> dict:
    """Settings from a YAML file (keys with ``-`` or ``_``), checked against :data:`DEFAULTS`."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except UnicodeDecodeError:
        raise CapsnetError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
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
        if key == "precision" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # YAML reads `precision: 32` as a number
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CapsnetError(f"setting {key!r} must be {kind.__name__}, got {value!r}")
        s[key] = value
    for key in ("train_size", "test_size", "threads", "image_size"):  # optional whole numbers
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
    if not 0 < s["test_fraction"] < 1:
        raise CapsnetError(f"setting 'test_fraction' must be between 0 and 1, got "
                           f"{s['test_fraction']}")
    if s["strategy"] not in STRATEGIES:
        raise CapsnetError(f"setting 'strategy' must be one of {', '.join(STRATEGIES)}, "
                           f"got {s['strategy']!r}")
    if s["erase"] > 1:
        raise CapsnetError(f"setting 'erase' is a probability, at most 1, got {s['erase']}")
    if s["warmup_steps"] and s["lr_schedule"] == "exp":  # it would be silently ignored
        raise CapsnetError("setting 'warmup_steps' applies to the cosine and constant "
                           "schedules, not to exp; set it to 0 or choose --lr-schedule")
    if s["ema"] >= 1:
        raise CapsnetError(f"setting 'ema' must be below 1 (0: off), got {s['ema']}")
    if s["swa"] and s["ema"] > 0:
        raise CapsnetError("settings 'swa' and 'ema' exclude each other (one average of the "
                           "weights is evaluated and saved); set ema to 0 with swa")
    if isinstance(s.get("teacher"), list) and len(s["teacher"]) == 1:
        s["teacher"] = s["teacher"][0]  # one teacher is a name; several are an ensemble
    for key in ("init", "teacher"):
        value = s.get(key)
        several = key == "teacher" and isinstance(value, list) and len(value) > 1
        if value is not None and not isinstance(value, str) and not (
                several and all(isinstance(v, str) for v in value)):
            raise CapsnetError(f"setting {key!r} must be a path or a shipped model's name"
                               f"{', or a list of them' if key == 'teacher' else ''}, "
                               f"got {value!r}")
    for key in ("out", "data_dir"):
        if s.get(key) is not None:
            check_folder_setting(key, s[key])
    if not 0 <= s["seed"] < 2**32:  # what NumPy's generator (Lightning seeds it) accepts
        raise CapsnetError(f"setting 'seed' must be from 0 to {2**32 - 1}, got {s['seed']}")
    if s["teacher_tta"] not in TTA:
        raise CapsnetError(f"setting 'teacher_tta' must be one of {', '.join(TTA)}, got "
                           f"{s['teacher_tta']!r}")
    from .models import ARCHITECTURES  # the registry is the one list (imports torch)
    if s["arch"] not in ARCHITECTURES:
        raise CapsnetError(f"setting 'arch' must be one of {', '.join(ARCHITECTURES)}, "
                           f"got {s['arch']!r}")
    if str(s["precision"]) not in PRECISIONS:
        raise CapsnetError(f"setting 'precision' must be one of {', '.join(PRECISIONS)}, "
                           f"got {s['precision']!r}")
    s["precision"] = str(s["precision"])
    if s["lr_schedule"] not in LR_SCHEDULES:
        raise CapsnetError(f"setting 'lr_schedule' must be one of {', '.join(LR_SCHEDULES)}, "
                           f"got {s['lr_schedule']!r}")
    return s


def check_folder_setting(key: str, value) -> str:
    """``value`` of the setting ``key`` (``out``, ``data_dir``), a folder's path: text, not
    empty (an empty one would be the current folder)."""
    if not isinstance(value, str) or not value.strip():
        raise CapsnetError(f"setting {key!r} must be a folder's path, got {value!r}")
    return value


RUN_CONFIG_HEADER = "# capsnet train: this run's settings (--resume reads them)\n"


# Files a new run writes over in its folder (besides config.yaml, last.ckpt and the
# folders it adds to: tensorboard/, step-*.safetensors).
RUN_FILES = ("metrics.csv", "best.ckpt", "teacher.safetensors")


def refuse_foreign_config(run_dir: Path, resume: bool) -> None:
    """A new run never overwrites a config.yaml that capsnet did not write (a user's own
    settings file kept in the folder given as ``--out``), nor, in a folder without a
    run's config.yaml, a file with the name of one it writes (:data:`RUN_FILES`): a
    one-line error instead."""
    path = run_dir / "config.yaml"
    if resume:
        return
    if path.is_file():
        with open(path, errors="replace") as f:
            if f.readline() != RUN_CONFIG_HEADER:
                raise CapsnetError(f"{path} is not a capsnet run's config.yaml and would be "
                                   "overwritten; choose another --out or move the file")
        return
    for name in RUN_FILES:
        if (run_dir / name).exists():
            raise CapsnetError(f"{run_dir / name} is not from a capsnet run (no config.yaml "
                               "beside it) and would be overwritten; choose another --out "
                               "or move the file")


def save_run_settings(run_dir: Path, s: dict) -> None:
    """Writes ``run_dir/config.yaml``, marked by its first line as written by capsnet,
    through a temporary file renamed over it: a run killed meanwhile keeps the old file
    whole (it is rewritten on every start and resume)."""
    from .checkpoints import atomic_write  # imports torch; this module does not need it
    text = RUN_CONFIG_HEADER + yaml.safe_dump(s, sort_keys=False)
    atomic_write(run_dir / "config.yaml", lambda f: f.write(text.encode()))


# What defines a run cannot change when it is resumed: its data and split (a larger
# --val-size would validate on images it has trained on), its model, and its optimization,
# whose state the checkpoint restores (a new --lr would be silently ignored). Augmentation,
# the device, logging and (for schedules that do not depend on them) --epochs and the
# number of processes may change.
FIXED_ON_RESUME = ("arch", "dataset", "train_size", "val_size", "image_size", "test_fraction",
                   "seed", "batch_size", "lr", "lr_schedule", "lr_decay", "lr_decay_steps",
                   "warmup_steps", "ema", "swa", "weight_decay", "sam", "routing_iterations",
                   "detach_routing", "stem", "stem_channels", "recon_size", "recon_weight",
                   "teacher", "teacher_weight", "teacher_tta")


def refuse_changes_on_resume(run: dict, s: dict) -> None:
    """One-line error when the settings ``s`` of a resumed run differ from those it was
    started with (``run``, its ``config.yaml``) in what defines it (:data:`FIXED_ON_RESUME`;
    for the cosine schedule also ``epochs``, ``devices`` and ``num_nodes``: it ends at the
    run's last step, and the number of steps per epoch depends on the number of processes)."""
    cosine = ("epochs", "devices", "num_nodes")
    fixed = FIXED_ON_RESUME + (cosine if run.get("lr_schedule") == "cosine" else ())
    for key in fixed:
        was = run.get(key, DEFAULTS[key])
        if s[key] != was:
            raise CapsnetError(f"--resume: --{key.replace('_', '-')} {s[key]} differs from "
                               f"the run's {was}; a resumed run keeps its settings (start a "
                               "new run, or --init from its checkpoint)")


def load_run_settings(run_dir: str | Path) -> dict:
    """The settings a run was started with (its ``config.yaml``)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CapsnetError(f"{run_dir}: not a capsnet run directory (no config.yaml)")
    s = read_config(path)
    s["out"] = str(run_dir)
    return s


def run_data_dir(flag: str | None, run_settings: dict) -> str | None:
    """The one rule for where a run's data is: ``--data-dir`` when given, else the run's own
    ``data_dir`` setting, else None (the standard search of :mod:`capsnet.data.datasets`)."""
    return flag if flag is not None else run_settings.get("data_dir")


def settings_beside(checkpoint: str | Path) -> dict:
    """The settings of the run a checkpoint file sits in (its ``config.yaml``), or ``{}``.

    A ``config.yaml`` there that is not a run's (another tool's file) lends nothing; a
    run's that cannot be read or holds values of the wrong kind (edited by hand, damaged)
    is a one-line error naming it: the model's split and data options would be unknown."""
    path = Path(checkpoint)
    config = path.parent / "config.yaml"
    if not path.is_file() or not config.is_file():
        return {}
    try:
        with open(config, encoding="utf-8", errors="replace") as f:
            ours = f.readline() == RUN_CONFIG_HEADER
    except OSError:
        ours = False
    try:
        return check_record(read_config(config), config)
    except CapsnetError:
        if ours:
            raise
        return {}


def check_record(record: dict, where) -> dict:
    """``record`` (a weights file's metadata or a run's ``config.yaml``), after checking the
    values capsnet reads back from it; a value of the wrong kind (a file edited by hand or
    damaged) is a one-line error naming ``where``, not a traceback later on."""
    import re

    def refuse(key: str, want: str):
        raise CapsnetError(f"{where}: its {key!r} must be {want}, got {record[key]!r}")
    for key in ("arch", "dataset", "data_dir", "source"):
        if record.get(key) is not None and not isinstance(record[key], str):
            refuse(key, "text")
    v = record.get("val_size")
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
        refuse("val_size", "a whole number, at least 0")
    w = record.get("recon_weight")
    if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float))
                          or not math.isfinite(w) or w < 0):
        refuse("recon_weight", "a number, at least 0")
    pool = record.get("train_pool")  # data.datasets.split_fingerprint's "N:digest"
    if pool is not None and not (isinstance(pool, str) and re.fullmatch(r"\d+:[0-9a-f]+", pool)):
        refuse("train_pool", "a count and a digest (N:hex)")
    classes = record.get("classes")
    if classes is not None and not (isinstance(classes, list)
                                    and all(isinstance(c, (str, int)) for c in classes)):
        refuse("classes", "a list of class names")
    if record.get("data_options") is not None and not isinstance(record["data_options"], dict):
        refuse("data_options", "a mapping")
    return record
