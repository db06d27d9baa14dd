"""Tiny Qwen3-VL checkpoints for the quantize tests, and their quantized copies (built once per session).

The text tower is 128 wide (intermediate 256) because INT4 AWQ packs weights in blocks
of 128 input channels; a small BPE tokenizer with Qwen's special tokens keeps the
vocabulary (and so the embeddings, exports and hashes) tiny. Needs no ../shared data.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("modelopt")

TEXT_128 = {
    "hidden_size": 128, "intermediate_size": 256, "head_dim": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [8, 4, 4], "mrope_interleaved": True},
}
CORPUS = [
    "Locate the red circle left of the blue square, output its bbox coordinates using JSON format",
    "Locate the largest triangle amodally, output its bbox coordinates using JSON format",
    "The candidates are two circles; the left one is red. </think> ```json [{\"bbox_2d\": [12, 340, 200, 560]}] ```",
] * 20


def _tokenizer_dir(root):
    from egm_edge.models.families import get_family
    from egm_edge.synth.tokenizer import build_tokenizer, write_tokenizer_files

    write_tokenizer_files(build_tokenizer(CORPUS, vocab_size=320), root, get_family("qwen3_vl").chat_template)
    return root


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    return _tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, small_tokenizer):
    """A random Qwen3-VL whose Linear widths suit every CPU recipe (INT4 blocks of 128)."""
    from egm_edge.reference.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny128", small_tokenizer, seed=0, text=TEXT_128,
                                 vision={"out_hidden_size": 128}, min_pixels=16384, max_pixels=16384)


@pytest.fixture(scope="session")
def tiny_ckpt_64(tmp_path_factory, small_tokenizer):
    """The default tiny shape (hidden 64): too narrow for INT4 blocks of 128."""
    from egm_edge.reference.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt64") / "tiny64", small_tokenizer, seed=0, min_pixels=16384, max_pixels=16384)


def calib_recipe(samples: int = 2, holdout: int = 2, **kw):
    from egm_edge.quantize.calibration import CalibrationRecipe

    d = {"samples": samples, "holdout": holdout, "seed": 0, "max_pixels": 16384, "max_new_tokens": 64,
         "sources": [{"kind": "synth", "n": 6, "seed": 11}], **kw}
    return CalibrationRecipe.from_dict(d, name="test")


@pytest.fixture(scope="session")
def make_calib():
    """calib_recipe as a fixture: a tiny synthetic calibration recipe (keyword overrides allowed)."""
    return calib_recipe


@pytest.fixture(scope="session")
def calib_items(tmp_path_factory, tiny_ckpt):
    """Rendered calibration sequences for the tiny checkpoint (images + EGM prompts)."""
    from tokenizers import Tokenizer

    from egm_edge.quantize import calibset
    from egm_edge.quantize.calibration import sample_task, select_samples
    from egm_edge.runtime.preprocess import ImageProcessorConfig

    recipe = calib_recipe()
    calib, hold, _ = select_samples(recipe, tmp_path_factory.mktemp("sources"))
    tok = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    icfg = ImageProcessorConfig.from_json(tiny_ckpt / "preprocessor_config.json")
    image_token = tok.token_to_id("<|image_pad|>")
    items = [calibset.render(s, sample_task(recipe, s), tok, icfg, image_token, "qwen3_vl") for s in calib + hold]
    return items, image_token


class Quantized:
    """A quantized, exported tiny checkpoint plus the fake-quantized ModelOpt model's logits on the same inputs."""

    def __init__(self, out_dir, fake_logits, full_logits, census, linears, spec, fake_weights):
        self.out_dir, self.fake_logits, self.full_logits = out_dir, fake_logits, full_logits
        self.fake_weights = fake_weights  # module name -> weight as the fake-quantized model computes with it
        self.census, self.linears, self.spec = census, linears, spec


@pytest.fixture(scope="session")
def quantized(tmp_path_factory, tiny_ckpt, calib_items):
    """quantized(recipe, kv_cache=None, vision="16bit") -> Quantized, built once per combination."""
    cache = {}

    def build(recipe: str, kv_cache=None, vision="16bit") -> Quantized:
        key = (recipe, kv_cache, vision)
        if key not in cache:
            cache[key] = _quantize(tmp_path_factory.mktemp(f"q_{recipe}"), tiny_ckpt, calib_items, *key)
        return cache[key]

    return build


def _quantize(root, ckpt, calib_items, recipe, kv_cache, vision) -> Quantized:
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers
    from transformers import Qwen3VLForConditionalGeneration

    from egm_edge.quantize import calibset, policy
    from egm_edge.quantize.recipes import QuantSpec

    items, image_token = calib_items
    spec = QuantSpec(recipe, kv_cache, vision)
    model = Qwen3VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    probe = calibset.model_inputs(items[-1], image_token, "cpu", torch.float32)
    with torch.inference_mode():
        full = model(**probe).logits[0]
    linears = policy.linear_counts(model, "qwen3_vl")

    def loop(m):
        with torch.inference_mode():
            for it in items[:-2]:
                m(**calibset.model_inputs(it, image_token, "cpu", torch.float32))

    model = mtq.quantize(model, policy.build_modelopt_config(spec, "qwen3_vl"), forward_loop=loop)
    census = policy.count_quantizers(model, "qwen3_vl")
    # Export shares one smoothing scale among Linears fed by the same norm and re-quantizes them;
    # apply that step first so the fake-quantized model computes what the checkpoint holds.
    requantize_resmooth_fused_llm_layers(model)
    with torch.inference_mode():
        fake = model(**probe).logits[0]
        weights = {n: m.weight_quantizer(m.weight).detach().clone() for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and policy.quantizer_group(n + ".weight_quantizer", "qwen3_vl") == "language_model"}
    out = root / "ckpt"
    export_hf_checkpoint(model, export_dir=out)
    return Quantized(out, fake, full, census, linears, spec, weights)
