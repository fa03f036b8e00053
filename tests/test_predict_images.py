"""Any image file a user gives ``predict``: a model input, or a one-line error naming the file."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from capsnet.cli import main
from capsnet.errors import CapsnetError
from capsnet.evaluate import load_image

SIZE = 28


def square(mode, fg, bg, n=56):
    """An n x n image of colour ``bg`` with a centred square of colour ``fg`` (half its side)."""
    img = Image.new(mode, (n, n), bg)
    img.paste(fg, (n // 4, n // 4, 3 * n // 4, 3 * n // 4))
    return img


def check(x, channels=1):
    """A well-formed model input; returns it as [C, SIZE, SIZE]."""
    assert x.shape == (channels, SIZE, SIZE) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1
    return x


def centre_and_corner(x):
    return float(x[:, 10:18, 10:18].mean()), float(x[:, :3, :3].mean())


def fake_png(path, width, height):
    """A PNG whose header claims width x height, but with (almost) no pixel data behind it."""
    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grey
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b""))
    return path


# ---------------------------------------------------------------- images that must work

@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16_bit_scaled_not_clipped(tmp_path, suffix):
    a = np.full((56, 56), 1000, np.uint16)  # dim background: 1000/65535, not 255/255
    a[14:42, 14:42] = 60000
    path = tmp_path / f"deep.{suffix}"
    img = Image.fromarray(a) if suffix == "png" else Image.fromarray(a.astype(np.int32))
    img.save(path)
    assert Image.open(path).mode == ("I;16" if suffix == "png" else "I")
    centre, corner = centre_and_corner(check(load_image(path, 1, SIZE, "no")))
    assert centre == pytest.approx(60000 / 65535, abs=0.01)
    assert corner == pytest.approx(1000 / 65535, abs=0.01)


@pytest.mark.parametrize("channels", [1, 3])
def test_cmyk_jpeg(tmp_path, channels):
    path = tmp_path / "cmyk.jpg"
    square("CMYK", (0, 0, 0, 0), (0, 0, 0, 255)).save(path, quality=95)  # white on black
    centre, corner = centre_and_corner(check(load_image(path, channels, SIZE), channels))
    assert centre > 0.9 and corner < 0.1


def test_animated_gif_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    first, second = square("L", 255, 0), Image.new("L", (56, 56), 128)
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0)
    assert Image.open(path).n_frames == 2
    centre, corner = centre_and_corner(check(load_image(path, 1, SIZE, "no")))
    assert centre > 0.9 and corner < 0.1


def transparent(mode, grey):
    """A ``grey`` opaque square in a transparent field of the same hidden colour."""
    rgba = square("RGBA", (grey, grey, grey, 255), (grey, grey, grey, 0))
    if mode == "LA":
        return rgba.convert("LA")
    if mode == "P":  # a palette with one transparent entry
        p = square("P", 1, 0)
        p.putpalette([grey] * 6)
        p.info["transparency"] = 0
        return p
    return rgba


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
@pytest.mark.parametrize("grey", [255, 0], ids=["light-object", "dark-object"])
def test_transparency_becomes_background(tmp_path, mode, grey):
    """Either way the model sees what Fashion-MNIST shows: a light object on black."""
    path = tmp_path / f"{mode}-{grey}.png"
    transparent(mode, grey).save(path)
    for channels in (1, 3):
        centre, corner = centre_and_corner(check(load_image(path, channels, SIZE), channels))
        assert centre > 0.9 and corner < 0.1, (channels, centre, corner)


def test_transparency_with_forced_inversion(tmp_path):
    path = tmp_path / "dark.png"
    transparent("RGBA", 0).save(path)
    assert centre_and_corner(load_image(path, 1, SIZE, "yes")) == pytest.approx((1, 0), abs=0.01)
    path = tmp_path / "light.png"
    transparent("RGBA", 255).save(path)
    assert centre_and_corner(load_image(path, 1, SIZE, "no")) == pytest.approx((1, 0), abs=0.01)


def test_fully_transparent_is_blank(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (30, 30), (255, 255, 255, 0)).save(path)
    assert check(load_image(path, 1, SIZE)).max() == 0


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_large_photo_is_reduced_cheaply(tmp_path, suffix, monkeypatch):
    """A 5000x3000 photo: a JPEG is decoded at 1/8 of its size (Pillow's draft mode; on
    2 cores about 0.01 s, a PNG decoded whole about 0.15 s) and both come out right."""
    path = tmp_path / f"big.{suffix}"
    img = Image.new("RGB", (5000, 3000), "black")
    img.paste((255, 255, 255), (1250, 750, 3750, 2250))
    img.save(path, **({"quality": 90} if suffix == "jpg" else {"compress_level": 1}))
    resized, resize = [], Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize",
                        lambda self, *a, **k: resized.append(self.size) or resize(self, *a, **k))
    x = check(load_image(path, 3, SIZE), 3)
    side = 5000 // 8 if suffix == "jpg" else 5000  # the square the final resize starts from
    assert resized == [(side, side)], resized
    centre, corner = centre_and_corner(x)
    assert centre > 0.9 and corner < 0.1


def test_non_square_is_padded_or_stretched(tmp_path):
    path = tmp_path / "wide.png"
    img = Image.new("L", (90, 30), 0)
    img.paste(255, (0, 0, 45, 30))  # left half light
    img.save(path)
    x = check(load_image(path, 1, SIZE, "no", "stretch"))
    assert x[:, :, :12].min() > 0.9 and x[:, :, 16:].max() < 0.1
    # padded (the default): the 90x30 image sits in the middle third of a 90x90 square of
    # its border's mean colour (mean of the edges: between the dark and the light half)
    x = check(load_image(path, 1, SIZE, "no"))
    band, above = x[:, 11:17], x[:, :8]
    assert band[:, :, :12].min() > 0.9 and band[:, :, 16:].max() < 0.1
    fill = above.mean().item()
    assert 0.3 < fill < 0.7 and (above - fill).abs().max() < 0.02
    # a light square on a dark wide canvas stays square (stretching would halve its width)
    img = Image.new("L", (112, 56), 0)
    img.paste(255, (36, 8, 76, 48))  # 40 x 40
    img.save(path)
    x = check(load_image(path, 1, SIZE, "no"))[0] > 0.5
    rows, cols = x.any(dim=1).sum().item(), x.any(dim=0).sum().item()
    assert abs(rows - cols) <= 1 and 8 <= rows <= 12
    # cropped: the centre 56x56, which the square fills to 40/56 of its side
    x = check(load_image(path, 1, SIZE, "no", "crop"))[0] > 0.5
    rows, cols = x.any(dim=1).sum().item(), x.any(dim=0).sum().item()
    assert abs(rows - cols) <= 1 and 19 <= rows <= 21
    with pytest.raises(ValueError, match="fit"):
        load_image(path, 1, SIZE, "no", "auto")  # model_input's choice, not load_image's


def test_exif_orientation_applied(tmp_path):
    path = tmp_path / "phone.jpg"
    img = Image.new("L", (56, 56), 0)
    img.paste(255, (0, 0, 28, 56))  # stored: left half light
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    img.save(path, exif=exif, quality=95)
    x = check(load_image(path, 1, SIZE, "no"))
    assert x[:, :12].mean() > 0.9 and x[:, 16:].mean() < 0.1  # displayed: top half light


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "1", "P"])
def test_one_pixel(tmp_path, mode):
    path = tmp_path / f"dot-{mode}.png"
    Image.new(mode, (1, 1), 1).save(path)
    for channels in (1, 3):
        x = check(load_image(path, channels, SIZE), channels)
        assert (x == x[:, :1, :1]).all()  # uniform


# ---------------------------------------------------------------- files that must be refused

def truncated(path, img, **kw):
    img.save(path, **kw)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def noise():
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    return Image.fromarray(pixels)


BAD = {  # file name: (how to make it in a folder, words the error must contain)
    "empty.png": (lambda p: p.write_bytes(b""), "empty"),
    "missing.png": (lambda p: None, "no such file"),
    "folder.png": (lambda p: p.mkdir(), "folder"),
    "notes.png": (lambda p: p.write_text("just some text\nover two lines\n"), "not an image"),
    "cut.png": (lambda p: truncated(p, noise()), "cut.png"),
    "cut.jpg": (lambda p: truncated(p, noise(), quality=95), "truncated"),
    "huge.png": (lambda p: fake_png(p, 20000, 20000), "too large"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_file_one_line_error(tmp_path, name):
    make, words = BAD[name]
    path = tmp_path / name
    make(path)
    with pytest.raises(CapsnetError) as e:
        load_image(path, 1, SIZE)
    msg = str(e.value)
    assert name in msg and words in msg and "\n" not in msg, msg


def test_enormous_image_refused_from_its_header(tmp_path, monkeypatch):
    from PIL import ImageFile
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self))
    path = fake_png(tmp_path / "huge.png", 20000, 20000)  # 400 megapixels, 98 bytes
    with pytest.raises(CapsnetError, match=r"huge.png: image too large .*400000000 pixels"):
        load_image(path, 1, SIZE)
    assert loads == []  # refused before any pixel was decoded


# ---------------------------------------------------------------- the command, end to end

def test_predict_command_mixed_files(tmp_path, capsys):
    from capsnet.models import build_model
    from capsnet.weights import save_weights
    model = tmp_path / "m.safetensors"
    save_weights(build_model("capsnet", {"conv_channels": 8, "primary_types": 2}), model,
                 {"classes": [str(i) for i in range(10)], "dataset": "fashion-mnist"})
    a = np.zeros((40, 40), np.uint16)
    a[10:30, 10:30] = 50000
    Image.fromarray(a).save(good16 := tmp_path / "deep.png")
    transparent("RGBA", 0).save(rgba := tmp_path / "cutout.png")
    square("CMYK", (0, 0, 0, 0), (0, 0, 0, 255)).save(cmyk := tmp_path / "cmyk.jpg")
    square("L", 255, 0).save(gif := tmp_path / "anim.gif", save_all=True,
                             append_images=[Image.new("L", (56, 56))])
    Image.new("L", (1, 1), 200).save(dot := tmp_path / "dot.png")
    good = [good16, rgba, cmyk, gif, dot]
    bad = []
    for name, (make, _) in BAD.items():
        make(tmp_path / name)
        bad.append(tmp_path / name)
    files = [good[0], *bad[:3], *good[1:], *bad[3:]]  # interleaved: errors do not stop it
    code = main(["predict", "--model", str(model), *map(str, files)])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    assert [line.split(":")[0] for line in out.splitlines()] == [str(p) for p in good]
    errors = err.splitlines()
    assert len(errors) == len(bad)
    for line, path in zip(errors, bad):
        assert line.startswith(f"capsnet: error: {path}: "), line


# ---------------------------------------------------------------- the model decides the rest

def _tiny(tmp_path, name, dataset, **config):
    from capsnet.models import build_model
    from capsnet.weights import save_weights
    model = build_model("capsnet", {"conv_channels": 8, "primary_types": 2, **config})
    n = model.config.num_classes
    path = tmp_path / f"{name}.safetensors"
    save_weights(model, path, {"classes": [f"c{i}" for i in range(n)], "dataset": dataset})
    return path


def _lengths(capsys, model, image, *flags):
    assert main(["predict", "--model", str(model), "--json", *flags, str(image)]) == 0
    import json
    return json.loads(capsys.readouterr().out)["lengths"]


def test_invert_auto_only_for_light_on_dark_models(tmp_path, capsys):
    """A photo on a light background is inverted for a Fashion-MNIST model (light garments on
    black), never for a CIFAR one, which was trained on photos as they are."""
    square("RGB", (40, 40, 40), (250, 250, 250)).save(photo := tmp_path / "photo.png")
    fashion = _tiny(tmp_path, "fashion", "fashion-mnist")
    cifar = _tiny(tmp_path, "cifar", "cifar10", in_channels=3, image_size=32)
    assert _lengths(capsys, fashion, photo) == _lengths(capsys, fashion, photo, "--invert", "yes")
    plain = _lengths(capsys, cifar, photo, "--invert", "no")
    assert plain != _lengths(capsys, cifar, photo, "--invert", "yes")  # the test can tell
    assert _lengths(capsys, cifar, photo) == plain


def test_stereo_model_gets_the_picture_for_both_cameras(tmp_path, capsys):
    square("RGB", (200, 30, 30), (0, 0, 0)).save(path := tmp_path / "toy.png")
    x = check(load_image(path, 2, SIZE), channels=2)
    assert torch.equal(x[0], x[1]) and torch.equal(x[:1], load_image(path, 1, SIZE))
    norb = _tiny(tmp_path, "norb", "smallnorb", in_channels=2, image_size=32, num_classes=5)
    assert len(_lengths(capsys, norb, path)) == 5
    with pytest.raises(CapsnetError, match="4 input channels"):
        load_image(path, 4, SIZE)


def test_multi_label_predict_names_the_present_classes(tmp_path, capsys):
    tags = _tiny(tmp_path, "tags", "multilabel", num_classes=4, multi_label=True)
    square("L", 255, 0).save(path := tmp_path / "x.png")
    assert main(["predict", "--model", str(tags), str(path)]) == 0
    line = capsys.readouterr().out
    assert "; present: " in line
    present = line.split("; present: ")[1].split(";")[0]
    lengths = [float(v) for v in line.split("capsule lengths: ")[1].split()]
    names = [f"c{i}" for i, v in enumerate(lengths) if v > 0.5]
    assert present == (", ".join(names) or "none")


# --------------------------------------------------------------------------- as trained

def test_folder_model_sees_the_picture_as_its_training_reader_made_it(tmp_path):
    """For a model trained on your folders, predict prepares a picture with the folder
    reader itself: the centre square (not a padded one), upright by its EXIF orientation,
    grey or colour as the model takes it."""
    from types import SimpleNamespace

    from capsnet.data.folder import load_images
    from capsnet.evaluate import model_input
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # stored rotated: shown turned 90 degrees clockwise
    img.save(path := tmp_path / "photo.jpg", exif=exif, quality=95)
    for channels in (3, 1):
        config = SimpleNamespace(in_channels=channels, image_size=16)
        x = model_input(path, config, "folder", invert="no")
        trained = load_images([path], 16)[0].float() / 255  # [3, 16, 16]: a colour picture
        if channels == 1:
            grey = Image.fromarray(load_images([path], 16)[0].permute(1, 2, 0).numpy())
            trained = torch.from_numpy(np.array(grey.convert("L"))).float()[None] / 255
        assert torch.equal(x, trained)
    stored = Image.open(path)  # the pixels as stored, without the EXIF turn
    stored.save(tmp_path / "stored.png")
    stored.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")
    assert torch.equal(load_images([path], 16), load_images([tmp_path / "upright.png"], 16))
    assert not torch.equal(load_images([path], 16), load_images([tmp_path / "stored.png"], 16))
    padded = model_input(path, SimpleNamespace(in_channels=3, image_size=16), "folder",
                         invert="no", fit="pad")
    assert not torch.equal(padded, x.expand(3, -1, -1))


def test_smallnorb_model_sees_the_centre_of_the_served_size(tmp_path):
    """smallNORB's test images are the centre 32x32 of pairs served at 48x48: a 96x96 picture
    of a test pair's view comes out close to the test image, not shrunk to 32 whole."""
    from types import SimpleNamespace

    from capsnet.evaluate import model_input
    yy, xx = np.mgrid[0:96, 0:96]
    view = (255 * np.exp(-((yy - 48) ** 2 + (xx - 40) ** 2) / (2 * 14.0 ** 2))).round()
    Image.fromarray(view.astype(np.uint8)).save(path := tmp_path / "toy.png")
    served = view.reshape(48, 2, 48, 2).mean((1, 3))  # as the reader serves it
    test_image = torch.from_numpy(served[8:40, 8:40] / 255).float()
    config = SimpleNamespace(in_channels=2, image_size=32)
    x = model_input(path, config, "smallnorb", invert="no")
    assert x.shape == (2, 32, 32) and torch.equal(x[0], x[1])
    assert (x[0] - test_image).abs().max() < 0.02
    whole = model_input(path, config, "smallnorb", invert="no", fit="pad")
    assert (whole[0] - test_image).abs().max() > 0.2  # what predict did before


def test_predict_with_an_ensemble(tmp_path, capsys):
    """`-m A -m B`: each image scored by the mean of the members' capsule lengths, each
    member given the image as its own inputs are made (here 28x28 and 32x32); members with
    other classes are a one-line error."""
    square("L", 255, 0).save(image := tmp_path / "shirt.png")
    a = _tiny(tmp_path, "a", "fashion-mnist")
    b = _tiny(tmp_path, "b", "fashion-mnist", image_size=32)
    alone = [_lengths(capsys, m, image) for m in (a, b)]
    assert alone[0] != alone[1]  # two different models: the mean can be told apart
    both = _lengths(capsys, a, image, "--model", str(b))
    assert both == pytest.approx([(x + y) / 2 for x, y in zip(*alone)], abs=2e-6)
    other = tmp_path / "other.safetensors"
    from capsnet.models import build_model
    from capsnet.weights import save_weights
    save_weights(build_model("capsnet", {"conv_channels": 8, "primary_types": 2}), other,
                 {"classes": [f"k{i}" for i in range(10)], "dataset": "fashion-mnist"})
    code = main(["predict", "-m", str(a), "-m", str(other), str(image)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "its classes are not those of" in err
