"""Convert OpenGVLab's original InternVL layout (`InternVLChatModel`) into transformers' native one.

Contract: `convert_checkpoint(src, out, *, force=False)` reads a checkpoint that EGM's InternVL
training writes (config.json with `llm_config` / `vision_config`, weights `vision_model.*`,
`mlp1.*`, `language_model.model.*`, `language_model.lm_head.*`; read as data, never executed)
and writes the same model as `InternVLForConditionalGeneration` loads it, so every later stage
reads one layout: config.json (the record's `hf_class`), model.safetensors (names renamed, the
vision attention's fused `qkv` split into q/k/v, stored under the names transformers' own
save_pretrained writes, as ModelOpt's export and the published -hf checkpoints do), the tokenizer files, the family record's chat
template, a GotOcr2 preprocessor_config.json built from the original config's tiling settings,
generation_config.json, and `manifest.json` (stage "convert") last, all staged beside `out`.
The renames follow transformers' own converter (models/internvl/convert_internvl_weights_to_hf.py)
and the result must name exactly the tensors the transformers class has, or nothing is written.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from egm_edge.errors import CheckpointError, UnsupportedError
from egm_edge.models.families.internvl import (
    ORIGINAL_ARCHITECTURE, ORIGINAL_FUSED_QKV, ORIGINAL_OTHER_RULES, ORIGINAL_VISION_PREFIX, ORIGINAL_VISION_RULES,
)

# Original vision_config keys -> transformers' InternVLVisionConfig keys (the rest are dropped: flash-attn, drop path).
VISION_KEYS = {
    "hidden_size": "hidden_size", "num_hidden_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size", "image_size": "image_size", "patch_size": "patch_size",
    "num_channels": "num_channels", "hidden_act": "hidden_act", "layer_norm_eps": "layer_norm_eps", "norm_type": "norm_type",
    "initializer_range": "initializer_range", "qkv_bias": "attention_bias", "qk_normalization": "use_qk_norm",
    "attention_dropout": "attention_dropout",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json")
SHARD_BYTES = 4 << 30


def rename(name: str) -> str:
    """The transformers name of one original tensor (`...attn.qkv.*` keeps `attention.qkv`: it is split later)."""
    rules = ORIGINAL_VISION_RULES if name.startswith(ORIGINAL_VISION_PREFIX) else ORIGINAL_OTHER_RULES
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name


def convert_state_dict(tensors: dict, vision_hidden: int) -> dict:
    """Original tensors -> transformers' names, the fused vision `qkv` (weight and bias) split in q, k, v rows."""
    out = {}
    for name, t in tensors.items():
        new = rename(name)
        if ORIGINAL_FUSED_QKV in new:
            if t.shape[0] != 3 * vision_hidden:
                raise CheckpointError(f"{name} has {t.shape[0]} rows, not 3 x vision hidden_size {vision_hidden}; the checkpoint is inconsistent.")
            for k, part in enumerate(("q_proj", "k_proj", "v_proj")):
                out[new.replace(ORIGINAL_FUSED_QKV, f".attention.{part}.")] = t[k * vision_hidden:(k + 1) * vision_hidden].clone()
        else:
            out[new] = t
    return out


def hf_config(original: dict[str, Any], image_token_id: int, eos_ids: list[int], pad_id: int, family) -> dict[str, Any]:
    """transformers' InternVLConfig dict for an original InternVLChatModel config (checked by the class itself)."""
    import transformers

    from egm_edge.models.hf_config import spec_from_config

    v = spec_from_config(original).vision  # one sentence for a variant egm-edge does not run (6B ViT, non-Qwen2 LLM)
    if original.get("ps_version", "v2") != "v2":
        raise UnsupportedError(f"The checkpoint's ps_version={original.get('ps_version')!r} pixel shuffle is not the one "
                               "transformers' InternVL implements (v2); egm-edge converts InternVL-3 (v2) checkpoints only.")
    llm = dict(original.get("llm_config") or {})
    text_keys = set(transformers.Qwen2Config().to_dict()) | {"rope_theta", "rope_scaling"}
    text = {k: v for k, v in llm.items() if k in text_keys and k not in ("architectures", "transformers_version", "_name_or_path")}
    if "torch_dtype" in llm and "dtype" not in text:
        text["dtype"] = llm["torch_dtype"]
    text.update(model_type="qwen2", eos_token_id=eos_ids[0], pad_token_id=pad_id)
    vc = original.get("vision_config") or {}
    vision = {new: vc[old] for old, new in VISION_KEYS.items() if old in vc}
    vision["use_absolute_position_embeddings"] = True
    if "force_image_size" in original and original["force_image_size"]:
        vision["image_size"] = original["force_image_size"]
    tied = bool(original.get("tie_word_embeddings", llm.get("tie_word_embeddings", False)))
    config = transformers.InternVLConfig(
        text_config=text, vision_config=vision, image_token_id=image_token_id,
        downsample_ratio=float(original.get("downsample_ratio", 0.5)),
        vision_feature_layer=int(original.get("select_layer", -1)), tie_word_embeddings=tied,
    )
    d = config.to_dict()
    d.update(architectures=[family.hf_class], eos_token_id=eos_ids[0], pad_token_id=pad_id,
             image_seq_length=(v.image_size // v.patch // v.merge) ** 2,
             max_dynamic_patch=int(original.get("max_dynamic_patch", 12)), use_thumbnail=bool(original.get("use_thumbnail", True)))
    if text.get("dtype") or original.get("torch_dtype"):
        d["dtype"] = text.get("dtype") or original.get("torch_dtype")
    return d


def tiling(original: dict[str, Any], src: Path):
    """The tiles the original model was trained with: its config's settings, the mean/std of its
    preprocessor_config.json when that file has them (ImageNet's otherwise, as InternVL's own loader)."""
    from egm_edge.runtime.tiling import TilingConfig

    vc = original.get("vision_config") or {}
    kw: dict[str, Any] = {}
    pre = src / "preprocessor_config.json"
    if pre.is_file():
        try:
            d = json.loads(pre.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"Cannot read {pre} ({e}); restore the checkpoint's preprocessor_config.json.") from None
        kw.update({k: tuple(d[k]) for k in ("image_mean", "image_std") if isinstance(d.get(k), list)})
    patch = vc.get("patch_size", 14)
    return TilingConfig(
        tile_size=int(original.get("force_image_size") or vc.get("image_size", 448)),
        min_patches=int(original.get("min_dynamic_patch", 1)), max_patches=int(original.get("max_dynamic_patch", 12)),
        use_thumbnail=bool(original.get("use_thumbnail", True)), patch_size=int(patch[0] if isinstance(patch, list) else patch),
        downsample_ratio=float(original.get("downsample_ratio", 0.5)), **kw,
    )


def _tokenizer(src: Path, dst: Path, family) -> None:
    """Copy the tokenizer files; tokenizer_config.json loses remote code and an embedded template, and names the
    image tokens transformers' InternVLProcessor reads. Without tokenizer.json, transformers writes one (no remote code)."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    if not (dst / "tokenizer.json").is_file():
        try:
            import transformers

            tok = transformers.AutoTokenizer.from_pretrained(src, trust_remote_code=False, local_files_only=True)
            tok.backend_tokenizer.save(str(dst / "tokenizer.json"))
        except Exception as e:  # transformers raises many kinds here; one sentence for all
            raise CheckpointError(f"Checkpoint {src} has no tokenizer.json and transformers could not build one from its "
                                  f"tokenizer files ({str(e).splitlines()[0] if str(e) else type(e).__name__}); copy the "
                                  "model's tokenizer files there.") from None
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    for key in ("auto_map", "chat_template"):
        cfg.pop(key, None)
    t = family.tokens
    cfg["extra_special_tokens"] = {**(cfg.get("extra_special_tokens") if isinstance(cfg.get("extra_special_tokens"), dict) else {}),
                                   "start_image_token": t.image_start, "end_image_token": t.image_end, "context_image_token": t.image}
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _read_original(src: Path) -> tuple[dict[str, Any], Any]:
    from egm_edge.artifacts import read_json
    from egm_edge.models.families import family_of_config

    if not src.is_dir():
        raise CheckpointError(f"Checkpoint directory {src} does not exist; pass the directory of an InternVL checkpoint.")
    cfg = read_json(src / "config.json", restore="restore the checkpoint's config.json",
                    missing=f"Checkpoint directory {src} has no config.json; pass an InternVL checkpoint directory.")
    family = family_of_config(cfg, f"checkpoint {src}")
    arch = (cfg.get("architectures") or [None])[0]
    if arch == family.hf_class:
        raise CheckpointError(f"Checkpoint {src} is already in transformers' {family.hf_class} layout; use it as it is.")
    if arch != ORIGINAL_ARCHITECTURE and not (arch is None and "llm_config" in cfg):
        raise UnsupportedError(f"Checkpoint {src} is a {arch or cfg.get('model_type')!r} model; egm-edge convert reads "
                               f"OpenGVLab's original {ORIGINAL_ARCHITECTURE} layout only.")
    if (src / "hf_quant_config.json").is_file():
        raise CheckpointError(f"Checkpoint {src} is quantized (hf_quant_config.json); convert the full-precision checkpoint.")
    return cfg, family


def _read_tensors(src: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt*"))
        raise CheckpointError(f"Checkpoint {src} has no .safetensors weights (found {', '.join(others) or 'none'}); "
                              "only safetensors are read, never pickled weights.")
    tensors = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def _check_names(state: dict, config: dict[str, Any], family, src: Path) -> dict[str, str]:
    """The converted names must be exactly the transformers class's (lm_head may be absent when tied); returns
    the names transformers' save_pretrained stores them under (`loader.saved_names`), to write the same files."""
    import torch
    import transformers

    model_class = getattr(transformers, family.hf_class)
    with torch.device("meta"):
        model = model_class(model_class.config_class.from_dict(config))
    want = set(model.state_dict())
    missing = sorted(want - set(state) - ({"lm_head.weight"} if config.get("tie_word_embeddings") else set()))
    unexpected = sorted(set(state) - want)
    if missing or unexpected:
        raise CheckpointError(
            f"Checkpoint {src} does not convert to {family.hf_class}: {len(missing)} tensors missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); it is not an InternVL-3 checkpoint egm-edge reads."
        )
    for name, t in state.items():
        shape = tuple(model.state_dict()[name].shape)
        if tuple(t.shape) != shape:
            raise CheckpointError(f"Converted tensor {name} has shape {tuple(t.shape)} but config.json implies {shape}; "
                                  "the checkpoint's config.json and weights do not belong together.")
    from egm_edge.quantize.loader import saved_names

    return saved_names(model)


def _save_weights(state: dict, out: Path) -> list[str]:
    """model.safetensors, or shards of at most SHARD_BYTES with transformers' index file."""
    from safetensors.torch import save_file

    shards: list[dict] = [{}]
    size = 0
    for name in sorted(state):
        t = state[name].contiguous()
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names


def convert_checkpoint(src, out, *, force: bool = False) -> Path:
    """Convert the original-layout InternVL checkpoint `src` into `out` (see the module docstring); returns `out`."""
    from tokenizers import Tokenizer

    from egm_edge.artifacts import check_output_dir, file_hashes, staged_output, write_manifest

    t_start = time.perf_counter()
    src, out = Path(src), Path(out)
    check_output_dir(out, force, inputs=[src])
    original, family = _read_original(src)
    tcfg = tiling(original, src)
    tensors = _read_tensors(src)
    vision_hidden = int((original.get("vision_config") or {}).get("hidden_size", 1024))
    state = convert_state_dict(tensors, vision_hidden)
    del tensors

    with staged_output(out, force, inputs=[src]) as tmp:
        _tokenizer(src, tmp, family)
        tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))
        ids = {name: tok.token_to_id(name) for name in (family.tokens.image, *family.tokens.stop)}
        missing = [n for n, i in ids.items() if i is None]
        if missing:
            raise CheckpointError(f"The tokenizer of {src} lacks the {family.title} tokens {', '.join(missing)}; "
                                  "copy the model's own tokenizer files there.")
        eos = [ids[n] for n in family.tokens.stop]
        config = hf_config(original, ids[family.tokens.image], eos, eos[-1], family)
        stored = _check_names(state, config, family, src)
        weights = _save_weights({stored.get(k, k): v for k, v in state.items()}, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        generation = {"do_sample": False, "eos_token_id": eos, "pad_token_id": eos[-1]}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        (tmp / "chat_template.jinja").write_text(family.chat_template, encoding="utf-8")
        pre = tcfg.to_dict()
        pre.update(do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True, processor_class="InternVLProcessor")
        (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n", encoding="utf-8")
        write_manifest(
            tmp, "convert", family=family.name,
            input={"path": str(src.resolve()), "architecture": ORIGINAL_ARCHITECTURE, "sha256": file_hashes(src)},
            output={"architecture": family.hf_class, "tensors": len(state), "weights": weights, "files": file_hashes(tmp)},
            timings={"total_s": round(time.perf_counter() - t_start, 3)},
        )
    return out
