"""Image decoding as cv2.imread(IMREAD_COLOR) sees files: BGR, EXIF rotation, greyscale, CMYK, RGBA, palette,
16-bit; unreadable files reported by name; image lists from folders and list files; output names."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from uniter_fast.extract.images import ImageFiles, list_images, load_bgr, output_names


def colour(height: int = 12, width: int = 20) -> np.ndarray:
    rng = np.random.default_rng(height * width)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_rgb_png_becomes_bgr(tmp_path) -> None:
    rgb = colour()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    assert np.array_equal(load_bgr(str(tmp_path / "a.png")), rgb[:, :, ::-1])


def test_greyscale_is_replicated(tmp_path) -> None:
    grey = colour()[:, :, 0]
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    out = load_bgr(str(tmp_path / "g.png"))
    assert out.shape == (12, 20, 3) and all(np.array_equal(out[:, :, c], grey) for c in range(3))


def test_rgba_drops_alpha_without_compositing(tmp_path) -> None:
    rgba = np.concatenate([colour(), np.zeros((12, 20, 1), dtype=np.uint8)], axis=2)  # fully transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "t.png")
    assert np.array_equal(load_bgr(str(tmp_path / "t.png")), rgba[:, :, 2::-1])


def test_cmyk_and_palette_convert(tmp_path) -> None:
    rgb = colour()
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    out = load_bgr(str(tmp_path / "c.jpg"))
    assert out.shape == (12, 20, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb[:, :, ::-1].astype(int)).mean() < 20  # JPEG-lossy, same picture
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(tmp_path / "p.png")
    assert np.array_equal(load_bgr(str(tmp_path / "p.png")), np.asarray(pal.convert("RGB"))[:, :, ::-1])


def test_sixteen_bit_is_scaled_to_eight(tmp_path) -> None:
    deep = (np.arange(12 * 20, dtype=np.uint16).reshape(12, 20) * 250).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    out = load_bgr(str(tmp_path / "d.png"))
    assert np.array_equal(out[:, :, 0], (deep >> 8).astype(np.uint8))


def test_exif_orientation_is_applied(tmp_path) -> None:
    rgb = np.zeros((16, 32, 3), dtype=np.uint8)
    rgb[:8, :8] = [255, 0, 0]  # red block at the top-left of the stored pixels (one JPEG block)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(rgb).save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = load_bgr(str(tmp_path / "r.jpg")).astype(int)
    assert out.shape == (32, 16, 3)  # displayed portrait, as cv2.imread returns it
    corner = out[1:7, -7:-1].mean(axis=(0, 1))  # the block moved to the top-right; BGR, so red is channel 2
    assert corner[2] > 200 and corner[0] < 60 and out[-8:, :8].mean() < 30


def test_unreadable_files_are_reported_by_name(tmp_path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    Image.fromarray(colour()).save(tmp_path / "good.jpg")
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="bad.jpg"):
        load_bgr(str(tmp_path / "bad.jpg"))
    files = ImageFiles([str(tmp_path / n) for n in ("bad.jpg", "good.jpg", "cut.jpg")])
    results = [files[i] for i in range(3)]
    assert results[0][1] is None and "bad.jpg" in results[0][2]
    assert results[1][1].shape == (12, 20, 3) and results[1][2] is None
    assert results[2][1] is None and results[2][2]


def test_folder_and_list_file(tmp_path) -> None:
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for rel in ("b.JPG", "a.png", "sub/c.jpeg", "notes.txt"):
        (tmp_path / "imgs" / rel).write_bytes(b"x")
    found = list_images(str(tmp_path / "imgs"))
    assert [p.split("imgs/")[1] for p in found] == ["a.png", "b.JPG", "sub/c.jpeg"]
    listing = tmp_path / "imgs" / "list.txt"
    listing.write_text("# my images\nsub/c.jpeg\n\n" + str(tmp_path / "imgs" / "a.png") + "\n")
    assert list_images(str(listing)) == [str(tmp_path / "imgs" / "sub" / "c.jpeg"), str(tmp_path / "imgs" / "a.png")]
    assert output_names(found, str(tmp_path / "imgs")) == ["a", "b", "sub__c"]
    with pytest.raises(FileNotFoundError, match="neither a folder nor a list file"):
        list_images(str(tmp_path / "nope"))


def test_colliding_names_are_an_error(tmp_path) -> None:
    paths = [str(tmp_path / "x.jpg"), str(tmp_path / "x.png")]
    with pytest.raises(ValueError, match=r"x\.jpg.*x\.png.*x\.npz"):
        output_names(paths, str(tmp_path))
