"""`capsnet train`: the settings (:mod:`capsnet.settings`) -> a Lightning Trainer that runs them.

The LightningModule (:mod:`capsnet.lit`) holds model, loss and optimizer; the DataModule
(:mod:`capsnet.data.datamodule`) the data; the Trainer the loop, devices, checkpoints and
loggers.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import ExitStack
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from .callbacks import (EpochMetricsCSV, ProgressBar, RunCheckpoint, SafeCheckpointIO,
                        SameWeightsOnAllRanks, SaveWeightsEvery, StopAtTimeBudget,
                        StopOnNonFinite, budget_left)
from .data.augment import AUGMENT_FLAGS
from .data.datamodule import ImageDataModule
from .data.datasets import refuse_changed_pool
from .data.generated import check_training
from .data.registry import refuse_mirroring
from .errors import CapsnetError, first_line
from .lit import LitCapsNet
from .metrics import read_metrics
from .runtime import (refuse_fp16_on_cpu, retain_freed_memory, run_folder_lock,
                      trainer_devices)
from .settings import (DEFAULTS, check_folder_setting, check_settings, load_run_settings,
                       refuse_changes_on_resume, refuse_foreign_config, save_run_settings)


def model_config(s: dict, classes, shape) -> dict:
    """The architecture's config dict from the settings and the data's shape and classes."""
    from .models import architecture
    if shape[1] != shape[2]:
        raise CapsnetError(f"square images expected, got {shape[1]}x{shape[2]}")
    config = {"in_channels": shape[0], "image_size": shape[1], "num_classes": len(classes),
              "routing_iterations": s["routing_iterations"],
              "detach_routing": s["detach_routing"],
              "stem": s["stem"], "stem_channels": s["stem_channels"],
              "recon_size": s["recon_size"]}
    fields = architecture(s["arch"])[0].__dataclass_fields__
    for key in ("routing_iterations", "detach_routing", "stem", "stem_channels", "recon_size"):
        if key not in fields:
            if s[key] != DEFAULTS[key]:
                raise CapsnetError(f"--{key.replace('_', '-')} does not apply to {s['arch']}")
            del config[key]
    return config


def data_options(s: dict) -> dict:
    """The settings that shape a dataset read from the user's own images (folder,
    multilabel); recorded in the checkpoint so that evaluation reads the same test split."""
    return {"image_size": s["image_size"], "test_fraction": s["test_fraction"]}


def dm_sized(s: dict) -> bool:
    """Whether the dataset takes ``image_size``/``test_fraction`` (read from the user's own
    images); elsewhere an ``--image-size`` is refused by the registry."""
    from .data.registry import dataset_info
    return dataset_info(s["dataset"]).sized_by_option or s["image_size"] is not None


def build_module(s: dict, classes, shape, crop: int | None = None,
                 multi_label: bool = False, train_pool: str | None = None) -> LitCapsNet:
    augment = {k: s[k] for k in AUGMENT_FLAGS}
    augment["crop"] = crop or 0
    model = model_config(s, classes, shape)
    if multi_label:
        model["multi_label"] = True
    try:  # the model's own checks (sizes that do not fit the images) as one-line errors
        return LitCapsNet(arch=s["arch"], model=model, augment=augment, lr=s["lr"],
                          lr_decay=s["lr_decay"], data_options=data_options(s),
                          lr_decay_steps=s["lr_decay_steps"], lr_schedule=s["lr_schedule"],
                          weight_decay=s["weight_decay"], sam=s["sam"],
                          warmup_steps=s["warmup_steps"], ema=s["ema"], swa=s["swa"],
                          recon_weight=s["recon_weight"],
                          classes=list(classes), dataset=s["dataset"],
                          channels_last=s["channels_last"], train_pool=train_pool,
                          teacher_weight=s["teacher_weight"] if s["teacher"] else 0.0)
    except ValueError as e:
        raise CapsnetError(f"{s['arch']}: {e}") from None


def _check_resumable(path: Path, module: LitCapsNet) -> None:
    """One-line error unless ``path`` loads without code and fits ``module`` exactly.

    Lightning would otherwise fail deep inside ``fit`` with a traceback.
    """
    from .checkpoints import safe_load
    ckpt = safe_load(path)
    state = ckpt.get("state_dict")
    if not isinstance(state, dict) or "optimizer_states" not in ckpt:
        raise CapsnetError(f"{path}: not a capsnet training checkpoint (nothing to resume)")
    refuse_changed_pool((ckpt.get("hyper_parameters") or {}).get("train_pool"),
                        module.hparams.train_pool, path,
                        "resuming would carve another validation split, partly from images "
                        "trained on")
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as e:
        raise CapsnetError(f"{path}: does not fit this run's model ({first_line(e)[:160]})"
                           ) from None


def _load_init(spec: str, module: LitCapsNet) -> None:
    """Start ``module`` from the weights of a trained model (``--init``): the weights that
    were evaluated there (the average, if it had one); optimizer and schedule start anew.
    One-line error unless it is the same architecture with the same shapes."""
    from .checkpoints import load_model
    model, meta = load_model(spec)
    arch = module.hparams.arch
    if meta["arch"] != arch:
        raise CapsnetError(f"--init {spec}: holds a {meta['arch']}, this run trains a {arch}")
    try:
        module.model.load_state_dict(model.state_dict())
    except RuntimeError as e:
        raise CapsnetError(f"--init {spec}: does not fit this run's model "
                           f"({first_line(e)[:160]})") from None


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


def _process_device(s: dict) -> torch.device:
    """The device this process trains on, for work done before Lightning places the model:
    ``--device``'s, or under DDP on GPUs this process's (Lightning's ``LOCAL_RANK``)."""
    from .runtime import torch_device
    device = torch_device(s["device"])
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def is_main_process() -> bool:
    """False in the extra processes of a data-parallel run (launched by Lightning, torchrun
    or SLURM), which must not write the run's files a second time."""
    from lightning.pytorch.utilities import rank_zero_only
    return rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") == "0"


def train(settings: dict, resume: bool = False) -> list[dict]:
    """Run (or continue, with ``resume``) a training run; returns the rows of metrics.csv.

    With ``devices``/``num_nodes`` above 1 (``strategy="ddp"``) Lightning starts the other
    processes by running the same command again; each runs this function, and only the main
    one writes files and prints. The main one holds the run folder while it runs
    (:func:`~capsnet.runtime.run_folder_lock`).
    """
    with ExitStack() as held:
        return _train(settings, resume, held)


def _train(settings: dict, resume: bool, held: ExitStack) -> list[dict]:
    out = Path(check_folder_setting("out", {**DEFAULTS, **settings}["out"]))
    if out.exists() and not out.is_dir():  # said now, not after the data has been read
        raise CapsnetError(f"--out {out}: a file, not a folder")
    main = is_main_process()
    locked = main and out.is_dir()
    if locked:  # before anything is read from it: a run still writing there stops this one
        held.enter_context(run_folder_lock(out))
    # A resumed run starts from its own config.yaml, under the settings given here (the CLI
    # has merged it already; the Python API's train({"out": run}, resume=True) has not, and
    # would otherwise put back the defaults of what it leaves out, e.g. --hflip).
    run = load_run_settings(out) if resume and (out / "config.yaml").is_file() else None
    s = check_settings({**DEFAULTS, **(run or {}), **settings})
    check_training(s)  # the generated datasets' and the CNN baselines' one-line refusals
    if s["data_dir"]:  # recorded absolute: evaluate and report find it from any folder
        s["data_dir"] = str(Path(s["data_dir"]).expanduser().resolve())
    if s["teacher"]:  # files recorded absolute (not shipped names): --resume needs them
        from .distill import teacher_specs
        specs = [str(Path(t).expanduser().resolve()) if Path(t).expanduser().is_file() else t
                 for t in teacher_specs(s["teacher"])]
        s["teacher"] = specs[0] if len(specs) == 1 else specs
    last = out / "last.ckpt"
    if run is not None:
        refuse_changes_on_resume(run, s)
    if resume and not last.is_file():
        raise CapsnetError(f"--resume {out}: no last.ckpt there to resume from")
    if resume and s["max_minutes"]:
        fits, used, epoch = budget_left(read_metrics(out / "metrics.csv"), s["max_minutes"])
        if not fits:
            raise CapsnetError(f"--resume {out}: {used:.2f} of its --max-minutes "
                               f"{s['max_minutes']:g} are used and an epoch takes about "
                               f"{epoch:.2f}; give a larger --max-minutes, or 0 for none")
    if not resume and last.exists():
        raise CapsnetError(f"{out} already holds a run (last.ckpt); use --resume {out} to "
                           "continue it or --out to start a new one")
    accelerator, devices = trainer_devices(s["device"], s["devices"], s["num_nodes"],
                                           s["strategy"])
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    elif accelerator == "cpu" and s["devices"] > 1:  # share the cores among the processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // s["devices"]))
    refuse_fp16_on_cpu(s["precision"], accelerator)
    if accelerator == "cpu":
        retain_freed_memory()  # faster CPU steps: see `capsnet bench --no-retain-memory`
    L.seed_everything(s["seed"], verbose=False)
    dm = ImageDataModule(s["dataset"], s["data_dir"], s["batch_size"], s["eval_batch_size"],
                         s["train_size"], s["val_size"], s["test_size"], seed=s["seed"],
                         options=data_options(s) if dm_sized(s) else None,
                         val_size_origin=f"{out / 'config.yaml'}: its val_size" if run
                         else "--val-size")
    dm.setup("fit")
    world = s["devices"] * s["num_nodes"]
    for name, split in {"training": dm.train, **dm.eval_splits()}.items():
        if len(split) < world:  # a process without images would average over none (NaN)
            raise CapsnetError(f"the {name} split has {len(split)} image(s), fewer than "
                               f"the {world} processes; each process needs at least one")
    if s["hflip"]:
        refuse_mirroring(s["dataset"], "--hflip")
    teachers = None
    if s["teacher"] is not None:  # checked now; they score the images once the folder exists
        from .distill import load_teacher, teacher_specs
        if dm.multi_label or dm.info.protocol or dm.info.crop:
            raise CapsnetError(f"--teacher applies to single-label datasets whose training "
                               f"images are served as the model sees them, not to "
                               f"{s['dataset']}")
        # Building the teacher draws random initial weights before loading its own: off the
        # run's random stream, so a seed gives the same run with and without a teacher.
        with torch.random.fork_rng(devices=[]):
            teachers = [load_teacher(spec, dm.train, s, dm.pool, _process_device(s))
                        for spec in teacher_specs(s["teacher"])]
    module = build_module(s, dm.classes, dm.shape, dm.info.crop, dm.multi_label, dm.pool)
    if resume:
        _check_resumable(last, module)
    elif s["init"] is not None:
        _load_init(s["init"], module)
    module.split_names = list(dm.eval_splits())
    refuse_foreign_config(out, resume)  # in every process, so that all of them stop
    if main:  # only now: a run refused above (data, flags, --init) leaves no folder behind
        out.mkdir(parents=True, exist_ok=True)
        if not locked:  # a new folder: held before this run writes its first file
            held.enter_context(run_folder_lock(out))
        for stale in out.glob("*.*.tmp"):  # atomic_write's, left by a run killed while saving
            stale.unlink()
        save_run_settings(out, s)
    n = module.model.num_parameters()
    parallel = (f"; {world} processes, global batch {world * s['batch_size']}"
                if world > 1 else "")
    if main:
        print(f"{s['arch']}: {n:,} parameters ({n / 1e6:.1f}M); {len(dm.train):,} training images, "
          f"{', '.join(f'{len(d):,} {k}' for k, d in dm.eval_splits().items())}; "
          f"device {accelerator}; {torch.get_num_threads()} threads{parallel}", flush=True)
        if s["init"] is not None and not resume:
            print(f"starting from the weights of {s['init']}", flush=True)
    if teachers is not None:
        from .distill import teacher_targets
        init = Path(s["init"]) if s["init"] is not None else None
        dm.train_targets = teacher_targets(teachers, s["teacher"], dm.train, s["teacher_tta"],
                                           s["eval_batch_size"], out, main=main,
                                           resume=resume,
                                           earlier=init.parent if init and init.is_file()
                                           else None)
        del teachers  # their weights are not needed any more

    # best.ckpt follows validation accuracy; the test set never chooses anything, so without
    # a validation split there is only last.ckpt.
    has_val = dm.val is not None
    score = "val/f2" if dm.multi_label else "val/acc"
    # last.ckpt has its own callback, saved after every epoch: Lightning's `save_last=True`
    # refreshes it only in epochs that also saved best.ckpt, so it would fall behind (and a
    # resume repeat epochs) whenever the validation accuracy did not improve.
    # best.ckpt's callback comes first, so that last.ckpt records its epoch's score too
    # (RunCheckpoint says why).
    checkpoints = [RunCheckpoint(dirpath=out, filename="best", monitor=score, mode="max",
                                 save_top_k=1, enable_version_counter=False,
                                 auto_insert_metric_name=False)] if has_val else []
    checkpoints.append(RunCheckpoint(dirpath=out, filename="last", monitor=None, save_top_k=1,
                                     enable_version_counter=False))
    callbacks = [StopOnNonFinite(), *checkpoints, EpochMetricsCSV(out / "metrics.csv"),
                 SameWeightsOnAllRanks()]
    if s["max_minutes"]:
        callbacks.append(StopAtTimeBudget(out, s["max_minutes"]))
    if s["save_every_steps"]:
        callbacks.append(SaveWeightsEvery(out, s["save_every_steps"], s["val_size"]))
    if s["progress"]:
        callbacks.append(ProgressBar(refresh_rate=max(1, s["log_every"] // 4)))
    callbacks += _extra_callbacks(s, dm)
    logger = (TensorBoardLogger(save_dir=out, name="tensorboard", version="")
              if s["tensorboard"] else False)
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=s["num_nodes"],
        strategy=s["strategy"], use_distributed_sampler=False,  # ShardedBatches does it
        # Batch norm (Efficient-CapsNet) over the global batch; PyTorch's SyncBatchNorm runs
        # on GPUs only, so CPU processes keep per-process statistics (docs/distributed.md).
        sync_batchnorm=accelerator == "gpu" and world > 1,
        max_epochs=s["epochs"],
        precision=s["precision"],
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
        # Evaluation metrics are summed across processes by LitCapsNet itself.
        warnings.filterwarnings("ignore", ".*sync_dist=True.*when logging on epoch level.*")
        warnings.filterwarnings("ignore", ".*all_gather is deprecated.*")
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=str(last) if resume else None,
                        weights_only=True)
        except SystemExit:  # Lightning's graceful shutdown after Ctrl-C
            if last.is_file() and main:
                print(f"capsnet: interrupted; continue with: capsnet train --resume {out}")
            raise
    return read_metrics(out / "metrics.csv")


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # quiet TensorBoard's optional TF import
# Lightning's start-up banner (GPU/TPU availability, tips) is noise in a CLI.
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
