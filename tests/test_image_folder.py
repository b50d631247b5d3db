"""image_folder: folders of image files the tests write with Pillow."""

import json

import numpy as np
import pytest
from PIL import Image
from test_data_cifar_npz import TINY_RUN
from test_hostile_runs import DIGITS, cli, refused

from kdistill.data import image_folder, load_data
from kdistill.errors import KdistillError

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


@pytest.fixture(autouse=True)
def image_cache(tmp_path, monkeypatch):
    path = tmp_path / "image_cache"
    monkeypatch.setenv("KDISTILL_IMAGE_CACHE", str(path))
    return path


def write(path, colour=(255, 0, 0), size=(8, 8), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    image = image.convert(mode) if mode != "RGB" else image
    image.save(path, format=fmt)
    return path


def flowers(root, per_class=5, **options):
    for name, colour in COLOURS.items():
        for i in range(per_class):
            write(root / name / f"{i}.png", colour, **options)
    return root


def test_class_folders_with_a_carved_test_split(tmp_path):
    root = flowers(tmp_path / "flowers")
    splits = load_data("image_folder", root=root, val_size=3, test_size=0.2)
    assert splits.classes == ["blue", "green", "red"] and splits.input_shape == (3, 8, 8)
    assert len(splits.test) == 3 and sorted(splits.test.labels.tolist()) == [0, 1, 2]  # one of each class
    assert len(splits.train) + len(splits.val) == 12
    red = splits.classes.index("red")
    image = splits.test.images[splits.test.labels == red][0]
    assert image[:, 0, 0].tolist() == [255, 0, 0]  # pixels land where they were
    again = load_data("image_folder", root=root, val_size=3)
    assert again.test.labels.tolist() == splits.test.labels.tolist()  # the same carve every time
    assert splits.sources[0] == f"{root} (15 files)" and "decoded now" in splits.sources[1]
    assert "read from the cache" in again.sources[1]


def test_train_and_test_folders_are_the_splits(tmp_path):
    flowers(tmp_path / "f" / "train", per_class=4)
    flowers(tmp_path / "f" / "test", per_class=2)
    splits = load_data("image_folder", root=tmp_path / "f", val_size=2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 2, 6)


def test_greyscale_kept_and_converted(tmp_path):
    root = flowers(tmp_path / "grey", mode="L")
    assert load_data("image_folder", root=root, val_size=2).input_shape == (1, 8, 8)
    assert load_data("image_folder", root=root, val_size=2, channels=3).input_shape == (3, 8, 8)
    rgb = flowers(tmp_path / "rgb")
    grey = load_data("image_folder", root=rgb, val_size=2, channels=1)
    assert grey.input_shape == (1, 8, 8)
    assert grey.test.images[grey.test.labels == grey.classes.index("red")].unique().tolist() == [76]  # luma of red


def test_mixed_sizes_need_image_size(tmp_path):
    root = flowers(tmp_path / "f")
    write(root / "red" / "big.png", size=(20, 10))
    with pytest.raises(KdistillError, match=r"images have different sizes \(.*20x10 in .*big.png.*set "
                                            r"data.image_size=N"):
        load_data("image_folder", root=root, val_size=2)


def test_mixed_sizes_formats_and_modes_load_with_image_size(tmp_path):
    root = flowers(tmp_path / "f")
    write(root / "red" / "a.jpg", size=(30, 20), fmt="JPEG")
    write(root / "red" / "b.png", size=(9, 9), mode="RGBA")
    write(root / "green" / "c.gif", (0, 255, 0), size=(12, 12), mode="P")
    write(root / "blue" / "d.bmp", (0, 0, 255), size=(5, 7), mode="L")
    Image.fromarray(np.full((6, 6), 40000, np.uint16)).save(root / "blue" / "e.png")  # 16-bit greyscale
    splits = load_data("image_folder", root=root, val_size=2, image_size=16)
    assert splits.input_shape == (3, 16, 16) and len(splits.train) + len(splits.val) + len(splits.test) == 20


def test_unreadable_files_are_skipped_by_name(tmp_path):
    root = flowers(tmp_path / "f")
    (root / "red" / "notes.txt").write_text("not an image")
    (root / "red" / "cut.png").write_bytes(write(tmp_path / "x.png").read_bytes()[:30])
    (root / "red" / ".DS_Store").write_bytes(b"\0")  # hidden: ignored silently
    with pytest.warns(UserWarning) as caught:
        splits = load_data("image_folder", root=root, val_size=2)
    messages = [str(w.message) for w in caught]
    assert any("notes.txt" in m for m in messages) and any("cut.png" in m for m in messages)
    assert messages[-1] == "skipped 2 of 17 files that Pillow cannot read"
    assert len(splits.train) + len(splits.val) + len(splits.test) == 15


@pytest.mark.parametrize("make, message", [
    (lambda root: (flowers(root), (root / "empty").mkdir()), "class folder .*empty holds no images"),
    (lambda root: [write(root / "only" / f"{i}.png") for i in range(3)], "single class folder \\(only\\)"),
    (lambda root: [write(root / f"{i}.png") for i in range(3)], "holds no class folders: lay images out as"),
    (lambda root: (flowers(root), (root / "red" / "x.txt").write_text("x"), [p.unlink() for p in
                   (root / "red").glob("*.png")]), "class folder red .* holds no readable training images"),
])
def test_bad_folders(tmp_path, make, message):
    root = tmp_path / "f"
    root.mkdir()
    make(root)
    with pytest.raises(KdistillError, match=message):
        load_data("image_folder", root=root, val_size=1)


def test_the_cache_is_reused_and_follows_the_files(tmp_path, monkeypatch, image_cache):
    root = flowers(tmp_path / "f")
    first = load_data("image_folder", root=root, val_size=2)

    def no_decoding(*args):
        raise AssertionError("decoded again")
    monkeypatch.setattr(image_folder, "_decode_all", no_decoding)
    second = load_data("image_folder", root=root, val_size=2)
    assert (second.train.images == first.train.images).all()
    write(root / "red" / "new.png")
    with pytest.raises(AssertionError, match="decoded again"):  # a new file: a new key
        load_data("image_folder", root=root, val_size=2)
    with pytest.raises(AssertionError, match="decoded again"):  # another shape: a new key
        load_data("image_folder", root=root, val_size=2, image_size=4)


def test_a_damaged_cache_is_rebuilt(tmp_path, image_cache):
    root = flowers(tmp_path / "f")
    load_data("image_folder", root=root, val_size=2)
    (entry,) = image_cache.glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:100])
    with pytest.warns(UserWarning, match="is damaged"):
        splits = load_data("image_folder", root=root, val_size=2)
    assert "decoded now" in splits.sources[1] and len(splits.test) == 3


def test_image_folder_from_the_command_line(tmp_path, capsys):
    root = flowers(tmp_path / "f", per_class=6)
    run = ["run", DIGITS, "data.name=image_folder", f"data.root={root}", f"out_dir={tmp_path / 'runs'}", *TINY_RUN,
           "data.image_size=8", "data.val_size=2"]
    code, err = cli(capsys, *run)
    assert code == 0, err
    metrics = json.loads((tmp_path / "runs" / "digits_quick" / "metrics.json").read_text())
    assert metrics["data"]["classes"] == ["blue", "green", "red"]
    (root / "empty").mkdir()
    refused(capsys, ["check", *run[1:], "name=other"], "holds no images")
