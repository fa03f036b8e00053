"""The documentation scripts' own logic (their figures come from real runs, not from here)."""

import csv

from capsnet.metrics import COLUMNS
from conftest import load_script


def _metrics(folder, val_accs):
    folder.mkdir()
    with open(folder / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for e, a in enumerate(val_accs):
            w.writerow({"epoch": e, "val_acc": a, "test_acc": a - 0.01, "epoch_time_s": 60})


def test_clock_counts_the_stages_of_a_recipe_on_one_clock(tmp_path):
    clock = load_script("clock")
    _metrics(tmp_path / "stage1", [0.90, 0.92, 0.93])
    _metrics(tmp_path / "stage2", [0.925, 0.935])
    rows, starts = clock.stages([tmp_path / "stage1", tmp_path / "stage2"])
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4] and starts == [4]
    assert [r["val_acc"] for r in rows] == [0.90, 0.92, 0.93, 0.925, 0.935]
    # first time at or above a threshold: (epoch counted from 1, minutes on the one clock)
    assert clock.first_reached(rows, "val_acc")[0.93] == (3, 3.0)
    assert 0.936 not in clock.first_reached(rows, "val_acc")


def test_clock_counts_disturbed_epochs_at_the_median_on_a_second_clock(tmp_path):
    clock = load_script("clock")
    _metrics(tmp_path / "run", [0.88, 0.90, 0.91, 0.92])
    rows, _ = clock.stages([tmp_path / "run"])
    rows[1]["epoch_time_s"] = 3600  # epoch 2 paused for most of an hour
    rows[3]["epoch_time_s"] = 90
    disturbed = clock.parse_epochs("2")
    assert clock.parse_epochs("1-3,19") == {1, 2, 3, 19}
    assert clock.minutes(rows) == [1.0, 61.0, 62.0, 63.5]
    # the median of the others (60, 60, 90 s) stands in for epoch 2
    assert clock.minutes(rows, disturbed) == [1.0, 2.0, 3.0, 4.5]
    assert clock.first_reached(rows, "val_acc")[0.92] == (4, 63.5)
    assert clock.first_reached(rows, "val_acc", disturbed)[0.92] == (4, 4.5)
    lines = clock.table(rows, disturbed).splitlines()
    assert lines[0].count("|") == 6 and lines[3].startswith("| 2* | 61.0 | 2.0 |")


def test_clock_val_only_prints_no_test_accuracy(tmp_path, capsys):
    clock = load_script("clock")
    _metrics(tmp_path / "run", [0.911, 0.922])  # test accuracy 0.901, 0.912
    assert clock.main([str(tmp_path / "run"), "--val-only",
                       "--png", str(tmp_path / "clock.png")]) == 0
    out = capsys.readouterr().out
    assert "92.20%" in out and "test acc" not in out and "test_acc" not in out
    assert "91.20%" not in out and "90.10%" not in out
    assert "val_acc first >= 92.0%: epoch 2" in out and (tmp_path / "clock.png").stat().st_size
    assert clock.main([str(tmp_path / "run")]) == 0  # the default keeps the record
    out = capsys.readouterr().out
    assert "| 2 | 2.0 | 92.20% | 91.20% |" in out and "test_acc first >= 90.0%: epoch 1" in out


def test_greedy_soup_keeps_a_candidate_only_if_validation_does_not_drop():
    import torch
    soup = load_script("soup")
    # three one-weight "models"; the score prefers a weight close to 1.0
    states = [{"w": torch.tensor([x]), "steps": torch.tensor(i)}
              for i, x in enumerate([0.8, 1.6, 1.1])]

    def score(state):
        return -abs(state["w"].item() - 1.0)

    mixed, best, chosen, log = soup.greedy(states, score)
    # tried best first: 1.1 (start), 0.8 (mean 0.95: better, kept), 1.6 (mean 1.1667: worse)
    assert [i for i, _, _ in log] == [2, 0, 1] and chosen == [2, 0]
    assert log[0][2] is None and abs(log[1][2] + 0.05) < 1e-6
    assert abs(mixed["w"].item() - 0.95) < 1e-6 and mixed["steps"].item() == 2
    assert abs(best + 0.05) < 1e-6
    assert soup.mean_state(states)["w"].dtype == torch.float32


def test_recon_score_gives_each_class_its_own_reconstruction_error():
    import torch
    from torch import nn
    from capsnet.layers import Decoder
    recon = load_script("recon_score")
    torch.manual_seed(0)

    class Model(nn.Module):  # capsules: a fixed linear map of the image, long enough to matter
        def __init__(self):
            super().__init__()
            self.map = nn.Linear(28 * 28, 10 * 16)
            self.decoder = Decoder(10, 16, (1, 28, 28), (16, 32))

        def capsules(self, x):
            return self.map(x.flatten(1)).view(-1, 10, 16)

    model = Model()
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    lengths, sse = recon.scores(model, images, batch=3)  # two batches
    x = images.float() / 255
    v = model.capsules(x)
    assert lengths.shape == sse.shape == (5, 10)
    assert torch.allclose(lengths, v.norm(dim=-1), atol=1e-5)
    for k in range(10):  # column k: the decoder fed class k's capsule alone
        expected = (model.decoder(v, torch.full((5,), k)) - x).square().flatten(1).sum(1)
        assert torch.allclose(sse[:, k], expected, atol=1e-4)
    assert (sse[:, 7] - sse[:, 3]).abs().max() > 100 * 1e-4  # the columns do differ


def test_recon_score_refuses_a_missing_model_in_one_line(tmp_path, capsys):
    recon = load_script("recon_score")
    assert recon.main([str(tmp_path / "nothing.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("recon_score: error:") and "nothing.safetensors" in err
    assert len(err.splitlines()) == 1
