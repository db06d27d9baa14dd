"""`quantize()`: the quantize stage, from a full-precision checkpoint to ModelOpt's unified HF checkpoint.

Contract: everything a user can get wrong is refused before the model is loaded
(unknown recipe, nvfp4 without CUDA, unsupported or already-quantized checkpoint,
an output directory holding an artifact without force, a calibration recipe with
no usable samples, too little memory for the estimate). Then: load the model,
render (and optionally let it reason on) the calibration set, materialise and
hash it, quantize with ModelOpt under the project policy (module prefixes from the
checkpoint's family record, `family_of_config`; recipe auto: `auto.search`, per-layer formats
by AutoQuantize, its layer map, decoder bytes and layer_map.png in the manifest), check the quantizer
census, export with `export_hf_checkpoint` into a staged directory, copy the
tokenizer/processor/chat-template files, measure fidelity against the full model
through `loader.load_dequantized`, write fidelity.json/.md and `manifest.json`
last, and rename the directory into place. An interrupted run leaves nothing
that looks complete.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from egm_edge.errors import CheckpointError, EgmError, InputError, UnsupportedError
from egm_edge.quantize.recipes import QuantSpec

SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "video_preprocessor_config.json",
    "processor_config.json", "generation_config.json",
)
# Peak memory over the weights in the load dtype (the model, ModelOpt's export copies, activations, the fidelity
# model), plus the libraries. Measured with /usr/bin/time on EGM-InternVL3-1B (random weights, 0.94B parameters in
# bfloat16, 4 calibration samples with reasoning, CPU): peak RSS 6.15 GB for int4_awq, 6.60 GB for auto (its
# backward pass for the scores), with 0.49 GB of it torch + transformers + ModelOpt imported: 3.0x and 3.2x the
# weights. 2.5x had said 4.69 GB. Not measured at 8B, where the fixed parts weigh less.
MEMORY_FACTOR = 3.0
AUTO_MEMORY_FACTOR = 3.3
LIBRARY_BYTES = 512 * 2**20


def default_cache_dir() -> Path:
    from egm_edge.artifacts import cache_root

    return cache_root() / "calibration"


def parameter_count(model_dir: Path) -> int:
    """Number of stored tensor elements, read from the safetensors headers only."""
    from math import prod

    from egm_edge.artifacts import safetensors_entries

    return sum(prod(v["shape"]) for _, v in safetensors_entries(model_dir))


def available_memory(device: str) -> int | None:
    """Free bytes where the model will live (GPU memory on CUDA, else MemAvailable); None if unknown."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info()[0])
    from egm_edge.artifacts import available_host_memory

    return available_host_memory()


def element_size(dtype: str) -> int:
    """Bytes of one element of a torch dtype name ("bfloat16" -> 2)."""
    import torch

    return torch.tensor([], dtype=getattr(torch, dtype)).element_size()


def check_memory(model_dir: Path, dtype: str, device: str, factor: float = MEMORY_FACTOR) -> dict[str, Any]:
    params = parameter_count(model_dir)
    need = int(params * element_size(dtype) * factor) + LIBRARY_BYTES
    free = available_memory(device)
    if free is not None and need > free:
        raise UnsupportedError(
            f"Quantizing {model_dir} ({params / 1e9:.2f}B parameters in {dtype}) needs about {need / 2**30:.1f} GiB "
            f"on {device} but {free / 2**30:.1f} GiB is free; free memory, use a machine with more, or a GPU."
        )
    return {"parameters": params, "estimated_peak_bytes": need, "available_bytes": free}


def checkpoint_dtype(cfg: dict[str, Any]) -> str:
    for d in (cfg, cfg.get("text_config") or {}):
        v = d.get("dtype") or d.get("torch_dtype")
        if v in ("float32", "bfloat16", "float16"):
            return v
    return "float32"


def _calibration_key(recipe, spec: QuantSpec, tokenizer_sha: str, image_cfg, model_hashes: dict[str, str], samples,
                     family: str) -> str:
    from dataclasses import asdict

    from egm_edge.quantize.calibset import RENDER_VERSION

    def ident(s):  # a changed image or annotation must not reuse a stale set
        st = Path(s.image).stat()
        return [str(s.image), st.st_size, st.st_mtime_ns, s.expression, s.task]

    key = {"recipe": recipe.digest(), "render": RENDER_VERSION, "family": family, "tokenizer": tokenizer_sha, "image": asdict(image_cfg),
           "reasoning": spec.calib_with_reasoning, "samples": [ident(s) for s in samples]}
    if spec.calib_with_reasoning:  # the model's own text: depends on its weights
        key["weights"] = {k: v for k, v in model_hashes.items() if k.endswith(".safetensors")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _keep_architectures(config_json: Path, source: dict[str, Any]) -> None:
    """ModelOpt names the class it exported; a family whose architecture is another name keeps the source's,
    so later stages find the same family record."""
    out = json.loads(config_json.read_text())
    if source.get("architectures") and out.get("architectures") != source["architectures"]:
        out["architectures"] = source["architectures"]
        config_json.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="sample")


def _expected_quant_algo(spec: QuantSpec) -> set[str]:
    from egm_edge.quantize.recipes import RECIPES

    if spec.recipe == "auto":  # one format for every searched layer exports as that format
        return {"MIXED_PRECISION", *(RECIPES[f].quant_algo for f in spec.formats)}
    algo = spec.recipe_spec.quant_algo
    # An FP8 vision tower beside a non-FP8 language model is per-layer mixed in ModelOpt's export.
    return {algo} if spec.vision == "16bit" or algo == "FP8" else {"MIXED_PRECISION"}


def _auto_report(tmp: Path, hf_quant: dict, linears: dict[str, str], search: dict, full_decoder: int, quantized: int, max_bytes,
                 spec) -> dict:
    """The manifest's `auto` section (search figures, per-layer formats, decoder bytes) and layer_map.png beside it.
    `linears`: the language model's Linear names as the checkpoint stores them -> as the model names them."""
    from egm_edge.quantize import layer_map as lm

    cfg = json.loads((tmp / "config.json").read_text())
    formats = lm.layer_formats(hf_quant, linears)  # one format for every searched layer: ModelOpt wrote that one quant_algo
    full = {model_name: formats.get(saved, lm.SIXTEEN) for saved, model_name in linears.items()}
    if max_bytes is not None and quantized > int(max_bytes):
        raise EgmError(f"AutoQuantize at {spec.effective_bits:g} effective bits wrote a {quantized / 2**20:.2f} MiB decoder, over "
                       f"--max-bytes {int(max_bytes) / 2**20:.2f} MiB; lower --max-bytes a little (scales and norms are extra).")
    title = f"{cfg.get('architectures', ['?'])[0]}: {spec.effective_bits:g} effective bits, {quantized / full_decoder:.0%} of the full decoder"
    lm.draw(full, tmp / "layer_map.png", title)
    return {**search, "formats": list(spec.formats), "max_bytes": max_bytes, "layers": full, "summary": lm.summary(full),
            "decoder_fraction": round(quantized / full_decoder, 4), "picture": "layer_map.png"}


def _saved_linear_names(model, family) -> dict[str, str]:
    """{name the checkpoint stores a language-model Linear under: the model's name} (transformers' save-time renaming)."""
    from egm_edge.quantize.loader import saved_names
    from egm_edge.quantize.policy import linear_widths

    renamed = {k.rpartition(".")[0]: v.rpartition(".")[0] for k, v in saved_names(model).items()}
    return {renamed.get(name, name): name for name in linear_widths(model, family)}


def quantize(
    model_dir,
    recipe,
    calibration,
    out_dir,
    *,
    kv_cache: str | None = None,
    vision: str = "16bit",
    calib_with_reasoning: bool = False,
    block_size: int | None = None,
    awq: str | None = None,
    target=None,
    formats=None,
    effective_bits: float | None = None,
    max_bytes: int | None = None,
    force: bool = False,
    cache_dir=None,
    device: str | None = None,
    dtype: str = "auto",
    fidelity: bool = True,
    progress: bool = True,
) -> Path:
    """Quantize `model_dir` with `recipe` (a name or a QuantSpec) calibrated on `calibration`
    (a TOML path or a CalibrationRecipe) into `out_dir`; returns `out_dir` (see module docstring).

    Recipe auto (`egm_edge.quantize.auto`): per-layer formats among `formats`, or those of AUTO_FORMATS that `target`
    (a name, path or TargetProfile) runs, under `effective_bits` or a decoder of at most `max_bytes` bytes."""
    from egm_edge.artifacts import check_output_dir, file_hashes, sha256_file, staged_output, write_manifest
    from egm_edge.quantize import calibset
    from egm_edge.quantize.calibration import CalibrationRecipe, recipe_file, sample_task, select_samples
    from egm_edge.reference.runner import DTYPES, read_model_config

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if not isinstance(recipe, QuantSpec) and recipe == "auto" and not formats and target is not None:
        from egm_edge.targets import auto_formats, load_target

        formats = auto_formats(load_target(target) if isinstance(target, (str, Path)) else target)
    if max_bytes is not None and (effective_bits is not None or recipe != "auto"):
        raise InputError("--max-bytes sets recipe auto's constraint from a decoder size; give it alone with --recipe auto "
                       "(not with --effective-bits or another recipe).")
    spec = recipe if isinstance(recipe, QuantSpec) else QuantSpec(recipe, kv_cache, vision, calib_with_reasoning, block_size, awq,
                                                                  tuple(formats or ()), effective_bits)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    inputs = [model_dir] + ([recipe_file(calibration)] if isinstance(calibration, (str, Path)) else [])
    check_output_dir(out_dir, force, inputs=inputs)  # before torch loads: --out may never clobber the model or the recipe
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if spec.recipe_spec.needs_cuda and not device.startswith("cuda"):
        raise UnsupportedError(
            f"Recipe {spec.recipe} needs a CUDA GPU (ModelOpt's NVFP4 kernels) and this run is on {device}; "
            "run it on a GPU machine or choose fp8, int4_awq, w4a8_awq or int8_sq."
        )
    cfg = read_model_config(model_dir, stage="quantize")  # one sentence for a missing or unsupported checkpoint
    from egm_edge.models.families import family_of_config

    family = family_of_config(cfg, f"checkpoint {model_dir}")
    if (model_dir / "hf_quant_config.json").is_file():
        raise CheckpointError(f"Checkpoint {model_dir} is already quantized (hf_quant_config.json); quantize the full-precision checkpoint.")
    if not (model_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"Model directory {model_dir} has no tokenizer.json; copy the model's tokenizer files there.")
    from egm_edge.quantize import policy
    from egm_edge.quantize.recipes import choose_int4_block

    if spec.block_size is None:  # INT4: the largest block every layer width takes (recorded in the manifest's spec)
        spec = replace(spec, block_size=choose_int4_block(spec.recipe, policy.config_widths(cfg).values())[0])
    policy.check_block_sizes(policy.config_widths(cfg), spec)
    calib_recipe = calibration if isinstance(calibration, CalibrationRecipe) else CalibrationRecipe.from_toml(calibration)
    dtype = checkpoint_dtype(cfg) if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise EgmError(f"Unknown dtype {dtype!r}. Choose from: auto, {', '.join(DTYPES)}.")
    memory = check_memory(model_dir, dtype, device, AUTO_MEMORY_FACTOR if spec.recipe == "auto" else MEMORY_FACTOR)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()

    t0 = time.perf_counter()
    calib_samples, hold_samples, source_summary = select_samples(calib_recipe, cache / "sources")
    input_hashes = file_hashes(model_dir)
    timings["select_and_hash_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    from egm_edge.reference import ReferenceRunner

    runner = ReferenceRunner.open(model_dir, dtype=dtype, device=device)
    model = runner.model
    timings["load_s"] = time.perf_counter() - t0
    from egm_edge.quantize.layer_map import decoder_bytes

    full_decoder = decoder_bytes(model_dir, family)
    if spec.recipe == "auto" and max_bytes is not None:
        from egm_edge.quantize import auto

        n_linear = auto.linear_params(model, family)
        spec = replace(spec, effective_bits=auto.effective_bits_for_bytes(
            int(max_bytes), full_decoder, n_linear, element_size(dtype), spec.weight_block_size))

    image_cfg = calibset.image_config_for(runner.image_config, calib_recipe.max_pixels, calib_recipe.min_pixels)
    key = _calibration_key(calib_recipe, spec, input_hashes["tokenizer.json"], image_cfg, input_hashes, calib_samples + hold_samples,
                           family.name)
    calib_file = cache / f"calib-{key[:24]}.safetensors"
    t0 = time.perf_counter()
    if calib_file.is_file():
        calib_items, hold_items, _ = calibset.load(calib_file)
        reused = True
    else:
        reused = False
        rendered = []
        what = "rendering calibration" + (" + full-model reasoning" if spec.calib_with_reasoning else "")
        for s in _progress(calib_samples + hold_samples, what, progress):
            r = calibset.render(s, sample_task(calib_recipe, s), runner.tokenizer, image_cfg, runner.image_token_id, family)
            if spec.calib_with_reasoning:
                r = calibset.with_reasoning(runner, r, calib_recipe.max_new_tokens)
            rendered.append(r)
        calib_items, hold_items = rendered[: len(calib_samples)], rendered[len(calib_samples):]
        meta = {"key": key, "recipe": calib_recipe.to_dict(), "with_reasoning": spec.calib_with_reasoning,
                "samples": [str(s.sample_id or s.image) + " | " + s.expression for s in calib_samples + hold_samples]}
        calibset.save(calib_file, calib_items, hold_items, meta)
    calib_sha = sha256_file(calib_file)
    timings["calibration_set_s"] = time.perf_counter() - t0

    from egm_edge.quantize import fidelity as fid

    policy.check_block_sizes(policy.linear_widths(model, family), spec)
    linears = policy.linear_counts(model, family)
    image_token_id = runner.image_token_id
    t0 = time.perf_counter()
    ref_logits = fid.reference_logits(model, hold_items, image_token_id) if fidelity and hold_items else []
    timings["reference_logits_s"] = time.perf_counter() - t0

    import modelopt.torch.quantization as mtq

    quant_cfg = policy.build_modelopt_config(spec, family) if spec.recipe != "auto" else None
    pdtype = next(model.parameters()).dtype

    def forward_loop(m):
        with torch.inference_mode():
            for it in _progress(calib_items, f"calibrating {spec.recipe}", progress):
                # lm_head stays unquantized: skip the full-vocabulary logits of every position.
                m(**calibset.model_inputs(it, image_token_id, device, pdtype), logits_to_keep=1)

    t0 = time.perf_counter()
    search = None
    if spec.recipe == "auto":
        from egm_edge.quantize import auto

        close = runner.tokenizer.token_to_id(family.tokens.think_close)
        with torch.enable_grad():  # AutoQuantize's scores need the backward pass
            model, search = auto.search(model, spec, family, calib_items, answer_from=close, progress=progress,
                                        forward_inputs=lambda it: calibset.model_inputs(it, image_token_id, device, pdtype))
    else:
        model = mtq.quantize(model, quant_cfg, forward_loop=forward_loop)
    timings["calibrate_s"] = time.perf_counter() - t0
    census = policy.count_quantizers(model, family)
    policy.check_counts(census, spec, linears)

    from modelopt.torch.export import export_hf_checkpoint

    linear_names = _saved_linear_names(model, family) if search is not None else {}
    with staged_output(out_dir, force, inputs=inputs) as tmp:
        t0 = time.perf_counter()
        export_hf_checkpoint(model, export_dir=tmp)
        _keep_architectures(tmp / "config.json", cfg)
        del model, runner
        gc.collect()
        for name in SIDE_FILES:
            if (model_dir / name).is_file() and not (tmp / name).exists():
                shutil.copyfile(model_dir / name, tmp / name)
        timings["export_s"] = time.perf_counter() - t0
        hf_quant = json.loads((tmp / "hf_quant_config.json").read_text())
        q = hf_quant.get("quantization") or {}
        if q.get("quant_algo") not in _expected_quant_algo(spec) or q.get("kv_cache_quant_algo") != spec.kv_cache_quant_algo:
            raise EgmError(
                f"ModelOpt exported quant_algo={q.get('quant_algo')!r}, kv_cache_quant_algo={q.get('kv_cache_quant_algo')!r} "
                f"for {spec.describe()}; expected {sorted(_expected_quant_algo(spec))} and {spec.kv_cache_quant_algo!r}."
            )

        quantized_decoder = decoder_bytes(tmp, family)
        layers = None
        if search is not None:
            layers = _auto_report(tmp, hf_quant, linear_names, search, full_decoder, quantized_decoder, max_bytes, spec)
        report: dict[str, Any] = {"recipe": spec.describe()}
        if fidelity:
            t0 = time.perf_counter()
            from egm_edge.quantize.loader import load_dequantized

            snr = fid.weight_snr(model_dir, tmp)
            report["weights"] = fid.summarize_snr(snr)
            report["weight_snr_db"] = snr
            if hold_items:
                qmodel = load_dequantized(tmp, dtype=getattr(torch, dtype)).to(device)
                report["logits"] = fid.logit_agreement(qmodel, hold_items, ref_logits, image_token_id)
                del qmodel
                gc.collect()
            fid.write_report(tmp, report, family)
            timings["fidelity_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_start
        write_manifest(
            tmp,
            "quantize",
            family=family.name,
            recipe={"name": spec.recipe, **spec.to_dict()},
            precision=spec.recipe,
            policy={"vision": spec.vision, "lm_head": "16-bit", "embeddings": "16-bit", "kv_cache": spec.kv_cache or "16-bit",
                    "modelopt_config": spec.recipe_spec.modelopt_config},
            quantizers={"enabled": census, "expected": policy.expected_census(spec, linears), "linear_layers": linears},
            auto=layers,
            decoder_bytes={"full": full_decoder, "quantized": quantized_decoder},
            calibration={"recipe": calib_recipe.to_dict(), "sha256": calib_sha, "file": str(calib_file), "reused": reused,
                         "with_reasoning": spec.calib_with_reasoning, "sources": source_summary,
                         "calibration": calibset.stats(calib_items), "holdout": calibset.stats(hold_items)},
            input={"path": str(model_dir.resolve()), "sha256": input_hashes, "dtype": dtype},
            output={"hf_quant_config": hf_quant, "files": file_hashes(tmp)},
            fidelity={k: v for k, v in fid.json_safe(report).items() if k != "weight_snr_db"} if fidelity else None,
            device=device,
            memory=memory,
            timings={k: round(v, 3) for k, v in timings.items()},
        )
    return out_dir
