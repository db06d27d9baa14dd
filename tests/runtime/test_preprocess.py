"""Numpy preprocessing vs transformers' Qwen2-VL/Qwen3-VL image processor (PIL backend), plus unit checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from egm_edge.errors import CheckpointError, InputError
from egm_edge.runtime.preprocess import (
    ImageProcessorConfig,
    preprocess_image,
    preprocess_images,
    smart_resize,
)

# ~640x640: keeps the 128-image parity run to a few seconds on 2 cores.
TEST_MAX_PIXELS = 401408

# Both sides resize with the same PIL bicubic call on the same uint8 image and do the
# same float64-rescale / float32-normalise arithmetic, so we expect bit-identical
# output; measured max |diff| over coco128 is 0.0. Any non-zero difference is a bug.
PIXEL_TOLERANCE = 0.0


def _hf_processor(cfg_path, **overrides):
    pil_mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    d = json.loads(cfg_path.read_text())
    d.pop("image_processor_type", None)
    d.pop("processor_class", None)
    d.update(overrides)
    return pil_mod.Qwen2VLImageProcessorPil(**d)


def test_parity_with_transformers_on_coco128(qwen_tokenizer_dir, coco128_dir):
    cfg_path = qwen_tokenizer_dir / "preprocessor_config.json"
    hf = _hf_processor(cfg_path, size={"shortest_edge": 65536, "longest_edge": TEST_MAX_PIXELS})
    cfg = ImageProcessorConfig.from_dict({**json.loads(cfg_path.read_text()), "max_pixels": TEST_MAX_PIXELS})
    assert cfg.max_pixels == TEST_MAX_PIXELS and cfg.patch_size == 16
    paths = sorted(p for p in coco128_dir.rglob("*.jpg"))
    assert len(paths) == 128, f"expected the 128 coco128 images, found {len(paths)}"
    worst = 0.0
    for path in paths:
        with Image.open(path) as im:
            im = im.convert("RGB")
        ours = preprocess_image(im, cfg)
        ref = hf(images=im, return_tensors=None)
        assert tuple(int(v) for v in ref["image_grid_thw"][0]) == ours.grid_thw, path.name
        ref_pv = np.asarray(ref["pixel_values"])
        assert ref_pv.shape == ours.pixel_values.shape and ours.pixel_values.dtype == np.float32
        worst = max(worst, float(np.abs(ref_pv - ours.pixel_values).max()))
        assert ours.n_image_tokens == ours.n_patches // 4
        assert ours.resized[0] * ours.resized[1] <= TEST_MAX_PIXELS
    assert worst <= PIXEL_TOLERANCE, f"max |pixel diff| {worst} over coco128"


def test_several_images_concatenate_like_hf(qwen_tokenizer_dir, coco128_dir):
    cfg_path = qwen_tokenizer_dir / "preprocessor_config.json"
    hf = _hf_processor(cfg_path, size={"shortest_edge": 65536, "longest_edge": TEST_MAX_PIXELS})
    cfg = ImageProcessorConfig.from_json(cfg_path)
    cfg = ImageProcessorConfig.from_dict({**cfg.to_dict(), "max_pixels": TEST_MAX_PIXELS})
    ims = []
    for path in sorted(coco128_dir.rglob("*.jpg"))[:3]:
        with Image.open(path) as im:
            ims.append(im.convert("RGB"))
    ours = preprocess_images(ims, cfg)
    ref = hf(images=ims, return_tensors=None)
    np.testing.assert_array_equal(np.asarray(ref["image_grid_thw"]), ours.grid_thw)
    np.testing.assert_array_equal(np.asarray(ref["pixel_values"]), ours.pixel_values)
    assert ours.n_image_tokens == [im.n_image_tokens for im in ours.images]


@pytest.mark.parametrize(
    "h,w",
    [(1, 1), (32, 32), (31, 33), (480, 640), (4000, 3000), (200, 1), (10000, 50), (256, 257), (16, 3000)],
)
def test_smart_resize_matches_transformers(h, w):
    pil_mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    for lo, hi in [(65536, 16777216), (3136, 401408), (256 * 32 * 32, 1280 * 32 * 32)]:
        ours = smart_resize(h, w, 32, lo, hi)
        assert ours == pil_mod.smart_resize(h, w, 32, lo, hi)
        assert ours[0] % 32 == 0 and ours[1] % 32 == 0


def test_aspect_ratio_and_empty_image_are_input_errors():
    with pytest.raises(InputError, match="aspect ratio"):
        smart_resize(10, 2500, 32)
    with pytest.raises(InputError, match="empty side"):
        smart_resize(0, 10, 32)


def test_patch_order_is_merge_window_major():
    # Each patch filled with its own (row, col) index: the first merge*merge rows must be
    # the top-left 2x2 window in row-major order, then the window to its right.
    cfg = ImageProcessorConfig(min_pixels=64 * 96, max_pixels=64 * 96)
    arr = np.zeros((64, 96, 3), dtype=np.uint8)
    for r in range(4):
        for c in range(6):
            arr[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] = (r, c, 0)
    out = preprocess_image(Image.fromarray(arr), cfg)
    assert out.grid_thw == (1, 4, 6) and out.resized == (64, 96) and out.original == (64, 96)
    assert out.pixel_values.shape == (24, 3 * 2 * 16 * 16)
    per_patch = out.pixel_values.reshape(24, 3, 2, 16, 16)
    assert np.array_equal(per_patch[:, :, 0], per_patch[:, :, 1])  # temporal duplicate
    rc = np.rint((per_patch[:, :2, 0, 0, 0] * 0.5 + 0.5) * 255).astype(int)
    expected = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    assert [tuple(x) for x in rc[:8]] == expected
    assert out.n_image_tokens == 6


def test_config_roundtrip_and_hf_keys(tmp_path):
    cfg = ImageProcessorConfig(max_pixels=401408, image_mean=[0.1, 0.2, 0.3])
    assert ImageProcessorConfig.from_dict(cfg.to_dict()) == cfg
    p = tmp_path / "preprocessor_config.json"
    p.write_text(json.dumps({"size": {"shortest_edge": 1024, "longest_edge": 4096}, "patch_size": 14}))
    got = ImageProcessorConfig.from_json(p)
    assert (got.min_pixels, got.max_pixels, got.patch_size) == (1024, 4096, 14)
    p.write_text(json.dumps({"min_pixels": 2048, "max_pixels": 8192}))
    got = ImageProcessorConfig.from_json(p)
    assert (got.min_pixels, got.max_pixels) == (2048, 8192)


def test_bad_configs_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="min_pixels"):
        ImageProcessorConfig(min_pixels=10, max_pixels=5)
    with pytest.raises(CheckpointError, match="does not exist"):
        ImageProcessorConfig.from_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        ImageProcessorConfig.from_json(tmp_path / "bad.json")


def test_non_rgb_modes_are_converted():
    rgba = Image.new("RGBA", (70, 50), (10, 20, 30, 255))
    gray = Image.new("L", (70, 50), 7)
    for im in (rgba, gray):
        out = preprocess_image(im, ImageProcessorConfig(min_pixels=1024, max_pixels=65536))
        assert out.pixel_values.shape[1] == 3 * 2 * 16 * 16
    with pytest.raises(InputError, match="PIL image"):
        preprocess_image(np.zeros((4, 4, 3)))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="at least one"):
        preprocess_images([])
