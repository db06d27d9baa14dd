"""Host-side grid tensors for `vision.onnx`, computed in numpy (no torch).

`vision.onnx` takes pixel patches plus the tensors below, all derived from the
image grids alone, so one graph serves any image size and several images per
call. Given the grids `[(t, h, w), ...]` (in patches, as the Qwen3-VL
processor reports them) and the `VisionGridConfig` stored in the export
manifest, `vision_grid_inputs` returns, for the N = sum(t*h*w) patches in
spatial-merge-block order (the order the processor emits them):

| name              | shape       | dtype   | meaning                                              |
|-------------------|-------------|---------|------------------------------------------------------|
| pos_embed_indices | [N, 4]      | int64   | bilinear taps into the learned square position table |
| pos_embed_weights | [N, 4]      | float32 | their weights (align_corners=True, border clamp)     |
| rotary_cos        | [N, head_dim] | float32 | cos of the 2-D axial rotary angles (h then w)      |
| rotary_sin        | [N, head_dim] | float32 | sin of the same angles                             |
| segment_ids       | [N]         | int64   | attention segment: one per image frame; patches attend only within their segment |

This reproduces `fast_pos_embed_interpolate`, the axial rotary embedding and
the `cu_seqlens` segmentation of transformers' Qwen3-VL vision tower.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class VisionGridConfig:
    """What the host needs to know about the vision tower to build its grid tensors."""

    head_dim: int
    rope_theta: float
    num_grid_per_side: int
    spatial_merge_size: int
    patch_size: int
    temporal_patch_size: int
    in_channels: int = 3

    def __post_init__(self) -> None:
        if self.head_dim % 4:
            raise ValueError(f"vision head_dim must be a multiple of 4 for 2-D axial rotary, got {self.head_dim}")
        for name in ("num_grid_per_side", "spatial_merge_size", "patch_size", "temporal_patch_size", "in_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"VisionGridConfig.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def patch_dim(self) -> int:
        """Length of one flattened pixel patch: channels * temporal * patch * patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VisionGridConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _check_grids(grid_thw: Sequence[Sequence[int]], merge: int) -> list[tuple[int, int, int]]:
    grids = [tuple(int(v) for v in g) for g in grid_thw]
    if not grids:
        raise ValueError("at least one image grid is needed")
    for t, h, w in grids:
        if t < 1 or h < 1 or w < 1 or h % merge or w % merge:
            raise ValueError(f"image grid (t={t}, h={h}, w={w}) must be positive with h and w multiples of {merge}")
    return grids


def block_order_hw(h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each patch of one frame, listed in spatial-merge-block order."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return rows, cols


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear taps/weights (align_corners=True, border clamp) on one axis, in float32 like the reference."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32)), 0, None)
    return taps, weights.astype(np.float32)


def rotary_inv_freq(cfg: VisionGridConfig) -> np.ndarray:
    """Inverse frequencies of the axial rotary: head_dim/4 of them, shared by the h and w axes."""
    spatial = cfg.head_dim // 2
    exponent = np.arange(0, spatial, 2, dtype=np.float32) / np.float32(spatial)
    return (np.float32(1.0) / np.power(np.float32(cfg.rope_theta), exponent)).astype(np.float32)


def vision_grid_inputs(grid_thw: Sequence[Sequence[int]], cfg: VisionGridConfig) -> dict[str, np.ndarray]:
    """The grid-dependent inputs of `vision.onnx` for these image grids (see the module table)."""
    merge, side = cfg.spatial_merge_size, cfg.num_grid_per_side
    grids = _check_grids(grid_thw, merge)
    inv_freq = rotary_inv_freq(cfg)
    idx, wts, angles, segs = [], [], [], []
    segment = 0
    for t, h, w in grids:
        rows, cols = block_order_hw(h, w, merge)
        h_taps, h_w = _axis_taps(rows, h, side)
        w_taps, w_w = _axis_taps(cols, w, side)
        frame_idx = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
        frame_wts = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
        freqs = np.concatenate(
            [rows[:, None].astype(np.float32) * inv_freq, cols[:, None].astype(np.float32) * inv_freq], axis=-1
        )
        for _ in range(t):
            idx.append(frame_idx)
            wts.append(frame_wts)
            angles.append(freqs)
            segs.append(np.full(h * w, segment, dtype=np.int64))
            segment += 1
    angles_all = np.concatenate(angles, axis=0)
    angles_all = np.concatenate([angles_all, angles_all], axis=-1)
    return {
        "pos_embed_indices": np.concatenate(idx, axis=0).astype(np.int64),
        "pos_embed_weights": np.concatenate(wts, axis=0).astype(np.float32),
        "rotary_cos": np.cos(angles_all).astype(np.float32),
        "rotary_sin": np.sin(angles_all).astype(np.float32),
        "segment_ids": np.concatenate(segs, axis=0),
    }


def image_token_counts(grid_thw: Sequence[Sequence[int]], spatial_merge_size: int) -> list[int]:
    """How many `<|image_pad|>` tokens (rows of image features) each image yields."""
    grids = _check_grids(grid_thw, spatial_merge_size)
    return [t * h * w // (spatial_merge_size**2) for t, h, w in grids]
