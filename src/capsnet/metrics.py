"""A run's ``metrics.csv``: its columns and a reader (no Lightning, so ``capsnet report``
and the scripts start quickly)."""

from __future__ import annotations

import csv
from pathlib import Path

from .errors import CapsnetError, first_line

COLUMNS = ["epoch", "train_loss", "train_margin", "train_recon", "train_acc",
           "val_loss", "val_margin", "val_recon", "val_acc",
           "test_loss", "test_margin", "test_recon", "test_acc",
           "train_f2", "val_f2", "test_f2", "train_distill", "lr", "epoch_time_s"]
# f2: multi-label data; distill: a run with --teacher (capsnet.distill)


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a ``metrics.csv`` as dicts of floats (``epoch`` as int); empty cells dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                rows.append({k: (int(v) if k == "epoch" else float(v))
                             for k, v in row.items() if v not in ("", None)})
    except (ValueError, TypeError, UnicodeDecodeError, csv.Error, OSError) as e:
        # a damaged or hand-edited file (TypeError: a row longer than the header)
        raise CapsnetError(f"{path}: not a readable metrics.csv of a capsnet run "
                           f"(line {len(rows) + 2}: {first_line(e)[:120]})") from None
    return rows
