"""Issue 13's two experiments end to end: CapsNet against the paper's CNN baselines on
overlapping garments (MultiFashion) and on unseen affine transforms (expanded -> affine).

    python scripts/robustness.py multi  --out /work/runs/rob --epochs 6 [--train-size N] ...
    python scripts/robustness.py affine --out /work/runs/rob --epochs 6 [--train-size N] ...

Every training run goes through the ``capsnet`` command (``capsnet train``, ``export``,
``evaluate``), so each figure can be made again by hand; the commands are printed as they
run. A run that exists already is continued with ``--resume`` (an interrupted experiment is
restarted with the same command line). Results: ``OUT/multi.json`` / ``OUT/affine.json``
and a Markdown table on stdout.

- ``multi``: ``capsnet`` and ``baseline-cnn-multi`` on ``multi-fashion-mnist`` for
  ``--epochs`` epochs each; reported: each model's ``best.ckpt`` (highest validation pair
  accuracy) on the test pairs, and the test pair accuracy of its last epoch.
- ``affine``: ``capsnet`` and ``baseline-cnn`` on ``fashion-mnist-expanded``, one epoch at a
  time, keeping a weights file per epoch (``epoch-NN.safetensors``). The paper compares the
  models at equal accuracy on the expanded test set; here the test set chooses nothing, so
  the match is made on the **validation** garments (at their fixed expanded positions): the
  weaker model's best validation accuracy ``a`` and its epoch; the stronger model's first
  epoch whose validation accuracy reaches ``a``. Both chosen weights are then evaluated on
  the expanded test set and on the affine test set (``fashion-mnist-affine``), each image's
  scores kept (``OUT/predictions-ARCH-DATASET.csv``), and the two compared image by image
  on each set (``paired`` in ``affine.json``: exact McNemar).
  With ``--fine S`` the stronger model's match is made finer than an epoch: it is trained
  again (same seed and flags, in ``expanded-ARCH-steps``) up to the matched epoch, keeping its
  weights every ``S`` steps (``capsnet train --save-every-steps``); the first of those whose
  validation accuracy reaches ``a`` is the one compared.

The learning rate schedule is the default per-step exponential decay, which does not depend
on ``--epochs``, so training one epoch at a time is the same run as training them at once.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from capsnet.metrics import read_metrics
from capsnet.checkpoints import atomic_write, safe_load

MULTI = ("capsnet", "baseline-cnn-multi")
AFFINE = ("capsnet", "baseline-cnn")
AFFINE_SETS = ("fashion-mnist-expanded", "fashion-mnist-affine")  # trained on; unseen maps
EVAL_FLAGS: list[str] = []  # --test-size and --data-dir, when given


def run(args: list[str], capture: bool = False) -> str:
    """Run ``capsnet ARGS`` (the one installed beside this Python), printing the command."""
    exe = Path(sys.executable).with_name("capsnet")
    print("$ capsnet " + shlex.join(args), file=sys.stderr, flush=True)
    done = subprocess.run([str(exe), *args], text=True,
                          stdout=subprocess.PIPE if capture else None)
    if done.returncode != 0:
        sys.exit(f"capsnet {args[0]} failed (exit {done.returncode})")
    return done.stdout or ""


def metrics(run_dir: Path) -> list[dict]:
    """The rows of ``run_dir/metrics.csv`` (none before the first epoch)."""
    path = run_dir / "metrics.csv"
    return read_metrics(path) if path.is_file() else []


def train(run_dir: Path, epochs: int, common: list[str]) -> None:
    """Train (or continue) ``run_dir`` up to ``epochs`` epochs."""
    done = len(metrics(run_dir))
    if done >= epochs:
        return
    if (run_dir / "last.ckpt").is_file():
        run(["train", "--resume", str(run_dir), "--epochs", str(epochs)])
    else:
        run(["train", *common, "--epochs", str(epochs), "--out", str(run_dir)])


def evaluate(model: Path, *extra: str) -> dict:
    return json.loads(run(["evaluate", str(model), "--json", *extra, *EVAL_FLAGS],
                          capture=True))


def minutes(rows: list[dict]) -> float:
    return sum(r["epoch_time_s"] for r in rows) / 60


def parameters(run_dir: Path) -> int | None:
    """Trainable parameters of the run's model (from its weights file or checkpoint)."""
    try:
        import torch
        from capsnet.checkpoints import load_model
        for name in ("best.ckpt", "last.ckpt"):
            if (run_dir / name).is_file():
                model, _ = load_model(run_dir / name, torch.device("cpu"))
                return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - a missing count must not lose the results
        return None
    return None


def cmd_multi(a, common: list[str]) -> dict:
    out = {}
    for arch in MULTI:
        d = a.out / f"multi-{arch}"
        train(d, a.epochs, [*common, "--dataset", "multi-fashion-mnist", "--arch", arch])
        rows = metrics(d)
        best = evaluate(d / "best.ckpt")
        best_epoch = max(rows, key=lambda r: r["val_acc"])["epoch"]
        out[arch] = {"parameters": parameters(d), "epochs": len(rows),
                     "minutes": minutes(rows), "best_epoch": best_epoch + 1,
                     "val_acc": max(r["val_acc"] for r in rows),
                     "test_pair_acc": best["accuracy"], "test_pairs": best["n"],
                     "last_test_pair_acc": rows[-1]["test_acc"]}
    return out


def multi_table(res: dict) -> str:
    lines = ["| model | parameters | epochs | wall time (min) | best.ckpt (epoch) | "
             "val pair acc | test pair acc (best.ckpt) | test pair acc (last epoch) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for arch, r in res.items():
        lines.append(f"| {arch} | {r['parameters'] or 0:,} | {r['epochs']} | "
                     f"{r['minutes']:.0f} | {r['best_epoch']} | {r['val_acc']:.2%} | "
                     f"{r['test_pair_acc']:.2%} | {r['last_test_pair_acc']:.2%} |")
    return "\n".join(lines)


def weights(d: Path, epoch: int) -> Path:
    return d / f"epoch-{epoch:02d}.safetensors"


def match_epochs(curves: dict[str, list[dict]]) -> tuple[str, dict[str, int]]:
    """The paper's "equal accuracy" match, on validation accuracy: the weaker model (lower
    best ``val_acc``) at its best epoch, the stronger at its first epoch reaching that
    accuracy. ``curves``: two models' ``metrics.csv`` rows -> ``(weaker, {model: epoch})``
    with epochs counted from 1."""
    best = {arch: max(rows, key=lambda r: r["val_acc"]) for arch, rows in curves.items()}
    weaker = min(best, key=lambda arch: best[arch]["val_acc"])
    stronger = next(arch for arch in curves if arch != weaker)
    match = next(r for r in curves[stronger] if r["val_acc"] >= best[weaker]["val_acc"])
    return weaker, {weaker: best[weaker]["epoch"] + 1, stronger: match["epoch"] + 1}


def cmd_affine(a, common: list[str]) -> dict:
    curves = {}
    for arch in AFFINE:
        d = a.out / f"expanded-{arch}"
        for e in range(1, a.epochs + 1):
            if not weights(d, e).is_file():
                if len(metrics(d)) > e:  # last.ckpt is a later epoch: this one is gone
                    sys.exit(f"{d}: the weights of epoch {e} were not kept; delete the run "
                             "folder to start it again")
                train(d, e, [*common, "--dataset", "fashion-mnist-expanded", "--arch", arch])
                run(["export", str(d / "last.ckpt"), str(weights(d, e))])
        curves[arch] = metrics(d)[:a.epochs]
    weaker, chosen = match_epochs(curves)
    out = {"matched_on": "validation accuracy (expanded)", "weaker": weaker, "models": {}}
    target = curves[weaker][chosen[weaker] - 1]["val_acc"]
    for arch, epoch in chosen.items():
        d = a.out / f"expanded-{arch}"
        rows = curves[arch][:epoch]
        used = {"weights": str(weights(d, epoch)), "epoch": epoch, "minutes": minutes(rows),
                "val_acc": rows[-1]["val_acc"]}
        if a.fine and arch != weaker:
            used = fine_match(a, common, arch, epoch, target, curves[arch]) or used
        expanded, affine = (
            evaluate(Path(used["weights"]), "--dataset", dataset,
                     "--predictions", str(predictions(a.out, arch, dataset)))
            for dataset in AFFINE_SETS)
        out["models"][arch] = {
            "parameters": parameters(d), **used, "expanded_test_acc": expanded["accuracy"],
            "affine_test_acc": affine["accuracy"], "n": affine["n"],
            "epochs_trained": len(curves[arch]),
            "best_val_acc": max(r["val_acc"] for r in curves[arch])}
    out["paired"] = paired(a.out)
    return out


def predictions(out: Path, arch: str, dataset: str) -> Path:
    """Where ``capsnet evaluate --predictions`` puts the chosen weights' per-image rows."""
    return out / f"predictions-{arch}-{dataset}.csv"


def paired(out: Path) -> dict:
    """The two chosen weights files image by image on each test set: ``gained``, the
    images only CapsNet gets right, ``lost``, those only the CNN does, and the exact
    McNemar p-value (:func:`capsnet.inference.paired_comparison`)."""
    from capsnet.evaluate import read_correct
    from capsnet.inference import paired_comparison
    caps, cnn = AFFINE
    return {dataset: paired_comparison(read_correct(predictions(out, caps, dataset)),
                                       read_correct(predictions(out, cnn, dataset)))
            for dataset in AFFINE_SETS}


def fine_match(a, common: list[str], arch: str, epoch: int, target: float,
               timed: list[dict]) -> dict | None:
    """The stronger model ``arch`` stopped at the first of its every-``a.fine``-steps weights
    files (a new run, trained up to ``epoch``) whose validation accuracy reaches ``target``.
    Its wall time is pro-rated from ``timed``, the first run's epochs (the new run replays
    them with more work per step: saving and, later, evaluating every file)."""
    d = a.out / f"expanded-{arch}-steps"
    train(d, epoch, [*common, "--dataset", "fashion-mnist-expanded", "--arch", arch,
                     "--save-every-steps", str(a.fine)])
    rows = metrics(d)[:epoch]
    files = sorted(d.glob("step-*.safetensors"))
    steps_per_epoch = safe_load(d / "last.ckpt")["global_step"] / len(rows)
    found, curve = first_reaching(files, cached_scores(d / "val-scores.json"), target)
    if found is None:
        return None
    step = step_of(found)
    epochs = step / steps_per_epoch
    full = min(int(epochs), len(timed) - 1)  # whole epochs before the step, then a share
    return {"weights": str(found), "step": step, "val_acc": curve[-1][1], "epoch": epochs,
            "val_curve": [(step_of(w), acc) for w, acc in curve],
            "minutes": minutes(timed[:full]) + (epochs - full) * timed[full]["epoch_time_s"] / 60}


def cached_scores(cache: Path):
    """``weights file -> validation accuracy``, each file evaluated once: its score is
    kept in ``cache`` (beside the step files, so it goes with them), and a re-run of the
    script reads it instead of scoring every file again (minutes each at 40x40)."""
    scores = json.loads(cache.read_text()) if cache.is_file() else {}

    def score(weights_file: Path) -> float:
        if weights_file.name not in scores:
            scores[weights_file.name] = evaluate(weights_file, "--split", "val")["accuracy"]
            atomic_write(cache, lambda f: f.write(json.dumps(scores, indent=1).encode()))
        return scores[weights_file.name]
    return score


def step_of(weights_file: Path) -> int:
    """``step-000068.safetensors`` -> 68."""
    return int(weights_file.stem.split("-")[1])


def first_reaching(files: list[Path], score, target: float):
    """The first of ``files`` (in order) whose ``score`` reaches ``target``, scoring no file
    after it; returns ``(file or None, [(file, score), ...] of the files scored)``."""
    curve = []
    for w in files:
        curve.append((w, score(w)))
        if curve[-1][1] >= target:
            return w, curve
    return None, curve


def affine_table(res: dict) -> str:
    lines = ["| model | parameters | epoch used | wall time to it (min) | val acc (expanded) | "
             "expanded test acc | affine test acc |", "|---|---:|---:|---:|---:|---:|---:|"]
    for arch, r in res["models"].items():
        epoch = (f"{r['epoch']:.2f} (step {r['step']})" if "step" in r else str(r["epoch"]))
        lines.append(f"| {arch} | {r['parameters'] or 0:,} | {epoch} | {r['minutes']:.1f} "
                     f"| {r['val_acc']:.2%} | {r['expanded_test_acc']:.2%} | "
                     f"{r['affine_test_acc']:.2%} |")
    caps, cnn = AFFINE
    lines += [""] if res.get("paired") else []
    for dataset, vs in res.get("paired", {}).items():
        lines.append(f"{dataset}, image by image: right only for {caps} {vs['gained']}, "
                     f"only for {cnn} {vs['lost']} (exact McNemar p = {vs['p_value']:.2g})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", choices=["multi", "affine"])
    p.add_argument("--out", type=Path, required=True, help="folder of the runs and results")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--train-size", type=int, help="first N training garments (default: all)")
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--test-size", type=int, help="first N test images/pairs (default: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data-dir", help="where Fashion-MNIST is (default: capsnet's search)")
    p.add_argument("--fine", type=int, default=0, metavar="S",
                   help="affine: match the stronger model every S steps instead of per epoch")
    p.add_argument("--extra", default="", help="more `capsnet train` flags, one string")
    a = p.parse_args(argv)
    if a.epochs < 1:
        p.error("--epochs must be positive")
    common = ["--batch-size", str(a.batch_size), "--val-size", str(a.val_size),
              "--no-tensorboard", "--no-progress", *shlex.split(a.extra)]
    for flag, value in (("--train-size", a.train_size), ("--test-size", a.test_size),
                        ("--data-dir", a.data_dir)):
        if value is not None:
            common += [flag, str(value)]
            if flag != "--train-size":
                EVAL_FLAGS.extend([flag, str(value)])
    a.out.mkdir(parents=True, exist_ok=True)
    if a.experiment == "multi":
        res = cmd_multi(a, common)
        table = multi_table(res)
    else:
        res = cmd_affine(a, common)
        table = affine_table(res)
    res["command"] = "python scripts/robustness.py " + shlex.join(argv or sys.argv[1:])
    (a.out / f"{a.experiment}.json").write_text(json.dumps(res, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
