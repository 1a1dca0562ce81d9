"""Image folders as users' disks hold them: other test subfolders, symlinks, hidden files, 16-bit and
transparent images, truncated files, and the cached parallel pre-check."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from glow_lightning.data import ImageFolderDataModule
from glow_lightning.data import folder as folder_module
from glow_lightning.data.base import DatasetError
from glow_lightning.data.folder import find_images, load_image

from .fixtures import write_image_folder, write_jpegs, write_png16

FAST = dict(download=False, batch_size=4, num_workers=0)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """The pre-check's cache goes to a fresh folder per test, never the user's ~/.cache."""
    monkeypatch.setenv("GLOW_CACHE_DIR", str(tmp_path / "cache"))


def split_folders(root, train=("a", "b"), test=("a", "retina", "motorcycle_right")) -> str:
    write_image_folder(str(root / "train"), classes=train, per_class=3)
    write_image_folder(str(root / "test"), classes=test, per_class=2)
    return str(root)


def labels_by_folder(dm, split: str) -> dict[str, set[int]]:
    dataset = dm.splits[split].dataset
    out: dict[str, set[int]] = {}
    for path, label in zip(dataset.paths, dataset.labels):
        out.setdefault(os.path.basename(os.path.dirname(path)), set()).add(label)
    return out


def test_unconditional_models_take_test_subfolders_the_training_folder_lacks(tmp_path):
    dm = ImageFolderDataModule(data_dir=split_folders(tmp_path), val_size=1, **FAST)
    dm.setup()
    assert len(dm.splits["test"]) == 6 and dm.num_classes == 0
    # labels still reach the batch where the class exists (glow manipulate uses them); others get -1
    assert labels_by_folder(dm, "test") == {"a": {0}, "retina": {-1}, "motorcycle_right": {-1}}
    assert labels_by_folder(dm, "train") == {"a": {0}, "b": {1}}


def test_class_conditional_models_refuse_unknown_test_classes_naming_both_folders(tmp_path):
    root = split_folders(tmp_path)
    dm = ImageFolderDataModule(data_dir=root, class_conditional=True, val_size=1, **FAST)
    with pytest.raises(DatasetError) as err:
        dm.setup("test")
    message = str(err.value)
    assert "\n" not in message
    assert os.path.join(root, "test") in message and os.path.join(root, "train") in message
    assert "['motorcycle_right', 'retina']" in message and "['a', 'b']" in message


def test_loose_test_images_are_unlabelled_unless_class_conditional(tmp_path):
    write_image_folder(str(tmp_path / "train"), classes=("a", "b"), per_class=3)
    write_image_folder(str(tmp_path / "test"), classes=(), per_class=3)
    dm = ImageFolderDataModule(data_dir=str(tmp_path), val_size=1, **FAST)
    dm.setup("test")
    assert set(dm.splits["test"].dataset.labels) == {-1}
    with pytest.raises(DatasetError, match="must hold one subfolder per class"):
        ImageFolderDataModule(data_dir=str(tmp_path), class_conditional=True, **FAST).setup("test")


def test_symlink_loops_and_links_to_ancestors_count_each_file_once(tmp_path):
    root = tmp_path / "photos"
    write_image_folder(str(root), classes=(), per_class=5)
    os.makedirs(root / "loop")
    os.symlink(root / "loop", root / "loop" / "self")  # loop/self -> loop
    os.symlink(root, root / "loop" / "up")  # a link to an ancestor
    os.symlink(root / "img0.jpg", root / "loop" / "again.jpg")  # a second name for a file
    outside = tmp_path / "elsewhere"
    write_image_folder(str(outside), classes=(), per_class=2)
    os.symlink(outside, root / "linked")  # a linked folder is followed
    found = find_images(str(root))
    assert len(found) == 7
    assert len({os.path.realpath(p) for p in found}) == 7
    assert sum("linked" in p for p in found) == 2


def test_hidden_files_and_folders_are_skipped(tmp_path):
    root = tmp_path / "photos"
    write_image_folder(str(root), classes=(), per_class=3)
    good = Image.new("RGB", (8, 8))
    for hidden in (".DS_Store", "._img0.jpg", "__MACOSX/._img1.png", "__MACOSX/img1.png", ".thumbs/t.png"):
        os.makedirs(os.path.dirname(root / hidden), exist_ok=True)
        good.save(root / hidden, format="PNG")
    assert sorted(os.path.basename(p) for p in find_images(str(root))) == ["img0.jpg", "img1.jpg", "img2.png"]
    # hidden folders are not classes either
    write_image_folder(str(tmp_path / "classes"), classes=("cats", "dogs"), per_class=3)
    os.makedirs(tmp_path / "classes" / "__MACOSX")
    os.makedirs(tmp_path / "classes" / ".git")
    assert ImageFolderDataModule(data_dir=str(tmp_path / "classes"), **FAST).classes == ["cats", "dogs"]


def pixels(path, channels=1, size=16) -> np.ndarray:
    return load_image(str(path), channels, size).numpy()


def test_16_bit_images_are_read_as_p_shifted_right_by_8(tmp_path):
    ramp = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)  # 0..65535
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    assert np.array_equal(pixels(tmp_path / "grey16.png")[0], (ramp >> 8).astype(np.uint8))
    rgb = np.stack([ramp, ramp.T, 65535 - ramp], axis=-1)
    write_png16(str(tmp_path / "rgb16.png"), rgb)
    assert np.array_equal(pixels(tmp_path / "rgb16.png", 3), (rgb >> 8).astype(np.uint8).transpose(2, 0, 1))
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "int32.tif")  # mode I within 0..65535
    assert np.array_equal(pixels(tmp_path / "int32.tif")[0], (ramp >> 8).astype(np.uint8))


def test_transparent_pixels_are_composited_onto_white(tmp_path):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red everywhere, transparent on the left half
    rgba[:, 8:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = pixels(tmp_path / "rgba.png", 3)
    assert (out[:, :, :8] == 255).all() and (out[:, :, 8:] == np.array([200, 0, 0])[:, None, None]).all()
    Image.fromarray(rgba, "RGBA").convert("LA").save(tmp_path / "la.png")
    grey = pixels(tmp_path / "la.png")
    assert (grey[:, :, :8] == 255).all() and (grey[:, :, 8:] < 100).all()
    palette = Image.fromarray(rgba[..., :3], "RGB").quantize(4)
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])
    palette.save(tmp_path / "p.png", transparency=palette.info["transparency"])
    assert (pixels(tmp_path / "p.png", 3) == 255).all()  # every pixel has the transparent palette index


def test_float_and_32_bit_images_are_refused_naming_the_file(tmp_path):
    Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32)).save(tmp_path / "depth.tif")
    Image.fromarray(np.full((16, 16), 70_000, dtype=np.int32)).save(tmp_path / "counts.tif")
    write_image_folder(str(tmp_path), classes=(), per_class=3)
    with pytest.raises(DatasetError, match=r"2 of 5 image files cannot be read") as err:
        ImageFolderDataModule(data_dir=str(tmp_path), **FAST).setup("fit")
    assert "depth.tif (float pixels (mode F)" in str(err.value)
    assert "counts.tif (32-bit integer pixels" in str(err.value)


def test_cmyk_is_converted_through_its_icc_profile(tmp_path, monkeypatch):
    """A CMYK JPEG without a profile uses Pillow's formula; with one, ImageCms maps it to sRGB."""
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red ink
    cmyk.save(tmp_path / "plain.jpg", quality=100)
    red = pixels(tmp_path / "plain.jpg", 3)
    assert red[0].min() > 240 and red[1:].max() < 15
    calls = []

    def profile_to_profile(img, source, target, outputMode):  # noqa: N803 (Pillow's keyword)
        calls.append((img.mode, outputMode))
        return Image.new("RGB", img.size, (1, 2, 3))

    monkeypatch.setattr(folder_module.ImageCms, "ImageCmsProfile", lambda f: f.read())
    monkeypatch.setattr(folder_module.ImageCms, "profileToProfile", profile_to_profile)
    cmyk.save(tmp_path / "profiled.jpg", quality=100, icc_profile=b"a CMYK profile")
    assert (pixels(tmp_path / "profiled.jpg", 3) == np.array([1, 2, 3])[:, None, None]).all()
    assert calls == [("CMYK", "RGB")]


def truncated_jpeg(folder) -> str:
    path = os.path.join(folder, "cut.jpg")
    os.rename(write_jpegs(os.path.join(folder, "..", "src"), 1, size=64, seed=9)[0], path)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with Image.open(path) as img:
        assert img.size == (64, 64)  # the header is intact: opening it is not enough to notice
    return path


def test_truncated_jpegs_are_found_before_training(tmp_path):
    write_jpegs(str(tmp_path / "photos"), 6)
    bad = truncated_jpeg(tmp_path / "photos")
    with pytest.raises(
        DatasetError, match=r"1 of 7 image files cannot be read:\n  .*cut\.jpg \(image file is truncated"
    ):
        ImageFolderDataModule(data_dir=str(tmp_path / "photos"), **FAST).setup("fit")
    dm = ImageFolderDataModule(data_dir=str(tmp_path / "photos"), skip_unreadable=True, val_size=1, **FAST)
    with pytest.warns(UserWarning, match=r"1 of 7 image files cannot be read and are skipped:\n  .*cut\.jpg"):
        dm.setup()
    every = [p for s in ("train", "val", "test") for p in dm.splits[s].dataset.paths]
    assert len(set(every)) == 6 and bad not in every  # val is held out of the train dataset
    for item in dm.splits["train"]:
        assert item["pixels"].shape == (3, 64, 64)


def test_the_check_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    paths = write_jpegs(str(tmp_path / "photos"), 8)
    decoded = []
    check = folder_module.check_image
    monkeypatch.setattr(folder_module, "check_image", lambda p, channels: decoded.append(p) or check(p, channels))

    def setup():
        ImageFolderDataModule(data_dir=str(tmp_path / "photos"), val_size=1, **FAST).setup("fit")

    before = sorted(os.listdir(tmp_path / "photos"))
    setup()
    assert len(decoded) == 8
    setup()
    assert len(decoded) == 8  # nothing decoded again
    st = os.stat(paths[3])
    os.utime(paths[3], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: decoded again
    setup()
    assert decoded[8:] == [paths[3]]
    assert sorted(os.listdir(tmp_path / "photos")) == before  # nothing written into the data folder
    (tmp_path / "file").write_text("a file where the cache folder would be")
    monkeypatch.setenv("GLOW_CACHE_DIR", str(tmp_path / "file" / "cache"))  # not writable: check without it
    setup()
    setup()
    assert len(decoded) == 9 + 16


def test_skip_unreadable_needs_the_check():
    with pytest.raises(ValueError, match="skip_unreadable=True needs check_files=True"):
        ImageFolderDataModule(skip_unreadable=True, check_files=False)


def test_the_check_runs_in_parallel_threads(tmp_path, monkeypatch):
    import threading

    paths = write_jpegs(str(tmp_path / "photos"), 12)
    threads = set()
    check = folder_module.check_image
    monkeypatch.setattr(folder_module, "check_image", lambda p, c: threads.add(threading.get_ident()) or check(p, c))
    from glow_lightning.data.imagecheck import find_unreadable

    assert find_unreadable(paths, lambda p: folder_module.check_image(p, 3), cache=False, workers=3) == []
    assert len(threads) >= 2 and threading.get_ident() not in threads
    assert torch.equal(load_image(paths[0], 3, 64), load_image(paths[0], 3, 64))
