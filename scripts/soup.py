"""A greedy soup of weights (Wortsman et al. 2022, "Model soups"), chosen on validation.

Models trained from one starting point (``capsnet train --init``) often stay in one basin,
where the mean of their weights is a model of its own and can beat each of them. The greedy
recipe: sort the candidates by validation accuracy, start from the best, and add each next
one if the mean of the weights chosen so far (with it) does not lower validation accuracy.
The validation split is the run's own (``config.yaml`` beside the first candidate), as
``capsnet evaluate --split val`` carves it; the test set plays no part.

    python scripts/soup.py RUN1/best.ckpt RUN2/best.ckpt ... --out soup.safetensors

prints one line per candidate (its validation accuracy, and the soup's with it: added or
left out) and writes the soup as a weights file like the shipped one (``capsnet evaluate
soup.safetensors``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch


def mean_state(states: list[dict]) -> dict:
    """The element-wise mean of state dicts with the same keys (floats; other tensors, such
    as step counters, are taken from the first)."""
    return {k: (torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype)
                if v.is_floating_point() else v)
            for k, v in states[0].items()}


def greedy(states: list[dict], score: Callable[[dict], float]
           ) -> tuple[dict, float, list[int], list[tuple[int, float, float | None]]]:
    """Greedy soup of ``states`` under ``score`` (validation accuracy of a state dict).

    Returns the soup, its score, the indices of the chosen states and, per candidate in the
    order tried (best first), ``(index, its own score, the soup's score with it)``; the last
    ``None`` for the first. A candidate is kept when the soup's score with it is at least the
    soup's so far.
    """
    own = [score(s) for s in states]
    order = sorted(range(len(states)), key=lambda i: -own[i])
    chosen, best = [order[0]], own[order[0]]
    log: list[tuple[int, float, float | None]] = [(order[0], best, None)]
    for i in order[1:]:
        trial = score(mean_state([states[j] for j in chosen + [i]]))
        log.append((i, own[i], trial))
        if trial >= best:
            chosen.append(i)
            best = trial
    return mean_state([states[j] for j in chosen]), best, chosen, log


def main(argv: list[str] | None = None) -> int:
    from capsnet.checkpoints import load_model
    from capsnet.errors import CapsnetError, check_positive
    from capsnet.evaluate import evaluate, evaluation_data, recon_weight_of
    from capsnet.weights import describe, save_weights

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", metavar="MODEL", help="checkpoints or weights files "
                   "of one architecture; the first one's run gives the validation split")
    p.add_argument("--out", required=True, help="the soup as a .safetensors weights file")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--batch-size", type=int, default=500)
    a = p.parse_args(argv)
    try:
        check_positive(("--batch-size", a.batch_size))
        if not a.out.endswith(".safetensors"):
            raise CapsnetError(f"{a.out}: --out must end in .safetensors")
        model, meta = load_model(a.models[0])
        val = evaluation_data(a.models[0], model, meta, "val")
        states = []
        for path in a.models:
            other, _ = load_model(path)
            if other.config.to_dict() != model.config.to_dict():
                raise CapsnetError(f"{path}: not the same model as {a.models[0]}")
            states.append(other.state_dict())

        def score(state: dict) -> float:
            model.load_state_dict(state)
            return evaluate(model, val, a.batch_size,
                            recon_weight=recon_weight_of(meta))["accuracy"]

        soup, final, chosen, log = greedy(states, score)
        print(f"validation split: {len(val):,} images of {meta['dataset']}")
        for i, own, trial in log:
            verdict = "start" if trial is None else (
                f"soup {trial:.4f}: " + ("added" if i in chosen else "left out"))
            print(f"  {a.models[i]}: {own:.4f}  {verdict}")
        model.load_state_dict(soup)
        source = "soup of " + ", ".join("/".join(Path(a.models[i]).parts[-2:]) for i in chosen)
        save_weights(model, a.out, describe({**meta, "epoch": None}, source),
                     getattr(torch, a.dtype))
        print(f"soup of {len(chosen)}: validation accuracy {final:.4f} -> {a.out}")
    except CapsnetError as e:
        print(f"soup: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
