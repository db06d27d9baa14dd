"""3-D multimodal rotary position ids (M-RoPE) for `decoder.onnx`, computed in numpy.

Qwen3-VL gives each token three position ids (temporal, height, width). Text
tokens advance all three together; the `<|image_pad|>` run of one image gets a
grid of ids starting where the text left off (t, then row, then column of its
merged patches), and the text after it resumes at start + max(h, w) / merge.
This is transformers' `Qwen3VLModel.get_rope_index` for images, without torch.

- `rope_index(input_ids, image_grid_thw, ...)` -> (position_ids [3, B, S] int64,
  deltas [B] int64) for a prefill; padded positions (attention_mask 0) get 0.
- `decode_position_ids(n_valid, deltas, seq_len)` -> [3, B, seq_len] int64 for
  tokens appended after `n_valid` non-padding tokens: n_valid + i + delta.
- `plain_position_ids(seq_len)`: a 1-D RoPE prefill (InternVL) as three equal rows 0..S-1;
  its decode steps are `decode_position_ids` with delta 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _runs(flags: np.ndarray) -> list[tuple[bool, int, int]]:
    """Maximal runs of equal flags as (flag, start, end)."""
    if flags.size == 0:
        return []
    edges = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [flags.size]])
    return [(bool(flags[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def rope_index(
    input_ids: np.ndarray,
    image_grid_thw: Sequence[Sequence[int]],
    image_token_id: int,
    spatial_merge_size: int,
    attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Position ids [3, B, S] and per-row deltas [B] for a prefill of `input_ids` [B, S].

    Images are consumed in order across the batch (row-major), one grid per run
    of image-pad tokens, exactly as the Qwen3-VL processor lays them out (each
    image wrapped in `<|vision_start|>` ... `<|vision_end|>`).
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    mask = np.ones_like(ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    grids = [tuple(int(v) for v in g) for g in image_grid_thw]
    m = spatial_merge_size
    positions = np.zeros((3, *ids.shape), dtype=np.int64)
    deltas = np.zeros(ids.shape[0], dtype=np.int64)
    next_grid = 0
    for b in range(ids.shape[0]):
        row = ids[b][mask[b]]
        pieces = []
        pos = 0
        for is_image, start, end in _runs(row == image_token_id):
            if not is_image:
                pieces.append(np.broadcast_to(np.arange(end - start, dtype=np.int64) + pos, (3, end - start)))
                pos += end - start
                continue
            if next_grid >= len(grids):
                raise ValueError(f"input_ids hold more image-pad runs than the {len(grids)} image grid(s) given")
            t, h, w = grids[next_grid]
            next_grid += 1
            gh, gw = h // m, w // m
            if end - start != t * gh * gw:
                raise ValueError(
                    f"an image-pad run of {end - start} tokens does not match grid (t={t}, h={h}, w={w}), "
                    f"which needs {t * gh * gw}"
                )
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            pieces.append(np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]).astype(np.int64) + pos)
            pos += max(h, w) // m
        if pieces:
            llm = np.concatenate(pieces, axis=1)
            positions[:, b, mask[b]] = llm
            deltas[b] = int(llm.max()) + 1 - row.size
    if next_grid != len(grids):
        raise ValueError(f"{len(grids)} image grid(s) given but input_ids hold {next_grid} image-pad run(s)")
    return positions, deltas


def decode_position_ids(n_valid: np.ndarray | Sequence[int], deltas: np.ndarray, seq_len: int = 1) -> np.ndarray:
    """Position ids [3, B, seq_len] for tokens appended after `n_valid` real (non-padding) tokens per row."""
    n_valid = np.asarray(n_valid, dtype=np.int64).reshape(-1, 1)
    pos = n_valid + np.arange(seq_len, dtype=np.int64)[None, :] + np.asarray(deltas, dtype=np.int64).reshape(-1, 1)
    return np.broadcast_to(pos, (3, *pos.shape)).copy()


def plain_position_ids(seq_len: int, start: int = 0) -> np.ndarray:
    """[3, 1, seq_len] int64: three equal rows start..start+seq_len-1, the ids of a 1-D RoPE decoder (InternVL's),
    whose graph reads row 0 only (egm_edge.export.graphs_internvl). Decode steps use `decode_position_ids` with delta 0."""
    pos = np.arange(start, start + seq_len, dtype=np.int64)
    return np.broadcast_to(pos, (3, 1, seq_len)).copy()
