"""Weights files, export (safetensors, ONNX), checkpoints that must not be trusted, divergence."""

import os

import pytest
import torch

from capsnet.cli import main
from capsnet.errors import CapsnetError
from capsnet.models import build_model
from capsnet.weights import load_weights, save_weights
from conftest import exports_agree, one_line_error

TINY = {"conv_channels": 8, "primary_types": 2}
META = {"classes": [f"c{i}" for i in range(10)], "dataset": "fashion-mnist"}


@pytest.fixture
def weights_file(tmp_path):
    torch.manual_seed(0)
    model = build_model("capsnet", TINY)
    return model, save_weights(model, tmp_path / "m.safetensors", META)


def test_weights_that_are_not_finite_are_never_written(weights_file, tmp_path):
    """A diverged model (NaN) or an fp16 cast that overflows gives a one-line error and
    leaves the file on disk as it was (``SaveWeightsEvery``'s step files, ``export``)."""
    from types import SimpleNamespace

    from capsnet.callbacks import SaveWeightsEvery
    model, path = weights_file
    before = path.read_bytes()
    with torch.no_grad():
        model.digits.weight[0, 0, 0] = 7e4  # fine in fp32, inf in fp16
    save_weights(model, tmp_path / "fp32.safetensors", META)
    with pytest.raises(CapsnetError, match="not finite .digits.weight"):
        save_weights(model, path, META, dtype=torch.float16)
    with torch.no_grad():
        model.digits.weight[0, 0, 0] = float("nan")
    trainer = SimpleNamespace(global_step=2, global_rank=0, current_epoch=0)
    module = SimpleNamespace(hparams={}, eval_model=model)
    with pytest.raises(CapsnetError, match="step-000002.safetensors: not saved"):
        SaveWeightsEvery(tmp_path, 2).on_train_batch_end(trainer, module, None, None, 0)
    assert path.read_bytes() == before and not list(tmp_path.glob("step-*"))
    assert not list(tmp_path.glob("*.tmp"))


def test_class_names_that_do_not_fit_the_model(tmp_path, capsys):
    """3 names for a 10-class model: a one-line error at loading, not an IndexError when
    predict names the 9th class."""
    path = save_weights(build_model("capsnet", TINY), tmp_path / "m.safetensors",
                        {**META, "classes": ["a", "b", "c"]})
    from PIL import Image
    Image.new("L", (28, 28), 128).save(image := tmp_path / "x.png")
    code = main(["predict", "--model", str(path), str(image)])
    err = capsys.readouterr().err
    assert one_line_error(code, err) and "3 class names for a model of 10 classes" in err


def test_a_digit_model_is_not_scored_on_clothing(tmp_path, fashion_dir, capsys):
    """Class names "0".."9" are names (MNIST's): such a model on Fashion-MNIST is refused;
    a file that recorded no names at all is scored by index."""
    from capsnet.data.registry import DIGITS
    model = build_model("capsnet", TINY)
    digits = save_weights(model, tmp_path / "d.safetensors",
                          {"classes": list(DIGITS), "dataset": "mnist"})
    code = main(["evaluate", str(digits), "--dataset", "fashion-mnist", "--data-dir",
                 str(fashion_dir), "--test-size", "20"])
    err = capsys.readouterr().err
    assert one_line_error(code, err) and "its class 0 is '0'" in err
    unnamed = save_weights(model, tmp_path / "u.safetensors", {"dataset": "fashion-mnist"})
    assert main(["evaluate", str(unnamed), "--data-dir", str(fashion_dir),
                 "--test-size", "20"]) == 0


def test_roundtrip_keeps_function_and_metadata(weights_file):
    model, path = weights_file
    loaded, meta = load_weights(path)
    assert meta["arch"] == "capsnet" and meta["classes"] == META["classes"]
    x = torch.rand(3, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x).lengths, model.eval()(x).lengths)
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # readable like any file


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign", "empty", "text",
                                    "renamed"])
def test_damaged_weights_are_one_line_errors(weights_file, tmp_path, capsys, damage):
    _, path = weights_file
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-100] ^= 0xFF  # a byte of tensor data: the checksum must catch it
    elif damage == "foreign":
        from safetensors.torch import save
        data = save({"w": torch.zeros(3)})
    elif damage == "renamed":  # class names swapped in the metadata, tensors untouched
        import json

        from safetensors import safe_open
        from safetensors.torch import load, save
        with safe_open(str(path), "pt") as f:
            info = json.loads(f.metadata()["capsnet"])
        info["classes"] = info["classes"][::-1]
        data = save(load(bytes(data)), metadata={"capsnet": json.dumps(info)})
    elif damage == "empty":
        data = b""
    else:
        data = b"hello, not weights"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CapsnetError):
        load_weights(bad)
    code = main(["predict", "--model", str(bad), str(tmp_path / "whatever.png")])
    err = capsys.readouterr().err
    assert one_line_error(code, err) and "bad.safetensors" in err


def test_hostile_checkpoint_is_refused_without_running_it(tmp_path, capsys, fashion_dir):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("epochs: 1\n")
    with open(run / "last.ckpt", "wb") as f:  # a zip like torch.save, with a code payload
        torch.save({"state_dict": {}, "evil": Evil()}, f, pickle_protocol=2)
    for args in (["train", "--resume", str(run), "--data-dir", str(fashion_dir)],
                 ["evaluate", str(run / "last.ckpt")],
                 ["export", str(run / "last.ckpt"), str(tmp_path / "x.onnx")]):
        code = main(args)
        err = capsys.readouterr().err
        assert one_line_error(code, err) and "refused" in err, (args, err)
    assert not marker.exists()


def test_resume_from_wrong_shaped_checkpoint(trained_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    ckpt["state_dict"]["model.digits.weight"] = torch.zeros(3, 3)
    torch.save(ckpt, run / "last.ckpt")
    code = main(["train", "--resume", str(run), "--epochs", "3"])
    err = capsys.readouterr().err
    assert one_line_error(code, err) and "does not fit" in err


def test_failed_save_keeps_the_old_checkpoint(tmp_path):
    from capsnet.callbacks import SafeCheckpointIO
    from capsnet.checkpoints import atomic_write
    path = tmp_path / "last.ckpt"
    SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
    before = path.read_bytes()

    def dies(f):
        f.write(b"partial")
        raise OSError("disk full (test)")
    with pytest.raises(OSError):
        atomic_write(path, dies)
    with pytest.raises(CapsnetError, match="not finite"):  # NaN weights never replace it
        SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}},
                                           path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary left


def test_diverging_run_stops_with_one_line_and_writes_no_checkpoint(fashion_dir, tmp_path,
                                                                    capsys):
    out = tmp_path / "run"
    code = main(["train", "--data-dir", str(fashion_dir), "--train-size", "512",
                 "--val-size", "64", "--test-size", "64", "--batch-size", "64", "--lr", "1e8",
                 "--epochs", "1", "--no-progress", "--no-tensorboard",
                 "--routing-iterations", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert one_line_error(code, err), err
    assert "step" in err and "learning rate" in err
    assert not (out / "last.ckpt").exists() and not (out / "best.ckpt").exists()


def test_non_finite_weights_stop_every_process_before_the_checkpoints(tmp_path):
    """StopOnNonFinite checks the weights after validation in every process (so under DDP
    all stop, not process 0 alone in its checkpoint writer), and not in the sanity check."""
    from types import SimpleNamespace

    from capsnet.callbacks import StopOnNonFinite
    module = torch.nn.Linear(2, 2)
    trainer = SimpleNamespace(sanity_checking=False,
                              checkpoint_callback=SimpleNamespace(dirpath=str(tmp_path)))
    StopOnNonFinite().on_validation_end(trainer, module)  # finite: goes on
    with torch.no_grad():
        module.bias[1] = float("inf")
    with pytest.raises(CapsnetError, match="not finite") as e:
        StopOnNonFinite().on_validation_end(trainer, module)
    assert str(tmp_path / "last.ckpt") in str(e.value) and "bias" in str(e.value)
    trainer.sanity_checking = True  # the untrained model's check before training: not saved
    StopOnNonFinite().on_validation_end(trainer, module)


def test_export_safetensors_and_onnx_from_a_checkpoint(trained_run, tmp_path, capsys,
                                                       fashion_dir):
    exports_agree(trained_run / "best.ckpt", tmp_path, capsys, fashion_dir)


def test_export_bad_output(weights_file, tmp_path, capsys):
    _, path = weights_file
    (tmp_path / "taken.safetensors").mkdir()  # OUT an existing folder: cannot be written
    for out in ("m.pt", str(tmp_path / "no" / "such" / "m.onnx"),
                str(tmp_path / "taken.safetensors")):
        code = main(["export", str(path), out])
        assert one_line_error(code, capsys.readouterr().err)
    # fp16 is for weights files: an ONNX graph asked for in fp16 is refused, not ignored
    code = main(["export", str(path), str(tmp_path / "m.onnx"), "--dtype", "float16"])
    err = capsys.readouterr().err
    assert one_line_error(code, err) and "float16" in err and not (tmp_path / "m.onnx").exists()


def test_outputs_never_replace_what_the_user_wrote(weights_file, tmp_path, capsys):
    """export and evaluate --predictions write only over a file of their own kind: a user's
    notes, the model itself, a device or a path through a file are one-line errors and
    stay as they were; a link is written through, not replaced."""
    model, path = weights_file
    notes = tmp_path / "notes.safetensors"
    notes.write_text("my notes")
    (tmp_path / "dir.onnx").mkdir()
    for out, needle in ((notes, "not a safetensors file"), ("", "empty"),
                        (notes / "x.safetensors", "is a file, not a folder"),
                        (tmp_path / "dir.onnx", "a folder"),
                        ("/dev/null", "must end in")):
        code = main(["export", str(path), str(out)])
        err = capsys.readouterr().err
        assert one_line_error(code, err) and needle in err, (out, err)
    assert notes.read_text() == "my notes"
    # an earlier export is replaced, through a link pointing at it
    again = tmp_path / "again.safetensors"
    assert main(["export", str(path), str(again)]) == 0
    (tmp_path / "link.safetensors").symlink_to(again)
    assert main(["export", str(path), str(tmp_path / "link.safetensors")]) == 0
    assert (tmp_path / "link.safetensors").is_symlink()
    capsys.readouterr()
    from capsnet.checkpoints import output_file
    with pytest.raises(CapsnetError, match="not a regular file"):
        output_file("/dev/null", lambda p: True, "a CSV")
    with pytest.raises(CapsnetError, match="is not a CSV and would be replaced"):
        output_file(path, lambda p: False, "a CSV")
    assert output_file(tmp_path / "new" / "x.csv", lambda p: False, "a CSV").name == "x.csv"


@pytest.mark.parametrize("damage", ["nan", "recon_weight", "val_size", "train_pool"])
def test_weights_with_damaged_values_are_one_line_errors(weights_file, tmp_path, capsys,
                                                         monkeypatch, damage):
    """A file whose digest matches but whose weights are NaN or whose recorded values are
    of the wrong kind (written by other code, edited): a one-line error on loading, not a
    NaN accuracy or a traceback later."""
    import capsnet.checkpoints
    model, _ = weights_file
    meta = dict(META)
    if damage == "nan":  # save_weights refuses NaN; written as other code could write it
        with torch.no_grad():
            model.digits.weight[0, 0, 0] = float("nan")
        monkeypatch.setattr(capsnet.checkpoints, "refuse_non_finite", lambda *a: None)
    else:
        meta[damage] = {"recon_weight": "x", "val_size": -3, "train_pool": "garbage"}[damage]
    save_weights(model, tmp_path / "bad.safetensors", meta)
    monkeypatch.undo()
    code = main(["evaluate", str(tmp_path / "bad.safetensors"), "--test-size", "4"])
    err = capsys.readouterr().err
    want = "not finite" if damage == "nan" else f"'{damage}' must be"
    assert one_line_error(code, err) and want in err, err


def test_a_recorded_val_size_too_large_is_named_as_recorded(tmp_path, fashion_dir, capsys):
    """A weights file (or run config) recording more validation images than the dataset has
    training images: the error names the file's record, not a --val-size flag the user
    never gave."""
    from capsnet.data.registry import FASHION_CLASSES
    from capsnet.models import build_model
    path = tmp_path / "m.safetensors"
    save_weights(build_model("capsnet", {"conv_channels": 8, "primary_types": 2}), path,
                 {"classes": list(FASHION_CLASSES), "dataset": "fashion-mnist",
                  "val_size": 10**9})
    code = main(["evaluate", str(path), "--split", "val", "--data-dir", str(fashion_dir)])
    err = capsys.readouterr().err
    assert one_line_error(code, err), err
    assert f"{path}: its run's val_size 1000000000 leaves no training images" in err
    assert "--val-size" not in err
