"""Qwen3-VL image preprocessing in numpy + pillow, identical to the Hugging Face processor.

Contract: `preprocess_image(image, cfg)` returns the `pixel_values` and `grid_thw`
that transformers' Qwen2-VL/Qwen3-VL image processor (PIL backend) returns for the
same RGB image and settings: smart resize to multiples of patch*merge within
[min_pixels, max_pixels], PIL bicubic resize of the uint8 image, rescale by 1/255,
normalise, duplicate the still image along the temporal axis and flatten patches
in the merge-window order the vision tower expects. Imports only numpy and pillow.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from egm_edge.errors import CheckpointError, InputError

MAX_ASPECT_RATIO = 200


def check_image_settings(cfg, what: str, positive: tuple[str, ...], bounds: tuple[str, str]) -> None:
    """Shared checks of an image-settings dataclass (one sentence each): the `positive` fields are positive
    integers, bounds[0] <= bounds[1], image_mean/image_std are 3 floats (stored as tuples) and no std is 0."""
    for name in positive:
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise CheckpointError(f"{what} setting {name}={v!r} must be a positive integer; fix preprocessor_config.json.")
    lo, hi = bounds
    if getattr(cfg, lo) > getattr(cfg, hi):
        raise CheckpointError(f"{what} {lo}={getattr(cfg, lo)} exceeds {hi}={getattr(cfg, hi)}; fix preprocessor_config.json.")
    for name in ("image_mean", "image_std"):
        v = tuple(float(x) for x in getattr(cfg, name))
        if len(v) != 3:
            raise CheckpointError(f"{what} {name}={v!r} must have 3 values (R, G, B); fix preprocessor_config.json.")
        object.__setattr__(cfg, name, v)
    if any(s == 0 for s in cfg.image_std):
        raise CheckpointError(f"{what} image_std={cfg.image_std!r} contains 0; fix preprocessor_config.json.")


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The settings of the Qwen3-VL image processor (what `preprocessor_config.json` holds)."""

    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: int = 3  # PIL.Image.BICUBIC
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        check_image_settings(self, "Image processor", ("patch_size", "merge_size", "temporal_patch_size", "min_pixels",
                                                      "max_pixels"), ("min_pixels", "max_pixels"))

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this (one merged token covers factor x factor pixels)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageProcessorConfig":
        """Read an HF `preprocessor_config.json` dict (size.shortest_edge/longest_edge are min/max pixels)."""
        kw: dict[str, Any] = {}
        for name in ("patch_size", "merge_size", "temporal_patch_size", "resample", "rescale_factor"):
            if d.get(name) is not None:
                kw[name] = d[name]
        for name in ("image_mean", "image_std"):
            if d.get(name) is not None:
                v = d[name]
                kw[name] = tuple(v) if isinstance(v, (list, tuple)) else (float(v),) * 3
        size = d.get("size") or {}
        if isinstance(size, dict):
            if size.get("shortest_edge") is not None:
                kw["min_pixels"] = size["shortest_edge"]
            if size.get("longest_edge") is not None:
                kw["max_pixels"] = size["longest_edge"]
        # Explicit min_pixels/max_pixels win, as in the HF processor's constructor.
        for name in ("min_pixels", "max_pixels"):
            if d.get(name) is not None:
                kw[name] = d[name]
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | Path) -> "ImageProcessorConfig":
        from egm_edge.artifacts import read_json

        d = read_json(path, missing=f"Image processor config {path} does not exist; copy the model's preprocessor_config.json there.",
                      restore="restore the model's preprocessor_config.json")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """HF-compatible dict: `from_dict(to_dict())` round-trips and transformers can read it."""
        d = asdict(self)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        d["size"] = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
        return d


@dataclass(frozen=True)
class PreprocessedImage:
    """Vision-tower input for one image (or several, concatenated by `preprocess_images`)."""

    pixel_values: np.ndarray  # float32 [grid_t*grid_h*grid_w, 3*T*P*P]
    grid_thw: tuple[int, int, int]
    resized: tuple[int, int]  # (height, width) after smart resize
    original: tuple[int, int]  # (height, width) as loaded
    merge_size: int = 2

    @property
    def n_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w

    @property
    def n_image_tokens(self) -> int:
        """How many `<|image_pad|>` tokens the prompt needs for this image."""
        return self.n_patches // (self.merge_size**2)


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = 65536, max_pixels: int = 16777216) -> tuple[int, int]:
    """(h, w) multiples of `factor`, pixel count within [min_pixels, max_pixels], aspect ratio kept as well as possible.

    Same arithmetic as transformers' `smart_resize` for Qwen2-VL/Qwen3-VL (Python's
    round-half-to-even included), so the grid matches the HF processor exactly.
    """
    if height < 1 or width < 1:
        raise InputError(f"Image size {width}x{height} has an empty side; pass a non-empty image.")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InputError(
            f"Image size {width}x{height} has aspect ratio {max(height, width) / min(height, width):.1f}, "
            f"above the {MAX_ASPECT_RATIO} the Qwen3-VL processor accepts; crop or pad the image first."
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _patchify(chw: np.ndarray, cfg: ImageProcessorConfig) -> tuple[np.ndarray, int, int]:
    c, h, w = chw.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = h // p, w // p
    x = chw.reshape(c, gh // m, m, p, gw // m, m, p)
    # Merge windows outermost, so each run of m*m consecutive patches becomes one LLM token.
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
    # A still image is its own second frame: duplicate along a temporal axis placed after C.
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
    return np.ascontiguousarray(x.reshape(gh * gw, c * t * p * p)), gh, gw


def preprocess_image(image: Image.Image, cfg: ImageProcessorConfig | None = None) -> PreprocessedImage:
    """One PIL image to Qwen3-VL vision-tower input (see the module docstring)."""
    cfg = cfg or ImageProcessorConfig()
    if not isinstance(image, Image.Image):
        raise InputError(f"Expected a PIL image, got {type(image).__name__}; load it with egm_edge.runtime.image.load_image.")
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    rh, rw = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    if (rh, rw) != (height, width):
        image = image.resize((rw, rh), resample=cfg.resample)
    arr = np.asarray(image).transpose(2, 0, 1)  # uint8 CHW
    # float64 rescale then float32, then float32 normalise: the HF PIL backend's exact arithmetic.
    x = (arr.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(cfg.image_std, dtype=np.float32)[:, None, None]
    x = (x - mean) / std
    patches, gh, gw = _patchify(x, cfg)
    return PreprocessedImage(patches, (1, gh, gw), (rh, rw), (height, width), cfg.merge_size)


@dataclass(frozen=True)
class PreprocessedBatch:
    """Several images' patches concatenated in order, as the vision tower takes them."""

    pixel_values: np.ndarray
    grid_thw: np.ndarray  # int64 [n_images, 3]
    images: tuple[PreprocessedImage, ...]

    @property
    def n_image_tokens(self) -> list[int]:
        return [im.n_image_tokens for im in self.images]


def preprocess_images(images: Sequence[Image.Image], cfg: ImageProcessorConfig | None = None) -> PreprocessedBatch:
    """Several images: patches concatenated along the first axis, one grid_thw row per image."""
    if not images:
        raise InputError("No images were given; pass at least one image.")
    items = tuple(preprocess_image(im, cfg) for im in images)
    pixel_values = np.concatenate([it.pixel_values for it in items], axis=0)
    grid = np.asarray([it.grid_thw for it in items], dtype=np.int64)
    return PreprocessedBatch(pixel_values, grid, items)
