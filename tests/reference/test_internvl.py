"""InternVL-3 through the reference stage: a tiny HF-native checkpoint, its prompt against transformers'
own processor and chat template, greedy decoding against `generate`, and original-layout conversion.

The tiny model (egm_edge.reference.checkpoint, InternVL layout): Qwen2 2 layers, hidden 64; InternViT 2
layers over 112-px tiles of 14-px patches (16 `<IMG_CONTEXT>` per tile, at most 4 tiles + thumbnail); a
small BPE with InternVL's added tokens. Until the family record lists "reference", the tests run with a
copy of the record that does (`internvl_stages`).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CORPUS = [
    "Please provide the bounding box coordinate of the region this sentence describes: <ref>the red circle</ref> ",
    "Please provide the amodal bounding box coordinate of the region this sentence describes: <ref>a square</ref>",
    "<think>\nThe red square is on the left.\n</think>\n\n<box>[[12, 340, 200, 560]]</box>",
] * 20


@pytest.fixture(scope="module")
def internvl_tokenizer(tmp_path_factory):
    from egm_edge.synth.tokenizer import build_tokenizer, write_tokenizer_files

    root = tmp_path_factory.mktemp("ivl_tok")
    write_tokenizer_files(build_tokenizer(CORPUS, 320, family="internvl"), root, family="internvl")
    return root


@pytest.fixture(scope="module")
def internvl_ckpt(tmp_path_factory, internvl_tokenizer):
    from egm_edge.reference.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ivl") / "tiny-internvl", internvl_tokenizer, seed=0, family="internvl")


@pytest.fixture(scope="module")
def internvl_runner(internvl_ckpt):
    from egm_edge.reference import ReferenceRunner

    return ReferenceRunner.open(internvl_ckpt)


@pytest.fixture(scope="module")
def wide_image():
    """300x150: a 2x1 grid + thumbnail at 112-px tiles, 48 image tokens."""
    im = Image.new("RGB", (300, 150), (40, 90, 160))
    im.paste((220, 30, 30), (60, 50, 140, 130))
    return im


def _hf_processor(ckpt):
    """transformers' InternVLProcessor over the checkpoint's tokenizer, GotOcr2 PIL image processor and chat template.
    Its video processor needs torchvision (absent here), so that unused slot's class check is relaxed; the tokenizer
    gets a video token it never sees (the processor's constructor asks for one)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from egm_edge.models.families import get_family

    t = get_family("internvl").tokens
    tok = transformers.AutoTokenizer.from_pretrained(ckpt, extra_special_tokens={
        "start_image_token": t.image_start, "end_image_token": t.image_end, "context_image_token": t.image,
        "video_token": "<|video_pad|>"})
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    keys = ("min_patches", "max_patches", "size", "resample", "rescale_factor", "image_mean", "image_std", "do_resize",
            "do_rescale", "do_normalize", "do_convert_rgb")
    image_processor = GotOcr2ImageProcessorPil(**{k: pre[k] for k in keys})

    class ImageOnlyInternVLProcessor(transformers.InternVLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyInternVLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=None,
                                      image_seq_length=pre["image_seq_length"], chat_template=(ckpt / "chat_template.jinja").read_text())


def test_tiny_checkpoint_is_hf_native_internvl(internvl_ckpt):
    from tokenizers import Tokenizer

    from egm_edge.models.families import get_family
    from egm_edge.models.hf_config import spec_from_config
    from egm_edge.runtime.tiling import TilingConfig

    fam = get_family("internvl")
    cfg = json.loads((internvl_ckpt / "config.json").read_text())
    tok = Tokenizer.from_file(str(internvl_ckpt / "tokenizer.json"))
    assert cfg["architectures"] == [fam.hf_class]
    assert cfg["image_token_id"] == tok.token_to_id("<IMG_CONTEXT>")
    for name, _ in fam.added_tokens:
        assert tok.token_to_id(name) is not None, name
    assert tok.token_to_id("<think>") is None and tok.token_to_id("</think>") is None  # Qwen2.5: the tags are text
    tiles = TilingConfig.from_json(internvl_ckpt / "preprocessor_config.json")
    assert (tiles.tile_size, tiles.patch_size, tiles.max_patches, tiles.tokens_per_tile) == (112, 14, 4, 16)
    spec = spec_from_config(internvl_ckpt)
    assert spec.family == "internvl" and spec.vision.image_size == 112 and spec.text.qkv_bias
    assert (internvl_ckpt / "chat_template.jinja").read_text() == fam.chat_template


def test_prompt_and_pixels_equal_transformers_processor(internvl_runner, internvl_ckpt, wide_image):
    from egm_edge.models.families import get_family

    fam = get_family("internvl")
    proc = _hf_processor(internvl_ckpt)
    for task in ("vanilla", "amodal"):
        msgs = [{"role": "user", "content": [{"type": "image", "image": wide_image},
                                             {"type": "text", "text": fam.user_text("the red square", task)}]}]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert text == f"<|im_start|>user\n<IMG_CONTEXT>\n{fam.user_text('the red square', task)}<|im_end|>\n<|im_start|>assistant\n"
        ref = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
        ours = internvl_runner.build_prompt(wide_image, "the red square", task)
        assert ours.ids == list(ref["input_ids"][0])
        assert np.array_equal(ours.image.pixel_values, np.asarray(ref["pixel_values"]))
        assert ours.image.n_tiles == 3 and ours.image.n_image_tokens == 48
        rendered = internvl_runner.tokenizer.decode(ours.ids, skip_special_tokens=False)
        assert rendered == fam.chat_prompt(fam.user_text("the red square", task), 48)
    # System and assistant turns render as in Qwen's template (EGM sends neither).
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    assert proc.apply_chat_template(convo, add_generation_prompt=False, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n")


def test_greedy_tokens_equal_generate(internvl_runner, wide_image):
    prompt = internvl_runner.build_prompt(wide_image, "the red square")
    n = 24
    gen = internvl_runner.generate_ids(prompt.ids, prompt.image.pixel_values, max_new_tokens=64, max_answer_tokens=8)
    ids = torch.tensor([prompt.ids])
    with torch.inference_mode():
        ref = internvl_runner.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                             pixel_values=torch.from_numpy(prompt.image.pixel_values), max_new_tokens=n,
                                             do_sample=False)[0, ids.shape[1]:].tolist()
    assert not gen.budget_forced or gen.think_tokens >= n  # the first n tokens were chosen by the model
    assert gen.tokens[:n] == ref
    assert len(set(ref)) > 4  # a decode repeating one token would prove little about the cache and positions


def test_ground_returns_a_result(internvl_runner, wide_image):
    from egm_edge.grounding import GroundingResult

    res = internvl_runner.ground(wide_image, "the red square", max_new_tokens=32, max_answer_tokens=4)
    assert isinstance(res, GroundingResult) and res.image_size == (300, 150)
    assert res.think_tokens + res.answer_tokens <= 32
    assert {"preprocess", "vision", "prefill", "decode", "total"} <= set(res.timings)


@pytest.mark.parametrize("mode", ["hard", "qwen"])
@pytest.mark.parametrize("budget", [0, 5, 90])
def test_think_budget_with_a_text_close(internvl_runner, wide_image, mode, budget):
    """The InternVL tokenizer has no `</think>` token: the runtime's policy forces and detects the tag as text."""
    assert len(internvl_runner.think_ids.think_close) > 1
    res = internvl_runner.ground(wide_image, "the red square", think_budget=budget, budget_mode=mode, max_new_tokens=110,
                                 max_answer_tokens=6)
    assert res.budget_forced and res.think_tokens == budget  # a random model does not close its reasoning by itself
    assert "</think>" in res.text and res.answer_tokens <= 6
    sentence = internvl_runner.think_ids._split(internvl_runner.think_ids.qwen_close)[0]
    # Qwen's sentence where it fits the budget (this tiny BPE spends 80 tokens on it), else the hard close.
    assert ("Considering the limited time by the user" in res.reasoning) == (mode == "qwen" and len(sentence) <= budget)


def test_box_tag_answer_is_parsed_in_pixels(internvl_runner):
    """What EGM-InternVL answers, decoded as the runner decodes it (the special tags kept, as the runtime keeps
    them), parses to the box in pixels."""
    from egm_edge.grounding import GroundingResult

    ids = internvl_runner.tokenizer.encode("<think>\nleft one\n</think>\n\n<box>[[100, 200, 500, 600]]</box>",
                                           add_special_tokens=False).ids
    text = internvl_runner.decode_text(ids + [internvl_runner.think_ids.stop[0]])
    assert text.endswith("</think>\n\n<box>[[100, 200, 500, 600]]</box>")
    res = GroundingResult.from_output(text, 300, 150, think_tokens=3, answer_tokens=5, budget_forced=False, family="internvl")
    assert res.box == (30, 30, 150, 90) and res.reasoning == "left one"


# -- original layout (OpenGVLab InternVLChatModel) -------------------------------------------------------------

def _to_original(state: dict, vision_hidden: int) -> dict:
    """The inverse of transformers' converter, written out independently: HF names -> InternVLChatModel names."""
    out = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        if name.startswith("model.vision_tower."):
            n = "vision_model." + name[len("model.vision_tower."):]
            for a, b in ((".encoder.layer.", ".encoder.layers."), (".cls_token", ".class_embedding"),
                         (".position_embeddings", ".position_embedding"), (".patch_embeddings.projection.", ".patch_embedding."),
                         (".lambda_1", ".ls1"), (".lambda_2", ".ls2"), (".attention.projection_layer.", ".attn.proj."),
                         (".layernorm_before.", ".norm1."), (".layernorm_after.", ".norm2.")):
                n = n.replace(a, b)
            for part in ("q_proj", "k_proj", "v_proj"):
                if f".attention.{part}." in n:
                    key = n.replace(f".attention.{part}.", ".attn.qkv.")
                    qkv.setdefault(key, {})[part] = t
                    break
            else:
                out[n] = t
        elif name.startswith("model.multi_modal_projector."):
            n = name[len("model.multi_modal_projector."):]
            n = n.replace("layer_norm.", "mlp1.0.").replace("linear_1.", "mlp1.1.").replace("linear_2.", "mlp1.3.")
            out[n] = t
        elif name.startswith("model.language_model."):
            out["language_model.model." + name[len("model.language_model."):]] = t
        elif name.startswith("lm_head."):
            out["language_model." + name] = t
        else:
            raise AssertionError(f"unmapped {name}")
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
        assert out[key].shape[0] == 3 * vision_hidden
    return out


def _original_config(hf: dict) -> dict:
    """config.json as OpenGVLab's InternVLChatConfig writes it for the same model."""
    t, v = dict(hf["text_config"]), hf["vision_config"]
    t["architectures"] = ["Qwen2ForCausalLM"]
    t["attn_implementation"] = "flash_attention_2"
    t.update(rope_theta=t.pop("rope_parameters")["rope_theta"], rope_scaling=None, torch_dtype="float32")  # older keys
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "downsample_ratio": hf["downsample_ratio"], "dynamic_image_size": True, "force_image_size": v["image_size"][0],
        "max_dynamic_patch": hf["max_dynamic_patch"], "min_dynamic_patch": 1, "use_thumbnail": True, "ps_version": "v2",
        "select_layer": -1, "template": "internvl2_5", "torch_dtype": "float32", "llm_config": t,
        "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": v["hidden_size"],
                          "num_hidden_layers": v["num_hidden_layers"], "num_attention_heads": v["num_attention_heads"],
                          "intermediate_size": v["intermediate_size"], "image_size": v["image_size"][0], "patch_size": v["patch_size"][0],
                          "qkv_bias": True, "qk_normalization": False, "norm_type": "layer_norm", "layer_norm_eps": v["layer_norm_eps"],
                          "hidden_act": "gelu", "use_flash_attn": True, "drop_path_rate": 0.1, "initializer_factor": 1.0},
    }


@pytest.fixture(scope="module")
def original_ckpt(tmp_path_factory, internvl_ckpt):
    """The tiny model with every tensor perturbed (so a swapped norm or scale shows), written in the original layout;
    returns (its directory, the perturbed HF-native model)."""
    import shutil

    from safetensors.torch import save_file

    model = transformers.InternVLForConditionalGeneration.from_pretrained(internvl_ckpt, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    root = tmp_path_factory.mktemp("orig") / "egm-internvl-original"
    root.mkdir()
    hf = json.loads((internvl_ckpt / "config.json").read_text())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(_to_original(state, hf["vision_config"]["hidden_size"]), str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(_original_config(hf)))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(internvl_ckpt / name, root / name)
    cfg = json.loads((root / "tokenizer_config.json").read_text())
    cfg.pop("extra_special_tokens", None)  # the original tokenizer names no image tokens for transformers
    (root / "tokenizer_config.json").write_text(json.dumps(cfg))
    return root, model


def test_convert_gives_identical_logits(original_ckpt, internvl_ckpt, tmp_path, wide_image):
    from egm_edge.reference import ReferenceRunner
    from egm_edge.reference.convert import convert_checkpoint

    src, model = original_ckpt
    out = convert_checkpoint(src, tmp_path / "converted")
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "convert" and m["family"] == "internvl" and m["output"]["architecture"] == "InternVLForConditionalGeneration"
    assert set(m["input"]["sha256"]) == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}

    from safetensors import safe_open

    names = lambda d: set(safe_open(str(d / "model.safetensors"), "pt").keys())  # noqa: E731
    assert names(out) == names(internvl_ckpt)  # stored as transformers' save_pretrained stores InternVL
    runner = ReferenceRunner.open(out)
    prompt = runner.build_prompt(wide_image, "the red square")
    ids, px = torch.tensor([prompt.ids]), torch.from_numpy(prompt.image.pixel_values)
    with torch.inference_mode():
        want = model(input_ids=ids, pixel_values=px).logits
        got = runner.model(input_ids=ids, pixel_values=px).logits
    assert torch.equal(got, want)
    for a, b in zip(runner.model.state_dict().items(), model.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]


def test_original_layout_is_refused_with_the_way_out(original_ckpt):
    from egm_edge.errors import CheckpointError
    from egm_edge.reference import ReferenceRunner

    src, _ = original_ckpt
    with pytest.raises(CheckpointError, match="egm-edge convert --checkpoint"):
        ReferenceRunner.open(src)


def test_convert_refuses_what_it_cannot_read(original_ckpt, internvl_ckpt, tmp_path):
    from egm_edge.errors import CheckpointError, UnsupportedError
    from egm_edge.reference.convert import convert_checkpoint

    with pytest.raises(CheckpointError, match="already in transformers' InternVLForConditionalGeneration layout"):
        convert_checkpoint(internvl_ckpt, tmp_path / "a")
    src, _ = original_ckpt
    bad = tmp_path / "v1"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).symlink_to(f)
    (bad / "config.json").unlink()
    (bad / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), "ps_version": "v1"}))
    with pytest.raises(UnsupportedError, match="ps_version='v1'"):
        convert_checkpoint(bad, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_convert_cli(original_ckpt, tmp_path, capsys):
    from egm_edge.cli import main

    src, _ = original_ckpt
    assert main(["convert", "--checkpoint", str(src), "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "manifest.json").is_file() and "wrote" in capsys.readouterr().out
    assert main(["convert", "--checkpoint", str(src), "--out", str(tmp_path / "c")]) != 0  # an artifact is there: no --force
