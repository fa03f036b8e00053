"""Does the decoder's reconstruction error add to the capsule lengths as a class score?

On a model's **validation** split only (the test set chooses nothing): for every image, the
capsule lengths ``L`` ``[N, O]`` and the squared error ``S`` ``[N, O]`` of the decoder's
reconstruction from each class's capsule in turn (the image masked as class k, k = 0..O-1;
:func:`~capsnet.losses.reconstruction_loss`, training's measure).
Prints the accuracy of ``argmax L`` (the model's own), of ``argmin S`` (reconstruction alone)
and of ``argmax (L - a * S)`` for a grid of weights ``a``, on the two halves of the split
(a fixed random halving): a weight chosen on one half is judged on the other.

    python scripts/recon_score.py fashion-mnist        # or a weights file or a checkpoint
"""

from __future__ import annotations

import argparse
import sys

import torch

from capsnet.checkpoints import load_model
from capsnet.data.batches import to_unit
from capsnet.errors import CapsnetError
from capsnet.evaluate import evaluation_data
from capsnet.losses import reconstruction_loss

WEIGHTS = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3)  # about 3x apart; squared errors are ~10-20


def scores(model, images: torch.Tensor, batch: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` uint8 ``[N, C, H, W]`` -> lengths and reconstruction SSE, each ``[N, O]``."""
    lengths, sse = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = to_unit(images[i:i + batch])
            v = model.capsules(x.contiguous(memory_format=torch.channels_last))  # [B, O, D]
            lengths.append(v.norm(dim=-1))
            sse.append(torch.stack([  # training's measure, at the decoder's own size
                reconstruction_loss(model.decoder(v, torch.full((len(x),), k)), x)
                for k in range(v.shape[1])], 1))
    return torch.cat(lengths), torch.cat(sse)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a shipped model's name, a weights file or a checkpoint")
    a = p.parse_args(argv)
    try:
        model, meta = load_model(a.model)
        if not hasattr(model, "decoder"):
            raise CapsnetError(f"{a.model}: {meta['arch']} has no reconstruction decoder")
        data = evaluation_data(a.model, model, meta, "val")
        if data.labels.dim() != 1:
            raise CapsnetError(f"{a.model}: single-label data only (one class per image)")
    except CapsnetError as e:
        print(f"recon_score: error: {e}", file=sys.stderr)
        return 2
    lengths, sse = scores(model, data.images)
    y = data.labels
    halves = torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).chunk(2)

    def acc(pred: torch.Tensor, idx=slice(None)) -> str:
        return f"{(pred[idx] == y[idx]).float().mean().item():.2%}"

    print(f"{a.model}: {len(y):,} validation images; lengths alone {acc(lengths.argmax(1))}, "
          f"reconstruction alone {acc(sse.argmin(1))}")
    print("a        half 1   half 2   (score: length - a * squared error)")
    for w in WEIGHTS:
        pred = (lengths - w * sse).argmax(1)
        print(f"{w:<8} {acc(pred, halves[0])}   {acc(pred, halves[1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
