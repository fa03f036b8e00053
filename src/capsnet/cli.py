"""The ``capsnet`` command: train, evaluate, predict, bench, report, visdom.

Every user error ends in one line ``capsnet: error: ...`` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import CapsnetError


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (not the whole usage) and exit code 2."""

    def error(self, message: str):
        raise CapsnetError(f"{self.prog}: {message} (see {self.prog} --help)")


def _flag(p, name: str, help: str, **kw):
    """A flag whose absence means "not given" (so config files and resumed runs fill it)."""
    p.add_argument("--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS,
                   help=help, **kw)


def _train_parser(sub) -> None:
    from .train import DEFAULTS as D
    p = sub.add_parser("train", help="train a CapsNet", description=(
        "Train a CapsNet. Settings: defaults < --config YAML < the resumed run's config.yaml "
        "< flags."))
    p.add_argument("--config", help="YAML file of settings (keys as the flags, - or _)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its "
                   "last.ckpt (flags given here, e.g. --epochs, override its settings)")
    bool_ = argparse.BooleanOptionalAction
    flags = [
        ("dataset", f"fashion-mnist or mnist (default {D['dataset']})", {}),
        ("data_dir", "folder with the four IDX files; the only place looked at and the "
                     "download target when given", {}),
        ("out", f"run directory for checkpoints and logs (default {D['out']})", {}),
        ("epochs", f"default {D['epochs']}", {"type": int}),
        ("batch_size", f"default {D['batch_size']}", {"type": int}),
        ("eval_batch_size", f"default {D['eval_batch_size']}", {"type": int}),
        ("lr", f"Adam learning rate (default {D['lr']})", {"type": float}),
        ("lr_decay", f"learning-rate factor per --lr-decay-steps (default {D['lr_decay']})",
         {"type": float}),
        ("lr_decay_steps", f"default {D['lr_decay_steps']}", {"type": int}),
        ("routing_iterations", f"routing-by-agreement iterations (default "
                               f"{D['routing_iterations']})", {"type": int}),
        ("detach_routing", "no gradient through the intermediate routing iterations "
                           "(cheaper; the paper's authors let it flow)", {"action": bool_}),
        ("recon_weight", f"reconstruction loss weight (default {D['recon_weight']})",
         {"type": float}),
        ("shift", f"max random shift in pixels (default {D['shift']})", {"type": int}),
        ("rotate", "max random rotation in degrees (default 0: off)", {"type": float}),
        ("scale", "max relative random scaling, e.g. 0.1 (default 0: off)", {"type": float}),
        ("shear", "max random shear in degrees (default 0: off)", {"type": float}),
        ("translate", "max random affine translation, fraction of the side (default 0)",
         {"type": float}),
        ("hflip", "random horizontal flips (default off)", {"action": bool_}),
        ("train_size", "use only the first N training images", {"type": int}),
        ("val_size", "carve N validation images out of the training set (default 0)",
         {"type": int}),
        ("test_size", "evaluate on the first N test images only (default: all)",
         {"type": int}),
        ("seed", f"default {D['seed']}", {"type": int}),
        ("device", "auto, cpu, cuda or cuda:N (default auto)", {}),
        ("threads", "CPU threads (default: torch's choice)", {"type": int}),
        ("channels_last", "channels-last convolutions (default on: faster on CPU)",
         {"action": bool_}),
        ("log_every", f"log and refresh every N steps (default {D['log_every']})",
         {"type": int}),
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
    from .train import load_run_settings, read_config, train
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
    if rows:
        last = rows[-1]
        split = "val" if "val_acc" in last else "test"
        print(f"epoch {last['epoch']}: test accuracy {last.get('test_acc', float('nan')):.4f}"
              + (f", val accuracy {last['val_acc']:.4f}" if split == "val" else ""))
    return 0


def _cmd_evaluate(a) -> int:
    from .checkpoints import load_model
    from .datasets import load_dataset
    from .evaluate import evaluate
    from .train import torch_device
    device = torch_device(a.device)
    model, meta = load_model(a.checkpoint, device)
    _, test = load_dataset(a.dataset or meta["dataset"], a.data_dir)
    if a.test_size:
        test.images, test.labels = test.images[:a.test_size], test.labels[:a.test_size]
    result = evaluate(model, test, a.batch_size, device)
    result["checkpoint"] = str(a.checkpoint)
    if a.json:
        print(json.dumps(result))
        return 0
    print(f"{a.checkpoint}: accuracy {result['accuracy']:.4f} on {result['n']:,} test images, "
          f"loss {result['loss']:.4f} (margin {result['margin_loss']:.4f}, "
          f"reconstruction SSE {result['reconstruction_sse']:.2f})")
    width = max(len(c) for c in result["classes"])
    print("per-class accuracy:")
    for name, acc in result["per_class"].items():
        print(f"  {name:<{width}}  {acc:.4f}")
    print("confusion matrix (rows: true class, columns: predicted):")
    for name, row in zip(result["classes"], result["confusion"]):
        print(f"  {name:<{width}}  " + " ".join(f"{v:5d}" for v in row))
    return 0


def _cmd_predict(a) -> int:
    from .checkpoints import load_model
    from .evaluate import load_image, predict
    model, meta = load_model(a.checkpoint)
    c = model.config
    status = 0
    for path in a.images:
        try:
            x = load_image(path, c.in_channels, c.image_size, a.invert)
        except CapsnetError as e:
            print(f"capsnet: error: {e}", file=sys.stderr)
            status = 2
            continue
        (res,) = predict(model, x.unsqueeze(0), meta["classes"])
        res["file"] = str(path)
        if a.json:
            print(json.dumps(res))
        else:
            lengths = " ".join(f"{v:.3f}" for v in res["lengths"])
            print(f"{path}: {res['class']} (|v| = {max(res['lengths']):.3f}); "
                  f"capsule lengths: {lengths}")
    return status


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="capsnet", description="Capsule Networks (Sabour, Frosst & Hinton 2017) "
                "on Fashion-MNIST: train, evaluate, predict, benchmark, explain.")
    from . import __version__
    p.add_argument("--version", action="version", version=f"capsnet {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_parser(sub)

    e = sub.add_parser("evaluate", help="test-set accuracy, losses, confusion matrix")
    e.add_argument("checkpoint")
    e.add_argument("--dataset", help="default: the one the checkpoint was trained on")
    e.add_argument("--data-dir")
    e.add_argument("--batch-size", type=int, default=512)
    e.add_argument("--test-size", type=int, help="first N test images only")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="one JSON object on stdout")

    r = sub.add_parser("predict", help="classify PNG/JPEG images")
    r.add_argument("checkpoint")
    r.add_argument("images", nargs="+", metavar="IMAGE")
    r.add_argument("--invert", choices=["auto", "yes", "no"], default="auto",
                   help="invert to light-on-dark like Fashion-MNIST (auto: if the border "
                        "is light)")
    r.add_argument("--json", action="store_true", help="one JSON object per image")
    _extra_commands(sub)
    return p


def _extra_commands(sub) -> None:
    """Commands that live in their own modules (bench, report, visdom)."""
    from . import bench, report, visdom_server
    for mod in (bench, report, visdom_server):
        mod.add_parser(sub)


COMMANDS = {"train": _cmd_train, "evaluate": _cmd_evaluate, "predict": _cmd_predict}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        handler = COMMANDS.get(args.command) or args.handler
        return handler(args)
    except CapsnetError as e:
        msg = str(e)
        print(msg if msg.startswith("capsnet") else f"capsnet: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("capsnet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
