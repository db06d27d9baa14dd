"""Safe image loading: any path, bytes or PIL image in, a fully decoded RGB PIL image out.

Contract: `load_image` either returns an RGB image whose pixels are already decoded
(so a truncated file fails here, not later inside preprocessing) or raises
`InputError` with one sentence naming the source and the problem. The pixel count
is checked from the header before any pixel is decoded, so a decompression bomb
costs nothing. Modes are normalised: EXIF orientation applied (optional, because
COCO/RefCOCO boxes are given in the stored, unrotated frame), alpha composited on
white, palette/CMYK/grey converted, 16-bit and float images scaled to 8 bits
(not clipped). `decode_data_url` turns a `data:image/...;base64,...` URL into bytes.
`reduce_to=N` shrinks a larger image by an integer factor while or right after
decoding (JPEG DCT scaling, else `Image.reduce`), never below N pixels, so a
server holds a small copy; `probe_image` reads the header only and says how
many pixels such a load decodes at once.
Only numpy and pillow are imported (this module runs on devices).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from egm_edge.errors import InputError

# 64 Mi pixels: a 48 MP phone photo passes, a crafted 20000x20000 header does not.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]

_WHITE = (255, 255, 255)


def load_image(src: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, exif_transpose: bool = True,
               reduce_to: int | None = None) -> Image.Image:
    """Open, check and fully decode an image; return it in RGB.

    src: a file path, raw bytes, a `data:image/...;base64,` URL, or a PIL image.
    max_pixels: refuse images with more pixels than this (checked before decoding).
    exif_transpose: apply the EXIF orientation tag (turn off to keep the stored
    frame, which is the frame COCO/RefCOCO boxes are annotated in).
    reduce_to: if set, an image with more pixels is shrunk by an integer factor
    (aspect ratio kept) to no fewer than this many pixels; smaller ones are untouched.
    """
    if isinstance(src, Image.Image):
        name = "the given PIL image"
        _check_size(src.size, name, max_pixels)
        _decode(src, name)
        return _finish(_reduce(src, reduce_to), name, exif_transpose)
    name, fp = _open_source(src)
    try:
        img = _open_header(fp, name)
        _check_size(img.size, name, max_pixels)
        with img:
            _draft(img, reduce_to)
            _decode(img, name)
            return _finish(_reduce(img, reduce_to), name, exif_transpose)
    finally:
        fp.close()


def probe_image(src: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                reduce_to: int | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
    """Header only, no pixel decoded: ((width, height) as stored, (width, height) that
    `load_image(src, reduce_to=reduce_to)` decodes before it reduces), checked like `load_image`."""
    if isinstance(src, Image.Image):
        _check_size(src.size, "the given PIL image", max_pixels)
        return src.size, src.size
    name, fp = _open_source(src)
    try:
        img = _open_header(fp, name)
        with img:
            size = img.size
            _check_size(size, name, max_pixels)
            _draft(img, reduce_to)
            return size, img.size
    finally:
        fp.close()


def _open_header(fp, name: str) -> Image.Image:
    """Image.open (the header only), with one sentence for each way it fails."""
    # Pillow warns above its own limit; our size check refuses those sizes anyway
    # (or the caller raised max_pixels on purpose), so the warning is not printed.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(fp)
        except Image.DecompressionBombError as e:
            raise InputError(f"Image {name} is too large to decode safely ({e}); use a smaller image.") from None
        except UnidentifiedImageError:
            raise InputError(f"Image {name} is not an image Pillow can read (unknown format or not an image file).") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise InputError(f"Image {name} has a corrupt header ({e}); re-export or replace the file.") from None


def _shrink_factor(width: int, height: int, target: int | None) -> int:
    """The largest integer k with ceil(w/k) * ceil(h/k) >= target (1 when the image is not larger)."""
    if not target or width * height <= target:
        return 1
    k = max(1, int(math.sqrt(width * height / target)))
    while k > 1 and -(-width // k) * -(-height // k) < target:
        k -= 1
    return k


def _draft(img: Image.Image, target: int | None) -> None:
    """JPEG: decode at 1/2, 1/4 or 1/8 scale directly when that still leaves >= target pixels."""
    k = _shrink_factor(*img.size, target)
    if k > 1 and img.format == "JPEG":
        w, h = img.size
        img.draft(None, (-(-w // k), -(-h // k)))


def _reduce(img: Image.Image, target: int | None) -> Image.Image:
    """Box-filter shrink by an integer factor to >= target pixels; the decoded original can then be freed."""
    k = _shrink_factor(*img.size, target)
    if k == 1:
        return img
    try:
        return img.reduce(k)
    except ValueError:  # palette, 1-bit and 16-bit modes have no reduce: convert first
        return to_rgb(img).reduce(k)


def _decode(img: Image.Image, name: str) -> None:
    """Decode every pixel now, so that truncated or corrupt data fails here with a sentence."""
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise InputError(f"Image {name} is too large to decode safely ({e}); use a smaller image.") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise InputError(f"Image {name} is truncated or corrupt ({e}); re-download or replace the file.") from None


def _open_source(src) -> tuple[str, io.IOBase]:
    """A display name and an open binary file for a path, bytes or data URL; every failure is an InputError."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise InputError("Image bytes are empty (0 bytes); send the encoded image file contents.")
        return f"<{len(data)} bytes>", io.BytesIO(data)
    if isinstance(src, str) and src.startswith("data:"):
        data = decode_data_url(src)
        return f"<data URL, {len(data)} bytes>", io.BytesIO(data)
    if not isinstance(src, (str, os.PathLike)):
        raise InputError(f"An image must be a path, bytes or a PIL image, got {type(src).__name__}.")
    path = Path(src)
    name = f"'{path}'"
    if not path.exists():
        raise InputError(f"Image file {name} does not exist; check the path.")
    if path.is_dir():
        raise InputError(f"Image path {name} is a directory, not an image file.")
    try:
        size = path.stat().st_size
        if size == 0:
            raise InputError(f"Image file {name} is empty (0 bytes); re-download or replace it.")
        return name, open(path, "rb")
    except OSError as e:
        raise InputError(f"Image file {name} cannot be read ({e.strerror or e}); check its permissions.") from None


def _check_size(size: tuple[int, int], name: str, max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise InputError(f"Image {name} has an empty size {w}x{h}; use a real image.")
    if w * h > max_pixels:
        raise InputError(
            f"Image {name} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
            "(a possible decompression bomb); downscale it or raise max_pixels."
        )


def _finish(img: Image.Image, name: str, exif_transpose: bool) -> Image.Image:
    """Orientation, then mode: always returns a new image that owns its pixels."""
    original = img
    if exif_transpose:
        try:
            img = ImageOps.exif_transpose(img)
        except Exception as e:  # noqa: BLE001 - Pillow raises many types on malformed EXIF
            raise InputError(f"Image {name} has a malformed EXIF orientation block ({e}); strip its EXIF data.") from None
    try:
        out = to_rgb(img)
    except (OSError, ValueError) as e:
        raise InputError(f"Image {name} has mode {img.mode} that cannot be converted to RGB ({e}).") from None
    return out.copy() if out is original else out


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: alpha on white, 16-bit/float scaled (not clipped)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBa", "La"):  # premultiplied alpha: un-premultiply first
        img = img.convert("RGBA" if mode == "RGBa" else "LA")
        mode = img.mode
    if mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_high_depth_to_uint8(img)).convert("RGB")
    if mode == "1":
        return img.convert("L").convert("RGB")
    return img.convert("RGB")  # L, CMYK, YCbCr, LAB, HSV


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """16-bit (and 32-bit int/float) grey to 8 bits by scaling the full range, never by clipping."""
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        return np.round(a.astype(np.float32) / 257.0).astype(np.uint8)
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(a.min()), float(a.max())
    if img.mode == "I" and lo >= 0 and hi <= 65535:
        # Pillow decodes 16-bit PNG/TIFF to mode I: the nominal range is 0..65535.
        return np.round(a / 257.0).astype(np.uint8)
    if img.mode == "F" and lo >= 0 and hi <= 1.0:
        return np.round(a * 255.0).astype(np.uint8)
    if hi == lo:
        return np.zeros(a.shape, np.uint8)
    return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)$", re.DOTALL)


def decode_data_url(url: str, *, max_bytes: int | None = None) -> bytes:
    """The bytes of a `data:image/<type>;base64,<data>` URL; a clear InputError for anything else."""
    if not isinstance(url, str):
        raise InputError(f"A data URL must be text, got {type(url).__name__}.")
    m = _DATA_URL.match(url.strip())
    if not m:
        raise InputError(f"{_clip(url)!r} is not a data URL; send 'data:image/jpeg;base64,<data>'.")
    mime = m["mime"].strip().lower()
    if not mime.startswith("image/"):
        raise InputError(f"The data URL has media type {mime or 'none'!r}, not an image; send 'data:image/jpeg;base64,<data>'.")
    params = [p.strip().lower() for p in m["params"].split(";") if p.strip()]
    if "base64" not in params:
        raise InputError("The image data URL is not base64-encoded; send 'data:image/...;base64,<data>'.")
    text = "".join(m["data"].split())
    if not text:
        raise InputError("The image data URL carries no data after the comma.")
    if max_bytes is not None and len(text) * 3 // 4 > max_bytes:
        raise InputError(f"The image data URL holds about {len(text) * 3 // 4:,} bytes, over the limit of {max_bytes:,}.")
    text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"The image data URL has invalid base64 data ({e}).") from None
    if not data:
        raise InputError("The image data URL decodes to 0 bytes.")
    return data


def _clip(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[:n] + "..."
