"""load_image: every awkward input becomes RGB or one clear InputError; all cases are generated here."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from egm_edge.errors import InputError
from egm_edge.runtime.image import DEFAULT_MAX_PIXELS, decode_data_url, load_image, to_rgb


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def _noise(w=64, h=48, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png_with_header(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h but whose data is a few bytes: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_rgb_jpeg_path_and_bytes_and_pil(tmp_path):
    p = _save(_noise(), tmp_path / "a.jpg", quality=95)
    for src in (p, str(p), p.read_bytes(), Image.open(p)):
        img = load_image(src)
        assert img.mode == "RGB" and img.size == (64, 48)
        assert np.asarray(img).shape == (48, 64, 3)  # pixels owned after the file is closed


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    p = _save(Image.new("CMYK", (32, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    img = load_image(p)
    assert img.mode == "RGB"
    r, g, b = np.asarray(img).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60  # cyan-free, magenta+yellow = red


def test_rgba_png_alpha_on_white(tmp_path):
    a = np.zeros((10, 20, 4), np.uint8)
    a[:, :10] = (0, 0, 0, 0)  # fully transparent black -> white
    a[:, 10:] = (0, 0, 0, 255)  # opaque black stays black
    p = _save(Image.fromarray(a), tmp_path / "rgba.png")
    out = np.asarray(load_image(p))
    assert (out[:, :10] == 255).all() and (out[:, 10:] == 0).all()


def test_half_alpha_blends_with_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    v = np.asarray(load_image(img))[0, 0, 0]
    assert 125 <= v <= 129


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 1000, 32896, 65535]], np.uint16).repeat(4, 0)
    p = _save(Image.fromarray(a), tmp_path / "g16.png")
    out = np.asarray(load_image(p))[0, :, 0]
    assert out.tolist() == [0, 4, 128, 255]


@pytest.mark.parametrize(
    "img, expect",
    [
        (Image.new("L", (4, 4), 77), 77),
        (Image.new("LA", (4, 4), (0, 0)), 255),
        (Image.new("1", (4, 4), 1), 255),
        (Image.fromarray(np.full((4, 4), 65535, np.int32)), 255),
        (Image.fromarray(np.full((4, 4), 0.5, np.float32)), 128),
    ],
    ids=["L", "LA", "1", "I", "F"],
)
def test_other_modes(img, expect):
    out = load_image(img)
    assert out.mode == "RGB" and int(np.asarray(out)[0, 0, 0]) == expect


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.info["transparency"] = 0
    p = _save(img, tmp_path / "p.png", transparency=0)
    assert np.asarray(load_image(p))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_6_swaps_width_and_height(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    p = _save(_noise(40, 20), tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_image(p).size == (20, 40)
    assert load_image(p, exif_transpose=False).size == (40, 20)


def _message(src, **kw) -> str:
    with pytest.raises(InputError) as e:
        load_image(src, **kw)
    return str(e.value)


def test_truncated_jpeg(tmp_path):
    data = (_save(_noise(256, 256), tmp_path / "full.jpg", quality=95)).read_bytes()
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    msg = _message(p)
    assert "cut.jpg" in msg and "truncated" in msg


def test_missing_dir_empty_and_text_files(tmp_path):
    assert "does not exist" in _message(tmp_path / "nope.jpg")
    assert "directory" in _message(tmp_path)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert "empty" in _message(empty) and "empty.jpg" in _message(empty)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a jpeg\n")
    msg = _message(text)
    assert "notes.jpg" in msg and "not an image" in msg
    assert "not an image" in _message(b"hello")
    assert "empty" in _message(b"")
    assert "must be a path" in _message(12)


@pytest.mark.parametrize("w, h", [(10_000, 10_000), (100_000, 100_000)])
def test_decompression_bomb_header_refused_without_decoding(tmp_path, w, h):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_with_header(w, h))
    t0 = time.perf_counter()
    msg = _message(p)
    assert time.perf_counter() - t0 < 1.0
    assert "bomb.png" in msg and "decompression bomb" in msg.lower()
    assert w * h > DEFAULT_MAX_PIXELS


def test_max_pixels_is_honoured(tmp_path):
    p = _save(_noise(64, 48), tmp_path / "a.png")
    assert "64x48 = 3,072 pixels" in _message(p, max_pixels=3000)
    assert load_image(p, max_pixels=3072).size == (64, 48)


def test_multiline_message_free():
    assert "\n" not in _message(b"garbage bytes")


def test_data_url_round_trip(tmp_path):
    buf = io.BytesIO()
    _noise(8, 8).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    assert decode_data_url(url) == buf.getvalue()
    assert load_image(url).size == (8, 8)
    unpadded = url.rstrip("=")
    assert decode_data_url(unpadded) == buf.getvalue()


@pytest.mark.parametrize(
    "url, needle",
    [
        ("http://example.com/a.png", "not a data URL"),
        ("data:text/plain;base64,aGVsbG8=", "not an image"),
        ("data:image/png,rawbytes", "not base64"),
        ("data:image/png;base64,", "no data"),
        ("data:image/png;base64,@@@@", "invalid base64"),
    ],
)
def test_data_url_errors(url, needle):
    with pytest.raises(InputError, match=needle):
        decode_data_url(url)


def test_data_url_size_cap():
    url = "data:image/png;base64," + base64.b64encode(b"x" * 3000).decode()
    with pytest.raises(InputError, match="over the limit"):
        decode_data_url(url, max_bytes=1000)


def test_to_rgb_keeps_rgb_object():
    img = Image.new("RGB", (2, 2))
    assert to_rgb(img) is img
