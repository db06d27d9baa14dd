"""The materialised calibration set: samples rendered exactly as at inference, stored once, hashed.

Contract: `render(sample, task, tokenizer, image_config, image_token_id, family)` turns one
`egm_edge.data.Sample` into `Rendered(input_ids, pixel_values, grid_thw)` with the
same pieces the runtime and the reference runner use (`runtime.image.load_image`,
`runtime.preprocess.preprocess_image` for Qwen3-VL's patches or `runtime.tiling.tile_image`
for InternVL's tiles (then grid_thw is empty: tiles have no patch grid), the family record's
`user_text` + `chat_prompt`, the checkpoint's tokenizer.json). With reasoning, the full-precision model's own
greedy continuation (reasoning, `</think>`, answer) is appended to the ids.
`save(path, calib, holdout, meta)` writes one safetensors file whose sha256 is the
calibration hash recorded in the manifest; `load(path)` reads it back bit-exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from egm_edge.errors import CheckpointError, InputError

RENDER_VERSION = 1  # bump when rendering changes, so cached sets are not reused


@dataclass
class Rendered:
    """One calibration sequence: token ids (prompt, plus generated text when reasoning) and its image."""

    input_ids: np.ndarray  # int64 [L]
    pixel_values: np.ndarray  # float32 [n_patches, 3*T*P*P], or [tiles, 3, tile, tile] for a tiled family
    grid_thw: np.ndarray  # int64 [1, 3]; [0, 3] for tiles
    n_prompt: int  # ids before any generated continuation

    @property
    def n_generated(self) -> int:
        return int(self.input_ids.shape[0]) - self.n_prompt


def image_config_for(image_config, max_pixels: int | str, min_pixels: int | str):
    """The checkpoint's image settings with the recipe's size policy applied (a cap never raises the model's).

    For tiles (a TilingConfig) max_pixels caps the tile count at max_pixels // tile^2 (never below the model's
    min_patches); min_pixels does not apply (tiles have a fixed size)."""
    from dataclasses import replace

    from egm_edge.runtime.tiling import TilingConfig

    if isinstance(image_config, TilingConfig):
        if max_pixels == "model":
            return image_config
        cap = max(image_config.min_patches, min(image_config.max_patches, int(max_pixels) // image_config.tile_size ** 2))
        return replace(image_config, max_patches=cap)
    kw = {}
    if max_pixels != "model":
        kw["max_pixels"] = min(int(max_pixels), image_config.max_pixels)
    if min_pixels != "model":
        kw["min_pixels"] = int(min_pixels)
    if kw:
        lo, hi = kw.get("min_pixels", image_config.min_pixels), kw.get("max_pixels", image_config.max_pixels)
        if lo > hi:
            raise InputError(f"Calibration image policy gives min_pixels={lo} above max_pixels={hi}; lower min_pixels.")
    return replace(image_config, **kw) if kw else image_config


def render(sample, task: str, tokenizer, image_config, image_token_id: int, family) -> Rendered:
    """`sample` rendered as the runtime renders a grounding request for a `family` model (a name or a record)."""
    from egm_edge.grounding import clean_expression
    from egm_edge.models.families import get_family
    from egm_edge.runtime.image import load_image
    from egm_edge.runtime.preprocess import preprocess_image

    fam = get_family(family)
    text = fam.user_text(clean_expression(sample.expression), task)
    image = load_image(sample.image)
    if fam.preprocessor == "tiling":
        from egm_edge.runtime.tiling import image_token_count, tile_image

        pixels = tile_image(image, image_config)
        n_image, grid = image_token_count(int(pixels.shape[0]), image_config), np.zeros((0, 3), dtype=np.int64)
    else:
        pre = preprocess_image(image, image_config)
        pixels, n_image, grid = pre.pixel_values, pre.n_image_tokens, np.asarray([pre.grid_thw], dtype=np.int64)
    ids = tokenizer.encode(fam.chat_prompt(text, n_image), add_special_tokens=False).ids
    n_pad = sum(1 for i in ids if i == image_token_id)
    if n_pad != n_image:
        raise CheckpointError(
            f"The tokenizer turned {n_image} {fam.tokens.image} into {n_pad} image tokens (id {image_token_id}); "
            "tokenizer.json and config.json of the checkpoint do not belong together."
        )
    return Rendered(np.asarray(ids, dtype=np.int64), pixels.astype(np.float32, copy=False), grid, len(ids))


def with_reasoning(runner, item: Rendered, max_new_tokens: int) -> Rendered:
    """Append the full-precision model's own greedy reasoning + answer (stop token included; cut before an image
    token, which the forward would try to fill with image features)."""
    # The runtime's budget policy closes the reasoning in time for an answer of up to a quarter of the cap.
    grid = item.grid_thw[0] if len(item.grid_thw) else None
    gen = runner.generate_ids(item.input_ids.tolist(), item.pixel_values, grid, max_new_tokens=max_new_tokens,
                              max_answer_tokens=min(128, max_new_tokens // 4))
    tokens = gen.tokens
    if runner.image_token_id in tokens:  # an image placeholder without an image (only a random model writes one)
        tokens = tokens[: tokens.index(runner.image_token_id)]
    ids = np.concatenate([item.input_ids, np.asarray(tokens, dtype=np.int64)])
    return Rendered(ids, item.pixel_values, item.grid_thw, item.n_prompt)


def save(path: Path, calib: Sequence[Rendered], holdout: Sequence[Rendered], meta: dict[str, Any]) -> None:
    """One safetensors file: `calib.{i}.*` and `holdout.{i}.*` tensors, `meta` as JSON metadata."""
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    for prefix, items in (("calib", calib), ("holdout", holdout)):
        for i, r in enumerate(items):
            tensors[f"{prefix}.{i}.input_ids"] = torch.from_numpy(np.ascontiguousarray(r.input_ids))
            tensors[f"{prefix}.{i}.pixel_values"] = torch.from_numpy(np.ascontiguousarray(r.pixel_values))
            tensors[f"{prefix}.{i}.grid_thw"] = torch.from_numpy(np.ascontiguousarray(r.grid_thw))
            tensors[f"{prefix}.{i}.n_prompt"] = torch.tensor([r.n_prompt], dtype=torch.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"egm_edge_calibration": json.dumps(meta, sort_keys=True, default=str)})
    tmp.replace(path)


def load(path: Path) -> tuple[list[Rendered], list[Rendered], dict[str, Any]]:
    from safetensors import safe_open

    out: dict[str, list[Rendered]] = {"calib": [], "holdout": []}
    with safe_open(str(path), framework="np") as f:
        meta = json.loads((f.metadata() or {}).get("egm_edge_calibration", "{}"))
        keys = set(f.keys())
        for prefix in out:
            i = 0
            while f"{prefix}.{i}.input_ids" in keys:
                g = lambda k: f.get_tensor(f"{prefix}.{i}.{k}")  # noqa: E731
                out[prefix].append(Rendered(g("input_ids"), g("pixel_values"), g("grid_thw"), int(g("n_prompt")[0])))
                i += 1
    return out["calib"], out["holdout"], meta


def stats(items: Sequence[Rendered]) -> dict[str, Any]:
    """Token and image-size figures for the manifest."""
    if not items:
        return {"n": 0}
    lengths = [int(r.input_ids.shape[0]) for r in items]
    gen = [r.n_generated for r in items]
    patches = [int(r.pixel_values.shape[0]) for r in items]
    return {
        "n": len(items),
        "tokens_total": int(sum(lengths)),
        "tokens_max": int(max(lengths)),
        "generated_tokens_mean": float(np.mean(gen)),
        "image_patches_mean": float(np.mean(patches)),
        "image_patches_max": int(max(patches)),
    }


def model_inputs(item: Rendered, image_token_id: int, device, dtype) -> dict[str, Any]:
    """Keyword arguments for the model's forward (batch of one; the Qwen3-VL inputs: pixels, grid, M-RoPE mask;
    for tiles, ids and pixels only: the model places image features at its image tokens, positions are 1-D)."""
    import torch

    ids = torch.as_tensor(item.input_ids, device=device).view(1, -1)
    if not len(item.grid_thw):
        return {"input_ids": ids, "pixel_values": torch.as_tensor(item.pixel_values, device=device).to(dtype)}
    return {
        "input_ids": ids,
        "pixel_values": torch.as_tensor(item.pixel_values, device=device).to(dtype),
        "image_grid_thw": torch.as_tensor(item.grid_thw, device=device),
        # transformers needs the image-token mask to build the 3-D mrope positions.
        "mm_token_type_ids": (ids == image_token_id).int(),
    }
