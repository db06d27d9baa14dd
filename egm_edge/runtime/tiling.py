"""InternVL-3 image tiling in numpy + pillow, bit-identical to the Hugging Face processor.

Contract: `tile_image(image, cfg)` returns the float32 `pixel_values`
[n_tiles (+1 thumbnail), 3, tile, tile] that transformers' `InternVLProcessor` (with its
GotOcr2 image processor, PIL backend) returns for the same image: pick the (columns, rows)
grid whose aspect ratio is closest to the image's (HF's tie-break included), one PIL resize
of the uint8 RGB image to the whole canvas, crop tiles row-major, append a thumbnail (the
whole image resized to one tile) when there is more than one tile, then rescale in float64,
cast to float32 and normalise in float32 (done here through a per-channel lookup table of
the same arithmetic, so the bits match). `image_token_count` and `expand_image_placeholders`
give the prompt side: each tile becomes (tile/patch)^2 * downsample_ratio^2 `<IMG_CONTEXT>`
tokens between `<img>` and `</img>`. Imports only numpy and pillow.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from egm_edge.errors import CheckpointError, InputError
from egm_edge.models.families.internvl import INTERNVL
from egm_edge.runtime.preprocess import check_image_settings

IMG_START = INTERNVL.tokens.image_start
IMG_END = INTERNVL.tokens.image_end
IMG_CONTEXT = INTERNVL.tokens.image  # also the per-image placeholder the chat template writes

_PIL_FILTERS = (0, 1, 2, 3, 4, 5)  # NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING


@dataclass(frozen=True)
class TilingConfig:
    """InternVL-3 preprocessing settings (the GotOcr2 `preprocessor_config.json` plus model geometry)."""

    tile_size: int = 448
    min_patches: int = 1
    max_patches: int = 12
    use_thumbnail: bool = True
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    resample: int = 3  # PIL.Image.BICUBIC
    rescale_factor: float = 1 / 255
    patch_size: int = 14  # vision_config.patch_size
    downsample_ratio: float = 0.5  # pixel shuffle in front of the projector

    def __post_init__(self) -> None:
        check_image_settings(self, "Tiling", ("tile_size", "min_patches", "max_patches", "patch_size"),
                             ("min_patches", "max_patches"))
        if self.resample not in _PIL_FILTERS:
            raise CheckpointError(f"Tiling resample={self.resample!r} is not a PIL filter (0-5); fix preprocessor_config.json.")
        if not self.rescale_factor > 0:
            raise CheckpointError(f"Tiling rescale_factor={self.rescale_factor!r} must be positive; fix preprocessor_config.json.")
        side, k = self.tile_size // self.patch_size, self._shuffle
        if self.tile_size % self.patch_size or side % k:
            raise CheckpointError(
                f"Tile size {self.tile_size} is not a multiple of patch_size*{k} = {self.patch_size * k} "
                "(pixel shuffle needs whole patch groups); fix the model config."
            )

    @property
    def _shuffle(self) -> int:
        # The projector is sized with int(1/downsample_ratio)**2, so only 1/k ratios exist.
        k = round(1 / self.downsample_ratio) if self.downsample_ratio > 0 else 0
        if k < 1 or not math.isclose(1 / self.downsample_ratio, k, rel_tol=1e-9):
            raise CheckpointError(f"downsample_ratio={self.downsample_ratio!r} must be 1/k for an integer k; fix the model config.")
        return k

    @property
    def tokens_per_tile(self) -> int:
        """(tile/patch)^2 * downsample_ratio^2: 256 for 448 px tiles, patch 14, ratio 0.5."""
        return (self.tile_size // self.patch_size // self._shuffle) ** 2

    @property
    def max_pixels(self) -> int:
        """Pixels of the largest canvas an image is resized to (max_patches tiles); a server reduces larger images
        towards it before tiling, as it does towards the Qwen3-VL processor's max_pixels."""
        return self.max_patches * self.tile_size * self.tile_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TilingConfig":
        """Read a GotOcr2 `preprocessor_config.json` dict; `patch_size`, `downsample_ratio`,
        `use_thumbnail` and `image_seq_length` (processor_config.json) are read when present."""
        kind = d.get("image_processor_type")
        if kind is not None and not str(kind).startswith("GotOcr2ImageProcessor"):
            raise CheckpointError(f"Image processor {kind!r} is not InternVL's GotOcr2ImageProcessor; pass the InternVL-3 preprocessor_config.json.")
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if d.get(flag) is False:
                raise CheckpointError(f"preprocessor_config.json sets {flag}=false, which InternVL-3 never does; restore the model's file.")
        # `crop_to_patches` is deliberately not read: InternVLProcessor passes crop_to_patches=True
        # itself, overriding the file (transformers' converter writes the class default, false).
        kw: dict[str, Any] = {}
        for name in ("min_patches", "max_patches", "use_thumbnail", "resample", "rescale_factor", "downsample_ratio"):
            if d.get(name) is not None:
                kw[name] = d[name]
        for name in ("image_mean", "image_std"):
            if d.get(name) is not None:
                v = d[name]
                kw[name] = tuple(v) if isinstance(v, (list, tuple)) else (float(v),) * 3
        for name, key in (("tile_size", "size"), ("patch_size", "patch_size")):
            v = d.get(key)
            if isinstance(v, dict):
                v = (v.get("height"), v.get("width"))
            if isinstance(v, (list, tuple)):
                if len(v) != 2 or v[0] != v[1]:
                    raise CheckpointError(f"InternVL-3 needs a square {key}, got {d[key]!r}; fix the config.")
                v = v[0]
            if v is not None:
                kw[name] = v
        cfg = cls(**kw)
        seq = d.get("image_seq_length")
        if seq is not None and seq != cfg.tokens_per_tile:
            raise CheckpointError(
                f"image_seq_length={seq} disagrees with tile {cfg.tile_size}, patch {cfg.patch_size} and "
                f"downsample_ratio {cfg.downsample_ratio} ({cfg.tokens_per_tile} tokens per tile); fix the checkpoint configs."
            )
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "TilingConfig":
        from egm_edge.artifacts import read_json

        d = read_json(path, missing=f"Image processor config {path} does not exist; copy the model's preprocessor_config.json there.",
                      restore="restore the model's preprocessor_config.json")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """HF-style dict; `from_dict(to_dict())` round-trips."""
        d = asdict(self)
        del d["tile_size"]
        d.update(image_processor_type="GotOcr2ImageProcessor", size={"height": self.tile_size, "width": self.tile_size},
                 crop_to_patches=True, image_mean=list(self.image_mean), image_std=list(self.image_std),
                 image_seq_length=self.tokens_per_tile)
        return d


@lru_cache(maxsize=16)
def allowed_grids(min_patches: int, max_patches: int) -> tuple[tuple[int, int], ...]:
    """(columns, rows) grids with min..max tiles, ordered by tile count (stable), as HF enumerates them."""
    grids = [(c, r) for c in range(1, max_patches + 1) for r in range(1, max_patches + 1) if min_patches <= c * r <= max_patches]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def choose_grid(width: int, height: int, cfg: TilingConfig) -> tuple[int, int]:
    """(columns, rows) whose aspect ratio is closest to width/height.

    Ties go to the later (larger) grid while the image area exceeds half the grid's pixel
    area, exactly as transformers' `get_optimal_tiled_canvas` (and InternVL's original
    `find_closest_aspect_ratio`) decide; the float arithmetic is the same too.
    """
    if width < 1 or height < 1:
        raise InputError(f"Image size {width}x{height} has an empty side; pass a non-empty image.")
    aspect, area = width / height, width * height
    best_diff, best = float("inf"), (1, 1)
    for grid in allowed_grids(cfg.min_patches, cfg.max_patches):
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best_diff, best = diff, grid
        elif diff == best_diff and area > 0.5 * cfg.tile_size * cfg.tile_size * grid[0] * grid[1]:
            best = grid
    return best


def num_tiles(width: int, height: int, cfg: TilingConfig) -> int:
    """How many tiles `tile_image` returns for an image of this size, thumbnail included."""
    cols, rows = choose_grid(width, height, cfg)
    n = cols * rows
    return n + 1 if cfg.use_thumbnail and n > 1 else n


def _to_rgb(image: Image.Image) -> Image.Image:
    # As transformers' convert_to_rgb: transparency is composited onto white.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _normalise_lut(cfg: TilingConfig) -> np.ndarray:
    # float64 rescale, float32 cast, float32 (x - mean) / std: HF's exact ops, for all 256 values.
    x = (np.arange(256, dtype=np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None]
    std = np.asarray(cfg.image_std, dtype=np.float32)[:, None]
    return (x[None, :] - mean) / std  # float32 [3, 256]


def tile_image(image: Image.Image, cfg: TilingConfig | None = None) -> np.ndarray:
    """One PIL image to InternVL-3 `pixel_values`, float32 [tiles (+thumbnail), 3, tile, tile]."""
    cfg = cfg or TilingConfig()
    if not isinstance(image, Image.Image):
        raise InputError(f"Expected a PIL image, got {type(image).__name__}; load it with egm_edge.runtime.image.load_image.")
    image = _to_rgb(image)
    width, height = image.size
    cols, rows = choose_grid(width, height, cfg)
    t = cfg.tile_size
    n = rows * cols
    canvas = np.asarray(image.resize((cols * t, rows * t), resample=cfg.resample))  # uint8 HWC
    # Tiles row-major as a strided view [rows, cols, 3, t, t]: the lookup gathers and lays out in one pass.
    grid = canvas.reshape(rows, t, cols, t, 3).transpose(0, 2, 4, 1, 3)
    thumb = None
    if cfg.use_thumbnail and n > 1:
        thumb = np.asarray(image.resize((t, t), resample=cfg.resample)).transpose(2, 0, 1)
    lut = _normalise_lut(cfg)
    out = np.empty((n + (thumb is not None), 3, t, t), dtype=np.float32)
    out_grid = out[:n].reshape(rows, cols, 3, t, t)
    for c in range(3):
        out_grid[:, :, c] = lut[c][grid[:, :, c]]
        if thumb is not None:
            out[n, c] = lut[c][thumb[c]]
    return out


def image_token_count(n_tiles: int, cfg: TilingConfig | None = None) -> int:
    """`<IMG_CONTEXT>` tokens for one image of `n_tiles` tiles (thumbnail counted as a tile)."""
    cfg = cfg or TilingConfig()
    if not isinstance(n_tiles, int) or n_tiles < 1:
        raise InputError(f"An image has {n_tiles!r} tiles; it must have at least one.")
    return n_tiles * cfg.tokens_per_tile


def image_placeholder(n_tiles: int, cfg: TilingConfig | None = None) -> str:
    """What InternVLProcessor puts in place of one image's `<IMG_CONTEXT>`: no newline (the chat template adds it)."""
    return INTERNVL.image_placeholder.format(tokens=IMG_CONTEXT * image_token_count(n_tiles, cfg))


def expand_image_placeholders(text: str, tiles_per_image: Sequence[int], cfg: TilingConfig | None = None) -> str:
    """Replace the i-th `<IMG_CONTEXT>` of a chat-rendered prompt with image i's placeholder, as the processor does."""
    parts = text.split(IMG_CONTEXT)
    if len(parts) - 1 != len(tiles_per_image):
        raise InputError(f"The prompt has {len(parts) - 1} {IMG_CONTEXT} placeholders for {len(tiles_per_image)} images; pass one image per placeholder.")
    out = [parts[0]]
    for n, rest in zip(tiles_per_image, parts[1:]):
        out += [image_placeholder(n, cfg), rest]
    return "".join(out)
