"""The ``capsnet`` command: train, evaluate, predict, export, bench, report, visdom.

Every command's module is imported only when that command runs, so ``capsnet --help`` and
``capsnet predict`` load neither Lightning nor TensorBoard.

Every user error ends in one line ``capsnet: error: ...`` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import CapsnetError, check_not_negative, check_positive

THREADS_HELP = "CPU threads (default: torch's choice)"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (not the whole usage) and exit code 2:
    "capsnet evaluate: error: argument --threads: invalid int value: 'x' (see capsnet
    evaluate --help)", with the "error:" every other refusal carries."""

    def error(self, message: str):
        raise CapsnetError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _flag(p, name: str, help: str, **kw):
    """A flag whose absence means "not given" (so config files and resumed runs fill it)."""
    p.add_argument("--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS,
                   help=help, **kw)


def _train_parser(sub) -> None:
    from .settings import DEFAULTS as D, PRECISIONS, TTA
    p = sub.add_parser("train", help="train a capsule network", description=(
        "Train a CapsNet. Settings: defaults < --config YAML < the resumed run's config.yaml "
        "< flags."))
    p.add_argument("--config", help="YAML file of settings (keys as the flags, - or _)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its "
                   "last.ckpt (flags given here, e.g. --epochs, override its settings)")
    bool_ = argparse.BooleanOptionalAction
    flags = [
        ("arch", "a registered architecture (capsnet.models.ARCHITECTURES: capsnet, "
                 "efficient-capsnet, and the paper's CNN baselines baseline-cnn and "
                 f"baseline-cnn-multi) (default {D['arch']})", {}),
        ("dataset", "a registered dataset (`capsnet datasets` lists them: fashion-mnist, "
                    "mnist, cifar10, cifar100, svhn, smallnorb, folder, multilabel, "
                    "multi-fashion-mnist, fashion-mnist-expanded, ...; see "
                    f"docs/robustness.md) (default {D['dataset']})", {}),
        ("data_dir", "folder holding the dataset's files; the only place looked at and the "
                     "download target when given", {}),
        ("out", f"run directory for checkpoints and logs (default {D['out']})", {}),
        ("epochs", f"default {D['epochs']}", {"type": int}),
        ("max_minutes", "a budget of training time: no new epoch starts unless it is expected "
                        "to end within M minutes of the run's training (resumes included; "
                        "the first epoch always runs) (default 0: none)",
         {"type": float, "metavar": "M"}),
        ("batch_size", f"default {D['batch_size']}", {"type": int}),
        ("eval_batch_size", f"default {D['eval_batch_size']}", {"type": int}),
        ("lr", f"Adam learning rate (default {D['lr']})", {"type": float}),
        ("weight_decay", "decoupled weight decay (AdamW instead of Adam) of the weight "
                         "matrices and kernels, not of biases and normalization scales "
                         f"(default {D['weight_decay']}: none)", {"type": float}),
        ("sam", "sharpness-aware minimization (Foret et al. 2021): each step takes the "
                "gradient at the weights moved by this distance along the gradient, e.g. "
                "0.05; two forward and backward passes per step "
                f"(default {D['sam']}: off)", {"type": float, "metavar": "RHO"}),
        ("lr_schedule", "exp (the authors': lr x lr_decay^(step / lr_decay_steps)), cosine "
                        "(to 0 at the last step) or constant "
                        f"(default {D['lr_schedule']})",
         {"choices": ["exp", "cosine", "constant"]}),
        ("warmup_steps", "linear learning-rate warm-up steps for cosine and constant "
                         "(default 0)", {"type": int}),
        ("ema", "exponential moving average of the weights, e.g. 0.999; evaluated and "
                "checkpointed as the model (default 0: off)", {"type": float}),
        ("swa", "stochastic weight averaging: the equal-weight mean of the weights after "
                "every step of this run is evaluated and checkpointed as the model; meant "
                "with --init and --lr-schedule constant (default off)", {"action": bool_}),
        ("init", "start from the weights of MODEL (a checkpoint, a .safetensors file or a "
                 "shipped model's name) with a new optimizer and schedule; same "
                 "architecture and shapes (default: random weights)", {"metavar": "MODEL"}),
        ("teacher", "distill from MODEL (a checkpoint, a .safetensors file or a shipped "
                    "model's name, trained on this run's training split): its capsule "
                    "lengths on the training images are extra targets (capsnet.distill); "
                    "given more than once, the teachers' mean lengths, an ensemble's "
                    "(default: none)", {"metavar": "MODEL", "action": "append"}),
        ("teacher_weight", "weight of the distillation loss, the squared distance between "
                           f"the lengths and the teacher's (default {D['teacher_weight']})",
         {"type": float}),
        ("teacher_tta", "the teacher's test-time views averaged into its targets "
                        f"(default {D['teacher_tta']})", {"choices": TTA}),
        ("lr_decay", f"learning-rate factor per --lr-decay-steps (default {D['lr_decay']})",
         {"type": float}),
        ("lr_decay_steps", f"default {D['lr_decay_steps']}", {"type": int}),
        ("routing_iterations", f"routing-by-agreement iterations (default "
                               f"{D['routing_iterations']})", {"type": int}),
        ("detach_routing", "no gradient through the intermediate routing iterations "
                           "(cheaper; the paper's authors let it flow)", {"action": bool_}),
        ("stem", "capsnet: strided 3x3 convolutions before Conv1, each halving the image, "
                 "for large images (suggested: halve until the side is at most 32: 1 for "
                 "64 px, 2 for 96-128, 3 for 224; capsnet.models.capsnet.suggest_stem) "
                 f"(default {D['stem']}: none, the paper's model)", {"type": int}),
        ("stem_channels", f"channels of every stem convolution (default {D['stem_channels']})",
         {"type": int}),
        ("recon_size", "capsnet: the decoder reconstructs the image area-averaged to this "
                       "side, e.g. 64 for 224 px images (default 0: the image's own size, "
                       "the paper's decoder)", {"type": int}),
        ("recon_weight", f"reconstruction loss weight (default {D['recon_weight']})",
         {"type": float}),
        ("shift", f"max random shift in pixels (default {D['shift']})", {"type": int}),
        ("rotate", "max random rotation in degrees (default 0: off)", {"type": float}),
        ("scale", "max relative random scaling, e.g. 0.1 (default 0: off)", {"type": float}),
        ("shear", "max random shear in degrees (default 0: off)", {"type": float}),
        ("translate", "max random affine translation, fraction of the side (default 0)",
         {"type": float}),
        ("hflip", "random horizontal flips (default off)", {"action": bool_}),
        ("erase", "probability of random erasing: a rectangle of 2-40%% of the image set "
                  "to 0 (default 0: off)", {"type": float}),
        ("train_size", "use only the first N training images", {"type": int}),
        ("val_size", "carve N validation images (class-stratified, fixed seed) out of the "
                     f"training set; best.ckpt follows them (default {D['val_size']}; 0: "
                     "no validation, no best.ckpt)",
         {"type": int}),
        ("test_size", "evaluate on the first N test images only (default: all)",
         {"type": int}),
        ("image_size", "resize image-folder and multi-label data to N x N (default 32)",
         {"type": int}),
        ("test_fraction", "share of an image folder without train/ and test/ sub-folders "
                          f"held out as its test set (seeded) (default {D['test_fraction']})",
         {"type": float}),
        ("seed", f"default {D['seed']}", {"type": int}),
        ("device", "auto, cpu, cuda or cuda:N (default auto)", {}),
        ("devices", "processes (CPU) or GPUs per machine; more than 1 needs --strategy ddp "
                    f"(default {D['devices']})", {"type": int}),
        ("num_nodes", f"machines (default {D['num_nodes']}); see docs/distributed.md",
         {"type": int}),
        ("strategy", "auto (one process) or ddp (one process per device, gradients "
                     "averaged; gloo on CPU, NCCL on GPU) (default auto)",
         {"choices": ["auto", "ddp"]}),
        ("precision", "32, bf16-mixed or 16-mixed (GPU only) (default 32)",
         {"choices": PRECISIONS}),
        ("threads", THREADS_HELP, {"type": int}),
        ("channels_last", "channels-last convolutions (default on: faster on CPU)",
         {"action": bool_}),
        ("log_every", f"log and refresh every N steps (default {D['log_every']})",
         {"type": int}),
        ("save_every_steps", "also keep the evaluated weights every N training steps as "
                             "OUT/step-NNNNNN.safetensors, for comparisons finer than an "
                             "epoch (default 0: off)", {"type": int}),
        ("tensorboard", "TensorBoard logs in OUT/tensorboard (default on)", {"action": bool_}),
        ("progress", "progress bar (default on)", {"action": bool_}),
        ("visdom", "stream to a Visdom server (default off)", {"action": bool_}),
        ("visdom_server", f"default {D['visdom_server']}", {}),
        ("visdom_port", f"default {D['visdom_port']}", {"type": int}),
        ("visdom_env", f"default {D['visdom_env']}", {}),
    ]
    assert {f[0] for f in flags} == set(D), "every setting needs a flag"
    for name, help_, kw in flags:
        _flag(p, name, help_, **kw)


def _cmd_train(a) -> int:
    from .settings import load_run_settings, read_config
    from .train import is_main_process, train
    flags = {k: v for k, v in vars(a).items() if k not in ("command", "config", "resume")}
    settings = {}
    if a.config:
        settings.update(read_config(a.config))
    if a.resume:
        if "out" in flags and flags["out"] != a.resume:
            raise CapsnetError("--resume DIR continues in DIR; do not also give --out")
        settings.update(load_run_settings(a.resume))
    settings.update(flags)
    rows = train(settings, resume=bool(a.resume))
    if rows and is_main_process():
        last = rows[-1]
        split = "val" if "val_acc" in last else "test"
        # metrics.csv counts epochs from 0 (Lightning's count); people, the report's curves
        # and the docs from 1: "after epoch 2" is the end of a 2-epoch run. With a validation
        # split the test figure is not printed: it is a record in metrics.csv, and a number
        # on the screen at the end of a run is one that invites choosing by it.
        if split == "test":
            print(f"after epoch {last['epoch'] + 1}: test accuracy "
                  f"{last.get('test_acc', float('nan')):.4f}")
        else:  # best.ckpt: the first epoch of the highest score (ties keep it)
            print(f"after epoch {last['epoch'] + 1}: val accuracy {last['val_acc']:.4f} "
                  "(each epoch's test accuracy: metrics.csv, a record)")
            key = "val_f2" if "val_f2" in last else "val_acc"
            best = max(rows, key=lambda r: (r.get(key, float("-inf")), -r["epoch"]))
            print(f"best.ckpt: epoch {best['epoch'] + 1}, "
                  f"{'val F2' if key == 'val_f2' else 'val accuracy'} {best[key]:.4f}")
    return 0


def _model_arg(p, help_extra: str = "", nargs: str | None = None) -> None:
    from .shipped import SHIPPED  # no torch: --help stays fast
    p.add_argument("model", metavar="MODEL", nargs=nargs, help="a shipped model's name "
                   f"({', '.join(SHIPPED)}), a .safetensors weights file or a training "
                   "checkpoint (.ckpt)" + help_extra)


def _print_multilabel(result: dict) -> None:
    print(f"multi-label: exact-match {result['accuracy']:.4f}, mean F2 {result['f2']:.4f}, "
          f"mAP {result['mAP']:.4f}")
    width = max(len(c) for c in result["classes"])
    print(f"  {'label':<{width}}  precision  recall  F1      AP      support")
    for name, r in result["per_label"].items():
        print(f"  {name:<{width}}  {r['precision']:.4f}     {r['recall']:.4f}  {r['f1']:.4f}"
              f"  {r['ap']:.4f}  {r['support']}")


def _loss_terms(result: dict) -> str:
    """What the loss is made of: margin and reconstruction, or a CNN baseline's own."""
    kind = result.get("objective", "margin")
    if kind == "margin":
        return (f"margin {result['margin_loss']:.4f}, "
                f"reconstruction SSE {result['reconstruction_sse']:.2f}")
    return f"{kind.replace('_', '-')}; a CNN baseline, no reconstruction"


def _print_pairs(model, result: dict) -> None:
    both = " of both garments" if result.get("objective", "margin") == "margin" else ""
    print(f"{model}: pair accuracy {result['accuracy']:.4f} on {result['n']:,} test pairs "
          f"(both classes are the two highest scores), loss {result['loss']:.4f} "
          f"({_loss_terms(result)}{both})")
    width = max(len(c) for c in result["classes"])
    print("per class: share of the pairs holding it that have it among their two highest "
          "scores")
    for name, share in result["per_class"].items():
        print(f"  {name:<{width}}  {share:.4f}")


def _cmd_datasets(a) -> int:
    from .data.registry import cmd_datasets
    return cmd_datasets(a)


def _check_tta(tta: str, dataset: str) -> None:
    """`--tta` of evaluate and predict: a mirrored view only where a mirror keeps the class."""
    if "hflip" in tta:
        from .data.registry import refuse_mirroring
        refuse_mirroring(dataset, f"--tta {tta}")


def _set_threads(threads: int | None) -> None:
    """`--threads` of evaluate and predict (train has its own setting): torch's CPU threads,
    e.g. 1 beside a training run rather than two threads each on two cores."""
    if threads is None:
        return
    check_positive(("--threads", threads))
    import torch
    torch.set_num_threads(threads)


def _set_routing_iterations(model, r: int, path) -> None:
    """`--routing-iterations`: run dynamic routing (Procedure 1) with ``r`` iterations at
    inference instead of the number the model was trained with (its config keeps that)."""
    from .models import CapsNet, arch_name
    if not isinstance(model, CapsNet):
        raise CapsnetError(f"{path}: --routing-iterations applies to the paper's CapsNet "
                           f"(dynamic routing), not to {arch_name(model)}")
    model.digits.iterations = r


def _cmd_evaluate(a) -> int:
    from .shipped import resolve
    for spec in a.model:  # before torch loads: a wrong path fails at once
        resolve(spec)
    import torch
    from .checkpoints import load_model
    from .evaluate import (check_ensemble, evaluate, evaluate_ensemble, evaluation_data,
                           recon_weight_of, write_predictions)
    from .runtime import torch_device
    check_positive(("--batch-size", a.batch_size), ("--test-size", a.test_size),
                   ("--routing-iterations", a.routing_iterations))
    _set_threads(a.threads)
    device = torch_device(a.device)
    loaded = [load_model(path, device) for path in a.model]
    if a.routing_iterations:
        for path, (m, _) in zip(a.model, loaded):
            _set_routing_iterations(m, a.routing_iterations, path)
    model, meta = loaded[0]
    dataset = a.dataset or meta["dataset"]
    _check_tta(a.tta, dataset)
    check_ensemble(a.model, loaded)
    test = evaluation_data(a.model[0], model, meta, a.split, dataset, a.data_dir)
    for path, (other, other_meta) in zip(a.model[1:], loaded[1:]):
        # An ensemble is scored on one set: a member's own split must be the same images
        # (a validation split carved otherwise could hold another member's training images).
        own = evaluation_data(path, other, other_meta, a.split, dataset, a.data_dir)
        if not (torch.equal(own.images, test.images) and torch.equal(own.labels, test.labels)):
            raise CapsnetError(f"{path}: its {a.split} images are not those of {a.model[0]}; "
                               "an ensemble is evaluated on one set")
    if a.test_size:
        test.images, test.labels = test.images[:a.test_size], test.labels[:a.test_size]
    keep = a.predictions is not None
    if keep:  # before the (long) evaluation: a file that cannot be written fails at once
        from .data.multi import is_pair_set
        if is_pair_set(test) or test.labels.dim() == 2:
            raise CapsnetError("--predictions is offered for single-label classification "
                               "only, not for pairs or multi-label data")
        from .checkpoints import output_file
        from .evaluate import is_predictions_file
        target = output_file(a.predictions, is_predictions_file,
                             "a predictions file of capsnet evaluate")
    # Each model's own reconstruction weight (its run's), as in report.
    weights = [recon_weight_of(m) for _, m in loaded]
    if len(loaded) == 1:
        result = evaluate(model, test, a.batch_size, device, weights[0], a.tta, keep)
        result.update(model=str(a.model[0]))
    else:
        result = evaluate_ensemble([m for m, _ in loaded], test, a.batch_size, device,
                                   weights, a.tta, keep)
        result.update(model="ensemble", members=[str(p) for p in a.model])
    if keep:
        write_predictions(target, result.pop("lengths"), test.labels, list(test.classes))
        result.update(predictions=a.predictions)
    result.update(split=a.split, tta=a.tta)
    if a.routing_iterations:
        result.update(routing_iterations=a.routing_iterations)
    if a.json:
        print(_json(result))
        return 0
    if result.get("pairs"):
        _print_pairs(a.model[0], result)
        return 0
    from .settings import TTA_WORDS
    how = TTA_WORDS[a.tta]  # how each image was scored: its views, the routing iterations
    if a.routing_iterations:
        r = a.routing_iterations
        how += f", {r} routing iteration{'s' if r > 1 else ''}"
    name = a.model[0] if len(a.model) == 1 else f"ensemble of {len(a.model)} models"
    mean = "" if len(a.model) == 1 else "; the members' mean"
    low, high = result.get("accuracy_interval", (None, None))
    interval = "" if low is None else f" (95% interval {low:.4f}-{high:.4f})"
    print(f"{name}: accuracy {result['accuracy']:.4f}{interval} on {result['n']:,} "
          f"{'validation' if a.split == 'val' else 'test'} images{how}, "
          f"loss {result['loss']:.4f} ({_loss_terms(result)}{mean})")
    against = [None, *result.get("member_against_first", [])]
    for path, acc, vs in zip(result.get("members", []), result.get("member_accuracy", []),
                             against):
        paired = "" if vs is None else (
            f"; against the first, right on {vs['gained']} images it got wrong and wrong on "
            f"{vs['lost']} it got right (exact McNemar p = {vs['p_value']:.3g})")
        print(f"  member {path}: accuracy {acc:.4f} alone{paired}")
    if result.get("multi_label"):
        _print_multilabel(result)
        return 0
    width = max(len(c) for c in result["classes"])
    print("per-class accuracy:")
    for name, acc in result["per_class"].items():
        print(f"  {name:<{width}}  {acc:.4f}")
    print("confusion matrix (rows: true class, columns: predicted):")
    for name, row in zip(result["classes"], result["confusion"]):
        print(f"  {name:<{width}}  " + " ".join(f"{v:5d}" for v in row))
    if keep:
        print(f"one row per image: {a.predictions}")
    return 0


def _looks_like_model(arg: str) -> bool:
    from .shipped import SHIPPED
    return arg in SHIPPED or arg.endswith((".ckpt", ".safetensors"))


def _json(obj) -> str:
    """``obj`` as strict JSON: a figure that does not exist (NaN: the average precision of a
    label without a true image) is null, which every JSON parser reads."""
    def clean(x):
        if isinstance(x, float) and x != x:
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        return [clean(v) for v in x] if isinstance(x, (list, tuple)) else x
    return json.dumps(clean(obj), allow_nan=False)


def _cmd_predict(a) -> int:
    from .shipped import DEFAULT_MODEL, resolve
    images = list(a.images)
    specs = list(a.model or [])
    if not specs and len(images) > 1 and _looks_like_model(images[0]):
        specs = [images.pop(0)]  # the older form: capsnet predict MODEL IMAGE...
    specs = specs or [DEFAULT_MODEL]  # -m '' is refused, not the default
    for spec in specs:
        resolve(spec)  # before torch loads: a wrong path fails at once
    _set_threads(a.threads)
    from .checkpoints import load_model
    from .evaluate import check_ensemble, model_input, predict_ensemble
    loaded = [load_model(spec) for spec in specs]
    model, meta = loaded[0]
    _check_tta(a.tta, meta["dataset"])
    check_ensemble(specs, loaded)
    if len(loaded) > 1 and any(getattr(m.config, "multi_label", False) for m, _ in loaded):
        raise CapsnetError("an ensemble predicts single-label classes only, not multi-label "
                           "tags")
    status = 0
    for path in images:
        try:  # each member gets the image as its own training images were made
            xs = [model_input(path, m.config, mm["dataset"], a.invert, a.fit)
                  for m, mm in loaded]
        except CapsnetError as e:
            print(f"capsnet: error: {e}", file=sys.stderr)
            status = 2
            continue
        (res,) = predict_ensemble([(m, x.unsqueeze(0)) for (m, _), x in zip(loaded, xs)],
                                  meta["classes"], a.tta)
        res["file"] = str(path)
        if a.json:
            print(_json(res))
        else:
            lengths = " ".join(f"{v:.3f}" for v in res["lengths"])
            from .models import is_capsule_model
            present = (f"; present: {', '.join(res['present']) or 'none'}"
                       if "present" in res else "")  # a multi-label model
            if is_capsule_model(model):
                print(f"{path}: {res['class']} (|v| = {max(res['lengths']):.3f}){present}; "
                      f"capsule lengths: {lengths}")
            else:  # a CNN baseline: class probabilities
                print(f"{path}: {res['class']} (p = {max(res['lengths']):.3f}); "
                      f"class probabilities: {lengths}")
    return status


def _cmd_export(a) -> int:
    from .shipped import resolve
    resolve(a.model)  # before torch loads: a wrong path fails at once
    from .export import export
    out = export(a.model, a.out, dtype=a.dtype, batch=a.batch)
    print(out)
    return 0


def _cmd_bench(a) -> int:
    from .bench import cmd_bench
    return cmd_bench(a)


def _cmd_report(a) -> int:
    from .shipped import check_run_or_model
    check_not_negative(("--mistakes", a.mistakes))
    check_positive(("--batch-size", a.batch_size))
    check_run_or_model(a.run_dir)  # before torch loads: a wrong path fails at once
    from .report import build_report
    index = build_report(a.run_dir, a.checkpoint, a.data_dir, a.dataset, a.test_size,
                         a.samples, a.mistakes, a.device, a.batch_size, out=a.out)
    print(index)
    return 0


def _cmd_visdom(a) -> int:
    from .visdom_server import serve
    serve(host=a.host, port=a.port, env_path=a.env_path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="capsnet", description="Capsule networks (Sabour, Frosst & Hinton 2017; "
                "Efficient-CapsNet 2021) on Fashion-MNIST: train, evaluate, predict, export, "
                "benchmark, explain.")
    from . import __version__
    from .settings import FITS, PRECISIONS, TTA
    p.add_argument("--version", action="version", version=f"capsnet {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_parser(sub)

    e = sub.add_parser("evaluate", help="test-set accuracy, losses, confusion matrix")
    _model_arg(e, "; several: an ensemble, each image scored by the mean of their capsule "
               "lengths", nargs="+")
    e.add_argument("--dataset", help="default: the one the model was trained on")
    e.add_argument("--data-dir", help="default: the run's data_dir (or the usual places)")
    e.add_argument("--batch-size", type=int, default=512)
    e.add_argument("--test-size", type=int, help="first N images of the split only")
    e.add_argument("--split", choices=["test", "val"], default="test",
                   help="val: the validation images of the checkpoint's run (its config.yaml), "
                   "to choose by; test: the test set (default)")
    e.add_argument("--tta", choices=TTA, default="none",
                   help="score each image by the mean capsule lengths of views of it: hflip "
                   "its mirror image (clothing and objects only), shift its four one-pixel "
                   "shifts, shift+hflip both; gridR all shifts by up to R pixels along each "
                   "axis, gridR+hflip with the mirror of each")
    e.add_argument("--routing-iterations", type=int, metavar="R",
                   help="dynamic routing with R iterations instead of the number the model "
                   "was trained with (the paper's CapsNet only)")
    e.add_argument("--device", default="auto")
    e.add_argument("--threads", type=int, help=THREADS_HELP)
    e.add_argument("--json", action="store_true", help="one JSON object on stdout")
    e.add_argument("--predictions", metavar="CSV",
                   help="also write one row per image: index, true and predicted class, "
                   "correct (1/0) and every class's score (single-label data)")

    r = sub.add_parser("predict", help="classify image files (PNG, JPEG, GIF, ...)")
    r.add_argument("images", nargs="+", metavar="IMAGE")
    r.add_argument("-m", "--model", action="append",
                   help="a shipped model's name, a .safetensors weights file or a checkpoint "
                   "(default: the shipped fashion-mnist model); given more than once, an "
                   "ensemble: each image scored by the mean of the models' capsule lengths, "
                   "as in `capsnet evaluate A B`")
    r.add_argument("--invert", choices=["auto", "yes", "no"], default="auto",
                   help="invert to light-on-dark like Fashion-MNIST (auto: if the model was "
                        "trained on Fashion-MNIST or MNIST and the border is light)")
    r.add_argument("--fit", choices=FITS, default="auto",
                   help="a non-square image: as the model's training images were made "
                        "(auto, the default: the centre square for your folders; padded, "
                        "resized to 48 and centre-cropped to 32 for smallNORB; padded for "
                        "the rest), padded to a square with its border colour (pad), "
                        "stretched, or cropped to its centre square")
    r.add_argument("--tta", choices=TTA, default="none",
                   help="as for evaluate: the mean capsule lengths of the image's mirror "
                   "image (hflip), its four one-pixel shifts (shift), both, or its shifts "
                   "by up to R pixels (gridR, gridR+hflip)")
    r.add_argument("--threads", type=int, help=THREADS_HELP)
    r.add_argument("--json", action="store_true", help="one JSON object per image")

    x = sub.add_parser("export", help="a model as ONNX (inference graph) or as a safetensors "
                       "weights file", description="Write MODEL as OUT: OUT.onnx is an ONNX "
                       "graph of inference (input images [B, C, H, W] in [0, 1]; outputs "
                       "capsule lengths [B, classes] and poses [B, classes, dim]); "
                       "OUT.safetensors is a weights file like the shipped ones.")
    _model_arg(x)
    x.add_argument("out", metavar="OUT", help="file ending .onnx or .safetensors")
    x.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="weights precision of a .safetensors file (default float32)")
    x.add_argument("--batch", type=int, default=1, help="example batch size for tracing the "
                   "ONNX graph; the batch axis stays dynamic (default 1)")

    b = sub.add_parser("bench", help="throughput vs this machine's limit and a naive CapsNet",
                       description="Throughput of a training step and of inference against "
                       "this machine's arithmetic limit (GEMM rate / FLOPs per image) and a "
                       "naive CapsNet. Prints a table, or with --json one JSON object.")
    b.add_argument("--arch", default="capsnet", help="capsnet or efficient-capsnet "
                   "(default capsnet; the naive reference exists for capsnet only)")
    b.add_argument("--batch-size", type=int, default=128, help="training batch (default 128)")
    b.add_argument("--eval-batch-size", type=int,
                   help="inference batch (default: the training batch)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    b.add_argument("--threads", type=int, help=THREADS_HELP)
    b.add_argument("--steps", type=int, default=12,
                   help="timed steps per measurement (default 12)")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    b.add_argument("--image-size", type=int, default=28, help="square input side (default 28)")
    b.add_argument("--channels", type=int, default=1, help="input channels (default 1)")
    b.add_argument("--routing-iterations", type=int, default=3, help="default 3")
    b.add_argument("--detach-routing", action="store_true",
                   help="no gradient through the intermediate routing iterations")
    b.add_argument("--stem", type=int, default=0, help="capsnet: strided 3x3 convolutions "
                   "before Conv1 (default 0: none; as capsnet train --stem; no naive "
                   "reference with a stem)")
    b.add_argument("--stem-channels", type=int, default=64,
                   help="channels of every stem convolution (default 64)")
    b.add_argument("--recon-size", type=int, default=0,
                   help="capsnet: side of the decoder's output (default 0: the image's; as "
                   "capsnet train --recon-size)")
    b.add_argument("--precision", default="32", choices=PRECISIONS,
                   help="32, or forward and loss under autocast to bf16 / fp16 as Lightning's "
                   "bf16-mixed / 16-mixed (GPU only) do (default 32)")
    b.add_argument("--no-naive", dest="naive", action="store_false",
                   help="skip the naive reference (faster)")
    b.add_argument("--retain-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="have glibc keep freed memory for reuse, for both models, as "
                        "`capsnet train` does (default on)")
    b.add_argument("--json", action="store_true", help="one JSON object on stdout")

    rp = sub.add_parser("report", help="HTML report of a run: curves, confusion, "
                        "reconstructions, mistakes, capsule perturbations",
                        description="Write RUN_DIR/report/index.html and the PNG/GIF files it "
                        "shows, from the run's checkpoint, its metrics.csv and the test set.")
    rp.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, or a model alone (a "
                    "shipped model's name, a weights file or a checkpoint)")
    rp.add_argument("--out", help="folder for the page (default RUN_DIR/report, or "
                    "report-NAME for a model alone)")
    rp.add_argument("--checkpoint", default=None, help="best, last, a checkpoint, a weights "
                    "file or a shipped model's name (default: best.ckpt, else last.ckpt)")
    rp.add_argument("--dataset", help="default: the run's")
    rp.add_argument("--data-dir", help="default: the run's data_dir (or the usual places)")
    rp.add_argument("--test-size", type=int, help="first N test images only (default: all)")
    rp.add_argument("--samples", type=int, default=3,
                    help="test images in the Figure 4 panel (default 3)")
    rp.add_argument("--mistakes", type=int, default=8,
                    help="confident mistakes shown (default 8)")
    rp.add_argument("--device", default="auto")
    rp.add_argument("--batch-size", type=int, default=256)

    d = sub.add_parser("datasets", help="the registered datasets: where each was found, or "
                       "how to get it", description="List every dataset `--dataset` takes, "
                       "with its classes and image shape, the folder where it was found "
                       "(nothing is downloaded) or how to get it.")
    d.add_argument("--data-dir", help="look only here (as `capsnet train --data-dir`)")

    v = sub.add_parser("visdom", help="serve the live Visdom dashboard (offline)",
                       description="Serve the Visdom dashboard that `capsnet train --visdom` "
                       "streams to. It has no login: keep the default 127.0.0.1 unless the "
                       "network is trusted.")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    v.add_argument("--port", type=int, default=8097, help="default 8097")
    v.add_argument("--env-path", default=None,
                   help="folder where environments are saved (default ~/.visdom)")
    return p


COMMANDS = {"train": _cmd_train, "evaluate": _cmd_evaluate, "predict": _cmd_predict,
            "export": _cmd_export, "bench": _cmd_bench, "report": _cmd_report,
            "visdom": _cmd_visdom, "datasets": _cmd_datasets}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except CapsnetError as e:
        msg = str(e)
        print(msg if msg.startswith("capsnet") else f"capsnet: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("capsnet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`capsnet evaluate ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's recipe
        return 1
    except OSError as e:  # a file a command writes (full disk, no permission...)
        where = f"{e.filename}: " if e.filename is not None else ""
        print(f"capsnet: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
