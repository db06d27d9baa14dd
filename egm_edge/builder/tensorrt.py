"""GPU and Jetson bundles: the ONNX IR plus a TensorRT build plan; engines are compiled on the device.

Contract:
- `build_tensorrt(export_dir, out_dir, target, plan, ...)` checks the export's
  graphs against TensorRT's ONNX operator support and Q/DQ fusion rules
  (egm_edge.builder.trt_contract), then writes a bundle (staged, manifest last):
  the graphs (copied, external weight files included, never symlinked),
  tokenizer, image-processor config capped to the planned image size,
  generation_config.json, `build_plan.json` and, for targets whose profile names
  a TensorRT-LLM version, `trtllm/` (egm_edge.builder.trtllm). No TensorRT needed.
- `build_plan(...)` is pure: optimisation profiles from the planner's numbers
  (vision: patches min/opt/max; decoder profile 0 "prefill": prompt + image
  tokens, no past; profile 1 "decode": one token, past up to the KV length =
  longest prompt + image + think budget + budget close + answer), strongly typed
  (precision comes from the graphs' Q/DQ and dtypes), the TensorRT version the
  target profile assumes, a workspace limit, and `plan_hash` over all of it and
  the graphs' sha256.
- `finalize(bundle_dir)` runs ON the device: lazy `import tensorrt` (the `trt`
  extra), refuses a GPU of another compute capability than the plan's, builds
  both engines (Builder, STRONGLY_TYPED network from OnnxParser, memory pool
  limit, optimisation profiles, build_serialized_network) into
  engines/<engine_key>/ and reuses them when already there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from egm_edge.errors import CheckpointError, EgmError, UnsupportedError

PLAN_VERSION = 1
GIB = 1024**3
SIDE_FILES = ("tokenizer.json", "preprocessor_config.json", "config.json", "chat_template.jinja", "tokenizer_config.json")
MIN_TEXT_TOKENS = 128  # prompt text the prefill profile admits besides the image, at least


def prompt_text_max(plan) -> int:
    """Prompt text tokens (besides the image) a bundle admits: the planned prompt with room for longer expressions."""
    return max(MIN_TEXT_TOKENS, 2 * plan.prompt_tokens)


def _max_tiles(cfg) -> int:
    """Tiles of the largest image a tiling processor makes: its grid of at most max_patches, plus the thumbnail."""
    return cfg.max_patches + (1 if cfg.use_thumbnail and cfg.max_patches > 1 else 0)


def _dims(plan, image_processor: dict, decoder: dict) -> dict[str, int]:
    """Token counts every profile is built from (see the module docstring)."""
    img = plan.image.image_tokens
    if image_processor.get("image_processor_type", "").startswith("GotOcr2"):  # InternVL tiles: N tiles of fixed size
        from egm_edge.runtime.tiling import TilingConfig

        cfg = TilingConfig.from_dict(image_processor)
        merge, per_tile = 1, cfg.tokens_per_tile
        img_max = max(img, _max_tiles(cfg) * per_tile)
    else:
        merge = int(image_processor.get("merge_size", 2))
        # The largest image the bundle's processor lets through (smart_resize keeps h*w <= max_pixels).
        img_max = max(img, int(image_processor["max_pixels"]) // (int(image_processor.get("patch_size", 16)) * merge) ** 2)
    text_opt = plan.prompt_tokens
    text_max = prompt_text_max(plan)
    tail = plan.think_budget + plan.close_tokens + plan.answer_tokens
    return {"merge": merge, "image_opt": img, "image_max": img_max, "text_opt": text_opt, "text_max": text_max,
            "prefill_opt": text_opt + img, "prefill_max": text_max + img_max, "kv_opt": text_opt + img + plan.think_budget // 2,
            "kv_max": text_max + img_max + tail, "num_deepstack": int(decoder["num_deepstack"])}


def _shape(sym: tuple, v: dict[str, int]) -> list[int]:
    return [v[s] if isinstance(s, str) else s for s in sym]


def _profile(name: str, shapes: dict[str, tuple], points: list[dict[str, int]]) -> dict:
    return {"name": name, "shapes": {k: dict(zip(("min", "opt", "max"), (_shape(sym, p) for p in points))) for k, sym in shapes.items()}}


def decoder_profiles(decoder: dict, d: dict[str, int]) -> list[dict]:
    """Profile 0 prefill (no past), profile 1 decode (one token); batch 1, one logit row."""
    e, k, kvh, hd = int(decoder["hidden_size"]), d["num_deepstack"], int(decoder["num_kv_heads"]), int(decoder["head_dim"])
    sym = {"input_ids": (1, "S"), "image_features": ("M", e), "deepstack_features": (k, "M", e), "position_ids": (3, 1, "S"),
           "attention_mask": (1, "T"), "logits_index": (1, 1)}
    for i in range(int(decoder["num_layers"])):
        for kv in ("key", "value"):
            sym[f"past_key_values.{i}.{kv}"] = (1, kvh, "P", hd)
    prefill = [{"S": 1, "M": 0, "P": 0, "T": 1},
               {"S": d["prefill_opt"], "M": d["image_opt"], "P": 0, "T": d["prefill_opt"]},
               {"S": d["prefill_max"], "M": d["image_max"], "P": 0, "T": d["prefill_max"]}]
    decode = [{"S": 1, "M": 0, "P": 1, "T": 2},
              {"S": 1, "M": 0, "P": d["kv_opt"], "T": d["kv_opt"] + 1},
              {"S": 1, "M": 0, "P": d["kv_max"] - 1, "T": d["kv_max"]}]
    return [_profile("prefill", sym, prefill), _profile("decode", sym, decode)]


def vision_profiles(vision_inputs: dict[str, list], d: dict[str, int]) -> list[dict]:
    """One profile over the leading dimension N: Qwen3-VL's patches (a multiple of merge^2, one merged token .. the
    planned image), or InternVL's tiles (one tile .. the largest tiling; `tiles_opt`/`tiles_max` in `d`)."""
    if "pixel_values" in vision_inputs:
        points = [{"N": 1}, {"N": d["tiles_opt"]}, {"N": d["tiles_max"]}]
        sym = {name: ("N", *[int(x) for x in shape[1:]]) for name, shape in vision_inputs.items()}
        return [_profile("vision", sym, points)]
    per = d["merge"] ** 2
    points = [{"N": per}, {"N": d["image_opt"] * per}, {"N": d["image_max"] * per}]
    sym = {name: ("N", *[int(x) for x in shape[1:]]) for name, shape in vision_inputs.items()}
    return [_profile("vision", sym, points)]


def build_plan(plan, target, export_manifest: dict, image_processor: dict, vision_inputs: dict[str, list],
               graph_hashes: dict[str, str]) -> dict:
    """The whole build plan as JSON-able data, with `plan_hash` last (see the module docstring)."""
    decoder = export_manifest["runtime"]["decoder"]
    d = _dims(plan, image_processor, decoder)
    if "pixel_values" in vision_inputs:  # tiles: the plan's image and the largest tiling the capped processor makes
        from egm_edge.runtime.tiling import TilingConfig

        d = {**d, "tiles_opt": plan.image.tiles, "tiles_max": _max_tiles(TilingConfig.from_dict(image_processor))}
    spare = plan.usable_bytes - plan.total_bytes
    body = {
        "version": PLAN_VERSION,
        "target": target.name, "kind": target.kind, "compute_capability": target.compute_capability,
        "tensorrt_assumed": (target.software or {}).get("tensorrt"),
        "precision": plan.precision, "graph_dtype": export_manifest.get("graph_dtype", "float32"),
        "strongly_typed": True,
        "precision_source": "the graphs' Q/DQ nodes and tensor dtypes (STRONGLY_TYPED network; no builder precision flags)",
        "tokens": {k: v for k, v in d.items() if k not in ("merge", "num_deepstack", "tiles_opt", "tiles_max")} | {
            "think_budget": plan.think_budget, "budget_close": plan.close_tokens, "answer": plan.answer_tokens},
        "workspace_bytes": int(min(4 * GIB, max(256 * 1024**2, spare // 2))),
        "engines": {"vision": {"onnx": "vision.onnx", "profiles": vision_profiles(vision_inputs, d)},
                    "decoder": {"onnx": "decoder.onnx", "profiles": decoder_profiles(decoder, d)}},
        "graphs_sha256": dict(sorted(graph_hashes.items())),
        "notes": _notes(plan, export_manifest),
    }
    body["plan_hash"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return body


_GRAPH_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


def graph_dtype_for(target, precision: str | None = None) -> str:
    """The float dtype of the graphs a target's bundle is exported with (`export(..., graph_dtype=)`).

    float32 on CPU (ONNX Runtime's lowering). On GPUs and Jetsons a 16-bit one, as TensorRT Edge-LLM and
    TensorRT-LLM run the unquantized layers: the plan's own when it is one (recipe "full" plans fp16 or bf16),
    else bfloat16 where the target profile lists bf16 (its float32 exponent range: no fp16 overflow in
    activations), else float16 (Jetson Orin, SM 8.7, whose profile and Edge-LLM builds are fp16)."""
    if target.kind == "cpu":
        return "float32"
    if precision in _GRAPH_DTYPES:
        return _GRAPH_DTYPES[precision]
    return "bfloat16" if "bf16" in target.precisions else "float16"


def _notes(plan, export_manifest: dict) -> list[str]:
    """What the engines will do differently from what the planner assumed, said once in the plan."""
    notes = []
    dtype = export_manifest.get("graph_dtype", "float32")
    if dtype == "float32" and plan.unquantized_dtype != "fp32":
        notes.append(f"the graphs are float32: a strongly typed engine computes the unquantized layers in float32, not the "
                     f"planned {plan.unquantized_dtype}, so memory and latency exceed the plan; re-export with --graph-dtype "
                     "float16 or bfloat16 (the build from a model does)")
    return notes


def _cap_tiles(path: Path, tiles: int) -> dict:
    """Lower a tiling processor's max_patches so no image makes more tiles than the plan's (thumbnail included)."""
    from egm_edge.runtime.tiling import TilingConfig

    cfg = TilingConfig.from_json(path)
    d = json.loads(path.read_text())
    grid = tiles - 1 if cfg.use_thumbnail and tiles > 1 else tiles
    d["max_patches"] = max(cfg.min_patches, min(cfg.max_patches, grid))
    path.write_text(json.dumps(d, indent=2))
    return d


def _cap_image_size(path: Path, image_tokens: int) -> dict:
    """Lower the processor's max_pixels to the planned image (never below min_pixels); returns the written dict."""
    from egm_edge.runtime.preprocess import ImageProcessorConfig

    cfg = ImageProcessorConfig.from_json(path)
    d = json.loads(path.read_text())
    cap = image_tokens * (cfg.patch_size * cfg.merge_size) ** 2
    d["max_pixels"] = min(cfg.max_pixels, max(cap, cfg.min_pixels))
    d["min_pixels"] = cfg.min_pixels
    if isinstance(d.get("size"), dict):
        d["size"]["longest_edge"] = d["max_pixels"]
    path.write_text(json.dumps(d, indent=2))
    return d


def _graph_inputs(path: Path) -> dict[str, list]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    init = {t.name for t in m.graph.initializer}
    return {i.name: [d.dim_value if d.dim_value > 0 else d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in m.graph.input if i.name not in init}


def _copy_graph(export_dir: Path, tmp: Path, name: str, graph_entry: dict | None) -> list[str]:
    """Copy name.onnx and its external-data file as real files (a symlink would not survive a copy to the device)."""
    files = [f"{name}.onnx"] + ([graph_entry["external_data"]] if graph_entry and graph_entry.get("external_data") else [])
    for f in files:
        shutil.copyfile(export_dir / f, tmp / f, follow_symlinks=True)
    return files


# (preprocessor, positions) the GPU/Jetson bundle builds: Qwen3-VL's smart resize with M-RoPE, InternVL's tiles with
# 1-D RoPE (profiles over the tile count, max_patches capped to the plan).
TENSORRT_LAYOUTS = (("smart_resize", "mrope"), ("tiling", "rope1d"))


def check_tensorrt_family(family, what: str) -> None:
    """Refuse, in one sentence, a family whose GPU/Jetson bundle this builder cannot make yet."""
    family.require_layout(what, "the GPU and Jetson bundle builder", TENSORRT_LAYOUTS, " so far; build it for the cpu target")


def build_tensorrt(export_dir, out_dir, target, plan, *, budget_mode: str = "hard", max_answer_tokens: int | None = None,
                   force: bool = False, name: str | None = None, checkpoint_dir=None, kv_cache: str | None = None,
                   max_batch_size: int = 8, progress: Callable[[str], None] | None = None, extra_manifest: dict | None = None) -> Path:
    """Write a GPU/Jetson bundle for `target` from an export; returns `out_dir` (see the module docstring)."""
    from egm_edge.artifacts import check_output_dir, file_hashes, staged_output, write_manifest
    from egm_edge.builder.cpu import _read_export, export_family
    from egm_edge.builder.trt_contract import require_tensorrt_graphs
    from egm_edge.runtime.bundle import GenerationConfig

    say = progress or (lambda _m: None)
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    inputs = [export_dir, checkpoint_dir]
    check_output_dir(out_dir, force, inputs=inputs)  # before anything is read: --out may never clobber an input
    if target.kind not in ("gpu", "jetson"):
        raise UnsupportedError(f"Target {target.name} is a {target.kind} target; TensorRT bundles are for gpu and jetson targets.")
    em = _read_export(export_dir)
    family = export_family(export_dir, em)
    family.require("runtime", f"Export {export_dir}")
    check_tensorrt_family(family, f"Export {export_dir}")
    inputs.append((em.get("inputs") or {}).get("checkpoint"))  # the TensorRT-LLM config reads it
    exported = em.get("precision", "full")
    if (exported == "full") != (plan.precision in ("fp32", "fp16", "bf16")) or (exported != "full" and exported != plan.precision):
        raise UnsupportedError(f"Export {export_dir} holds {exported} weights but the plan is for {plan.precision}; "
                               "plan the precision the export was made with.")
    if exported == "auto":
        from egm_edge.targets import check_layer_formats

        check_layer_formats(target, (em.get("layer_formats") or {}).values(), f"Export {export_dir}")
    say(f"checking the graphs against TensorRT {target.software.get('tensorrt')}'s ONNX support and Q/DQ rules")
    contract = require_tensorrt_graphs(export_dir, target)
    t0 = time.perf_counter()
    with staged_output(out_dir, force=force, inputs=inputs) as tmp:
        files = []
        for graph in ("vision", "decoder"):
            files += _copy_graph(export_dir, tmp, graph, (em.get("graphs") or {}).get(graph))
        for f in SIDE_FILES:
            if (export_dir / f).is_file():
                shutil.copyfile(export_dir / f, tmp / f)
        if family.preprocessor == "tiling":
            proc = _cap_tiles(tmp / "preprocessor_config.json", plan.image.tiles)
        else:
            proc = _cap_image_size(tmp / "preprocessor_config.json", plan.image.image_tokens)
        bp = build_plan(plan, target, em, proc, _graph_inputs(tmp / "vision.onnx"), file_hashes(tmp, files))
        (tmp / "build_plan.json").write_text(json.dumps(bp, indent=2))
        gen = GenerationConfig.for_family(family, think_budget=plan.think_budget, budget_mode=budget_mode,
                               max_answer_tokens=max_answer_tokens or plan.answer_tokens + 80, max_seq_len=bp["tokens"]["kv_max"])
        (tmp / "generation_config.json").write_text(json.dumps(gen.to_dict(), indent=2))
        trtllm = None
        if (target.software or {}).get("tensorrt_llm"):
            from egm_edge.builder.trtllm import write_trtllm

            ckpt = Path(checkpoint_dir or (em.get("inputs") or {}).get("checkpoint") or export_dir)
            say(f"writing the TensorRT-LLM {target.software['tensorrt_llm']} serving config")
            trtllm = write_trtllm(tmp / "trtllm", ckpt, plan, target, kv_cache=kv_cache, max_batch_size=max_batch_size)
        sizes = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        write_manifest(
            tmp, "build", target=target.name, kind=target.kind, name=name or out_dir.name,
            precision=em.get("precision", "full"), executor="tensorrt",
            inputs={"export": str(export_dir.resolve()),
                    "export_manifest_sha256": file_hashes(export_dir, ["manifest.json"])["manifest.json"],
                    "checkpoint": (em.get("inputs") or {}).get("checkpoint")},
            runtime=em["runtime"], source_validation=em.get("validation"),
            plan=plan.to_dict(), build_plan={"file": "build_plan.json", "plan_hash": bp["plan_hash"],
                                             "tensorrt_assumed": bp["tensorrt_assumed"]},
            tensorrt_contract=contract, trtllm=trtllm,
            engines="not compiled yet: run `egm-edge build --finalize BUNDLE` on the device",
            sizes_bytes=sizes, outputs={"sha256": file_hashes(tmp, sorted(sizes))},
            timings_s={"total": round(time.perf_counter() - t0, 3)}, **(extra_manifest or {}),
        )
    say(f"wrote {out_dir}; compile its engines on the device with `egm-edge build --finalize {out_dir}`")
    return out_dir


# ---- on the device ------------------------------------------------------------------------------------


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise UnsupportedError(
            "TensorRT is not importable here; run `egm-edge build --finalize` on the target device with TensorRT installed "
            "(`pip install egm-edge[trt]`, or JetPack's python3-libnvinfer on a Jetson)."
        ) from None
    return trt


def compile_engine(trt, onnx_path: Path, profiles: list[dict], workspace_bytes: int, logger=None) -> bytes:
    """One serialized engine: STRONGLY_TYPED network parsed from ONNX, one optimisation profile per entry."""
    logger = logger or trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external weight files beside the graph
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EgmError(f"TensorRT could not parse {onnx_path.name} ({errors}); the graph contract check missed this, please report it.")
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name, s in prof["shapes"].items():
            if name in names:
                p.set_shape(name, tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
        config.add_optimization_profile(p)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EgmError(f"TensorRT failed to build an engine from {onnx_path.name}; its log above says why.")
    return bytes(serialized)


def finalize(bundle_dir, *, force: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    """Compile (or reuse) this device's engines for a GPU/Jetson bundle; returns engines/<key>/."""
    from egm_edge.artifacts import read_manifest
    from egm_edge.runtime.trt_executor import ENGINE_FILES, current_device, engine_key

    say = progress or (lambda _m: None)
    bundle_dir = Path(bundle_dir)
    m = read_manifest(bundle_dir)
    if m is None or m.get("stage") != "build":
        raise CheckpointError(f"{bundle_dir} is not a finished bundle (no build manifest.json); build one with `egm-edge build`.")
    if m.get("executor") != "tensorrt" or not (bundle_dir / "build_plan.json").is_file():
        raise UnsupportedError(f"Bundle {bundle_dir} targets {m.get('target')!r} and has no TensorRT build plan; only gpu and jetson bundles are finalized.")
    bp = json.loads((bundle_dir / "build_plan.json").read_text())
    trt = _import_tensorrt()
    dev = current_device()
    if dev.compute_capability != bp["compute_capability"]:
        raise UnsupportedError(
            f"Bundle {bundle_dir} was planned for {bp['target']} (SM {bp['compute_capability']}) but this GPU is {dev.name} "
            f"(SM {dev.compute_capability}); build a bundle for this device's target instead."
        )
    key = engine_key(dev, trt.__version__, bp["plan_hash"])
    final = bundle_dir / "engines" / key
    if not force and all((final / f).is_file() for f in ENGINE_FILES):
        say(f"reusing the engines in {final}")
        return final
    from egm_edge.artifacts import remove_stale_partials

    remove_stale_partials(final)  # engines half-compiled by a run that was killed
    staging = bundle_dir / "engines" / f".{key}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    timings = {}
    try:
        for graph in ("vision", "decoder"):
            say(f"compiling {graph}.onnx with TensorRT {trt.__version__} on {dev.name} (this takes minutes)")
            t = time.perf_counter()
            spec = bp["engines"][graph]
            (staging / f"{graph}.engine").write_bytes(compile_engine(trt, bundle_dir / spec["onnx"], spec["profiles"], bp["workspace_bytes"]))
            timings[graph] = round(time.perf_counter() - t, 1)
        (staging / "engine.json").write_text(json.dumps({
            "key": key, "device": dev.name, "compute_capability": dev.compute_capability, "tensorrt": trt.__version__,
            "tensorrt_assumed": bp.get("tensorrt_assumed"), "plan_hash": bp["plan_hash"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "build_s": timings,
            "bytes": {p.name: p.stat().st_size for p in staging.glob("*.engine")}}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"wrote {final}")
    return final
