"""InternVL-3 tiling vs transformers' InternVLProcessor + GotOcr2 image processor (PIL backend), plus unit checks.

Both sides do the same PIL resizes of the same uint8 image and the same float64-rescale /
float32-normalise arithmetic, so the expected difference is none: np.array_equal, no tolerance.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from egm_edge.errors import CheckpointError, InputError
from egm_edge.runtime.tiling import (
    IMG_CONTEXT,
    TilingConfig,
    allowed_grids,
    choose_grid,
    expand_image_placeholders,
    image_placeholder,
    image_token_count,
    num_tiles,
    tile_image,
)

# preprocessor_config.json as transformers' InternVL converter writes it for InternVL3-{1,2,8}B-hf:
# GotOcr2 class defaults (crop_to_patches false, min 1, max 12, bicubic) plus the ImageNet mean/std.
INTERNVL3_PREPROCESSOR = {
    "image_processor_type": "GotOcr2ImageProcessorFast",
    "processor_class": "InternVLProcessor",
    "crop_to_patches": False,
    "min_patches": 1,
    "max_patches": 12,
    "do_resize": True,
    "size": {"height": 448, "width": 448},
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}
IMAGE_SEQ_LENGTH = 256  # processor_config.json of the -hf checkpoints
PROMPT = f"<|im_start|>user\n{IMG_CONTEXT}\nPlease provide the bounding box<|im_end|>\n<|im_start|>assistant\n"


def _hf_image_processor(**overrides):
    mod = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")
    d = {k: v for k, v in INTERNVL3_PREPROCESSOR.items() if k not in ("image_processor_type", "processor_class")}
    return mod.GotOcr2ImageProcessorPil(**{**d, **overrides})


@pytest.fixture(scope="module")
def hf_processor():
    """The real InternVLProcessor over the GotOcr2 PIL image processor and a tiny tokenizer holding
    InternVL's image tokens. Its video processor needs torchvision (absent here), so only the
    constructor's class check for that unused slot is relaxed; all image and prompt code is transformers'."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<img>": 1, "</img>": 2, IMG_CONTEXT: 3, "<video>": 4}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": IMG_CONTEXT, "video_token": "<video>"},
    )

    class ImageOnlyInternVLProcessor(transformers.InternVLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyInternVLProcessor(image_processor=_hf_image_processor(), tokenizer=tokenizer,
                                      video_processor=None, image_seq_length=IMAGE_SEQ_LENGTH)


def test_coco128_bit_exact_with_internvl_processor(hf_processor, coco128_dir):
    cfg = TilingConfig.from_dict({**INTERNVL3_PREPROCESSOR, "image_seq_length": IMAGE_SEQ_LENGTH})
    paths = sorted(coco128_dir.rglob("*.jpg"))
    assert len(paths) == 128, f"expected the 128 coco128 images, found {len(paths)}"
    ctx_id = hf_processor.image_token_id
    seen_tiles = set()
    for path in paths:
        with Image.open(path) as im:
            im.load()
        ref = hf_processor(images=[im], text=[PROMPT], return_text_replacement_offsets=True, return_tensors=None)
        ours = tile_image(im, cfg)
        ref_pv = np.stack(ref["pixel_values"])
        assert ours.dtype == np.float32 and ours.shape == ref_pv.shape, path.name
        assert np.array_equal(ours, ref_pv), f"{path.name}: max |diff| {np.abs(ours - ref_pv).max()}"
        n = ours.shape[0]
        assert n == num_tiles(im.width, im.height, cfg), path.name
        assert ref["input_ids"][0].count(ctx_id) == image_token_count(n, cfg) == n * IMAGE_SEQ_LENGTH
        assert ref["text_replacement_offsets"][0][0]["replacement"] == image_placeholder(n, cfg), path.name
        mm = hf_processor._get_num_multimodal_tokens(image_sizes=[(im.height, im.width)])
        assert mm["num_image_patches"] == [n] and mm["num_image_tokens"] == [image_token_count(n, cfg) + 2]
        seen_tiles.add(n)
    assert len(seen_tiles) > 1, f"coco128 exercised only {seen_tiles} tiles per image"


def test_processor_crops_even_though_the_config_says_not_to(hf_processor):
    # Why from_dict ignores crop_to_patches: the bare image processor honours the file's false,
    # InternVLProcessor overrides it with true.
    im = Image.new("RGB", (900, 300), (10, 200, 30))
    assert len(_hf_image_processor()(images=im, return_tensors=None)["pixel_values"]) == 1
    assert len(hf_processor(images=[im], text=[PROMPT], return_tensors=None)["pixel_values"]) == 4
    assert num_tiles(900, 300, TilingConfig.from_dict(INTERNVL3_PREPROCESSOR)) == 4


def _noise(w, h, mode="RGB", seed=0):
    bands = len(Image.new(mode, (1, 1)).getbands())
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, bands), dtype=np.uint8)
    if mode == "P":
        return Image.frombytes("P", (w, h), arr.tobytes())
    return Image.fromarray(arr[..., 0] if bands == 1 else arr)  # L, LA, RGB or RGBA by band count


def _palette_with_transparency():
    im = _noise(50, 40, "P", seed=3)
    im.putpalette(list(range(256)) * 3)
    im.info["transparency"] = 7
    return im


@pytest.mark.parametrize(
    "make, overrides",
    [
        (lambda: _noise(4000, 60), {}),  # very wide: 12x1
        (lambda: _noise(60, 4000), {}),  # very tall: 1x12
        (lambda: _noise(1, 1), {}),
        (lambda: _noise(3, 1), {}),
        (lambda: _noise(10, 1), {}),  # tiny but 10:1, so 10 tiles
        (lambda: _noise(700, 500, "RGBA", seed=1), {}),  # alpha composited on white
        (lambda: _noise(300, 200, "LA", seed=2), {}),
        (lambda: _noise(333, 517, "L", seed=4), {}),
        (_palette_with_transparency, {}),
        (lambda: _noise(640, 480), {"max_patches": 1}),  # HF takes its non-cropping branch
        (lambda: _noise(640, 480), {"max_patches": 6, "min_patches": 2}),
        (lambda: _noise(100, 100), {"min_patches": 4}),
        (lambda: _noise(500, 400), {"resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}),
    ],
)
def test_edge_images_bit_exact_with_hf(make, overrides):
    im = make()
    hf = _hf_image_processor(crop_to_patches=True, **overrides)
    ref = np.stack(hf(images=im, return_tensors=None)["pixel_values"])
    ours = tile_image(im, TilingConfig.from_dict({**INTERNVL3_PREPROCESSOR, **overrides}))
    assert ours.shape == ref.shape and np.array_equal(ours, ref)


SIDES = [1, 2, 3, 10, 100, 223, 224, 225, 300, 447, 448, 449, 500, 640, 672, 896, 900, 1000, 1344, 2000, 5000]


@pytest.mark.parametrize("min_p, max_p", [(1, 12), (1, 6), (1, 1), (2, 12), (4, 9), (1, 40)])
def test_grid_matches_hf_on_a_size_sweep(min_p, max_p):
    mod = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")
    assert list(allowed_grids(min_p, max_p)) == mod.get_all_supported_aspect_ratios(min_p, max_p)
    cfg = TilingConfig(min_patches=min_p, max_patches=max_p)
    for w in SIDES:
        for h in SIDES:
            assert choose_grid(w, h, cfg) == mod.get_optimal_tiled_canvas((h, w), (448, 448), min_p, max_p), (w, h)


@pytest.mark.parametrize(
    "size, grid, tiles",
    [
        ((4000, 100), (12, 1), 13),  # very wide
        ((100, 4000), (1, 12), 13),  # very tall
        ((1, 1), (1, 1), 1),  # tiny: ties with 2x2, 3x3 lose (area below half the canvas)
        ((448, 448), (1, 1), 1),  # 448^2 is not above half of 2x2's area
        ((900, 900), (2, 2), 5),  # ties go to 2x2 but not 3x3
        ((2000, 2000), (3, 3), 10),
        ((640, 480), (4, 3), 13),
        ((1000, 10), (12, 1), 13),
    ],
)
def test_grid_edge_cases(size, grid, tiles):
    cfg = TilingConfig()
    assert choose_grid(*size, cfg) == grid
    assert num_tiles(*size, cfg) == tiles


def test_single_tile_never_gets_a_thumbnail():
    im = _noise(640, 480)
    one = TilingConfig(max_patches=1)
    assert choose_grid(640, 480, one) == (1, 1) and num_tiles(640, 480, one) == 1
    assert tile_image(im, one).shape == (1, 3, 448, 448)
    # With use_thumbnail off the thumbnail goes, the grid stays.
    no_thumb = TilingConfig(use_thumbnail=False)
    full = tile_image(im, TilingConfig())
    assert num_tiles(640, 480, no_thumb) == 12
    assert np.array_equal(tile_image(im, no_thumb), full[:12])


def test_token_counts_and_placeholders():
    cfg = TilingConfig()
    assert cfg.tokens_per_tile == 256 and image_token_count(13, cfg) == 3328
    assert TilingConfig(patch_size=16).tokens_per_tile == 196
    assert TilingConfig(downsample_ratio=0.25, tile_size=448).tokens_per_tile == 64
    ph = image_placeholder(2, cfg)
    assert ph == "<img>" + "<IMG_CONTEXT>" * 512 + "</img>" and "\n" not in ph
    text = expand_image_placeholders(f"a {IMG_CONTEXT}\nb {IMG_CONTEXT}\nc", [1, 3], cfg)
    assert text == f"a {image_placeholder(1, cfg)}\nb {image_placeholder(3, cfg)}\nc"
    with pytest.raises(InputError, match="2 <IMG_CONTEXT> placeholders for 1 images"):
        expand_image_placeholders(f"{IMG_CONTEXT}{IMG_CONTEXT}", [1], cfg)
    with pytest.raises(InputError):
        image_token_count(0, cfg)


def test_config_reads_the_hf_file_and_round_trips(tmp_path):
    cfg = TilingConfig.from_dict(INTERNVL3_PREPROCESSOR)
    assert cfg == TilingConfig()  # the InternVL-3 defaults are exactly its file
    custom = TilingConfig(tile_size=224, min_patches=2, max_patches=6, use_thumbnail=False, resample=2,
                          image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.5, 1.0), patch_size=16, downsample_ratio=0.5)
    assert TilingConfig.from_dict(json.loads(json.dumps(custom.to_dict()))) == custom
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps(INTERNVL3_PREPROCESSOR))
    assert TilingConfig.from_json(path) == cfg
    # Model geometry arrives as the model config spells it (vision_config.patch_size is a pair).
    assert TilingConfig.from_dict({**INTERNVL3_PREPROCESSOR, "patch_size": [14, 14], "downsample_ratio": 0.5}) == cfg
    with pytest.raises(CheckpointError, match="does not exist"):
        TilingConfig.from_json(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"size": {"height": 448, "width": 224}}, "square size"),
        ({"min_patches": 13}, "exceeds max_patches"),
        ({"image_processor_type": "Qwen2VLImageProcessor"}, "not InternVL's"),
        ({"image_seq_length": 64}, "disagrees"),
        ({"image_std": [0.2, 0.0, 0.2]}, "contains 0"),
        ({"downsample_ratio": 0.3}, "1/k"),
        ({"size": {"height": 450, "width": 450}}, "not a multiple"),
        ({"do_normalize": False}, "do_normalize=false"),
        ({"resample": 9}, "not a PIL filter"),
    ],
)
def test_config_errors_say_what_is_wrong(bad, match):
    with pytest.raises(CheckpointError, match=match):
        TilingConfig.from_dict({**INTERNVL3_PREPROCESSOR, **bad})


def test_bad_inputs():
    with pytest.raises(InputError, match="Expected a PIL image"):
        tile_image(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(InputError, match="empty side"):
        choose_grid(0, 10, TilingConfig())
