"""`build_cpu`: the ONNX IR of an export, optimised for ONNX Runtime's CPU provider, as a bundle.

Steps: check the export (manifest, stage, graphs); let ONNX Runtime apply its
graph optimisations and save the optimised graphs (weights kept in external
data files where the export had them); copy the tokenizer and the image
processor config (Qwen3-VL's, or InternVL's GotOcr2 tiling, whose TilingConfig the manifest's
runtime.vision carries for the runtime); write the bundle's generation config (the family, its stop
tokens and think tags from the family's record, default budget, caps); prove the
bundle loads and grounds one image; only then write manifest.json and rename the
directory into place. The family is the export manifest's (older exports: the
architecture it records); its record must run the runtime stage.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from egm_edge.errors import CheckpointError

# EXTENDED fuses for the CPU provider (attention, layer norm, MatMulNBits paths) but stays free
# of the hardware-specific layouts of ALL, so the saved graph runs on any x86-64 or Arm CPU.
_SIDE_FILES = ("tokenizer.json", "preprocessor_config.json")


def _read_export(export_dir: Path) -> dict:
    from egm_edge.artifacts import read_manifest

    if not export_dir.is_dir():
        raise CheckpointError(f"Export directory {export_dir} does not exist; run `egm-edge export` first.")
    m = read_manifest(export_dir)
    if m is None:
        raise CheckpointError(f"{export_dir} has no manifest.json, so it is not a finished export; run `egm-edge export` again.")
    if m.get("stage") != "export":
        raise CheckpointError(f"{export_dir} holds a {m.get('stage')!r} artifact; `build` takes the output of `egm-edge export`.")
    for name in ("vision.onnx", "decoder.onnx", *_SIDE_FILES):
        if not (export_dir / name).is_file():
            raise CheckpointError(f"Export {export_dir} is missing {name}; run `egm-edge export` again.")
    return m


def export_family(export_dir: Path, manifest: dict):
    """The family record of an export: the family its manifest names, else (older exports) its architecture's."""
    from egm_edge.models.families import family_of_config, get_family

    if manifest.get("family"):
        return get_family(manifest["family"])
    arch = manifest.get("architecture")
    return family_of_config({"architectures": [arch]} if arch else {}, f"the manifest of export {export_dir}")


def optimize_graph(src: Path, dst: Path, external: bool, disabled_optimizers=()) -> None:
    """Run ONNX Runtime's offline optimiser on `src` and save the result at `dst`.

    `disabled_optimizers` (from the export manifest) keeps transformers off that would
    change the graph's numerics (e.g. Q/DQ fusion of FP8 graphs).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    if external:
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled_optimizers))


def _nbits_dense(packed, scales, k: int, n: int, block: int, bits: int):
    """float32 [k, n] from a MatMulNBits weight (uint8 [n, k/block, block*bits/8], symmetric: zero point 2^(bits-1))."""
    import numpy as np

    if bits == 8:
        u = packed.reshape(n, k).astype(np.float32) - 128
    else:
        u = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, k).astype(np.float32) - 8
    return (u * np.repeat(scales.reshape(n, -1).astype(np.float32), block, axis=1)).T


def dynamic_int8_graph(src: Path, dst: Path, external: bool, include_nbits: bool = False) -> int:
    """`src` with every Linear on a constant weight as ONNX Runtime's DynamicQuantizeMatMul (weights int8
    symmetric per output column, activations quantized per call); returns how many. Float Linears come as
    Gemm(x, W[out, in], bias, transB=1) or MatMul(x, W[in, out]); with `include_nbits` the MatMulNBits of
    int4/int8 layers (no zero points) are re-quantized too. Weights shared with another node (a tied
    embedding) stay as they are. On AVX-512 VNNI CPUs these kernels run large GEMMs ~2.5x faster than
    float32 MatMul and ~2.7x faster than MatMulNBits (benchmarks/egm2b_cpu.py), so they pay where many rows
    are multiplied at once: the vision tower and the prompt prefill."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    users: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    nodes, count = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        gemm = node.op_type == "Gemm" and attrs.get("transB") == 1 and not attrs.get("transA") \
            and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        nbits = include_nbits and node.op_type == "MatMulNBits" and len(node.input) == 3
        w = inits.get(node.input[1]) if (node.op_type == "MatMul" and len(node.input) == 2) or gemm or nbits else None
        if w is None or users[w.name] != 1 or (not nbits and (len(w.dims) != 2 or w.data_type != onnx.TensorProto.FLOAT)):
            nodes.append(node)
            continue
        if nbits:
            arr = _nbits_dense(numpy_helper.to_array(w), numpy_helper.to_array(inits[node.input[2]]), attrs["K"], attrs["N"],
                               attrs["block_size"], attrs["bits"])
            model.graph.initializer.remove(inits[node.input[2]])
        else:
            arr = numpy_helper.to_array(w)
            arr = arr.T if gemm else arr  # [in, out]
        scale = np.maximum(np.abs(arr).max(axis=0), 1e-12).astype(np.float32) / 127.0
        q = np.clip(np.round(arr / scale), -127, 127).astype(np.int8)
        model.graph.initializer.remove(w)
        model.graph.initializer.extend([numpy_helper.from_array(q, w.name + "_int8"), numpy_helper.from_array(scale, w.name + "_scale")])
        bias = [node.input[2]] if gemm and len(node.input) > 2 and node.input[2] else []
        inputs = [node.input[0], w.name + "_int8", w.name + "_scale"] + (["", *bias] if bias else [])
        nodes.append(helper.make_node("DynamicQuantizeMatMul", inputs, list(node.output),
                                      name=(node.name or w.name) + "_int8", domain="com.microsoft"))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst), save_as_external_data=external, location=dst.name + ".data" if external else None)
    return count


def _optimized_int8(src: Path, out: Path, name: str, external: bool, disabled, include_nbits: bool = False) -> int:
    """`dynamic_int8_graph(src)` optimised into out/name (via a scratch folder removed at once); returns the count."""
    scratch = out / f".{name}.int8"
    scratch.mkdir()
    try:
        n = dynamic_int8_graph(src, scratch / name, external, include_nbits=include_nbits)
        optimize_graph(scratch / name, out / name, external, disabled)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return n


def prefill_fidelity(decoder: Path, prefill: Path, dcfg: dict, tokens: int = 24) -> dict:
    """Logit cosine and top-1 agreement of the prefill graph against the decoder graph on a random text prompt."""
    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    ids = rng.integers(0, dcfg["vocab_size"], size=(1, tokens)).astype(np.int64)
    d, kv = dcfg["hidden_size"], (1, dcfg["num_kv_heads"], 0, dcfg["head_dim"])
    feeds = {"input_ids": ids, "image_features": np.zeros((0, d), np.float32),
             "deepstack_features": np.zeros((dcfg["num_deepstack"], 0, d), np.float32),
             "position_ids": np.broadcast_to(np.arange(tokens), (3, 1, tokens)).astype(np.int64).copy(),
             "attention_mask": np.ones((1, tokens), np.int64), "logits_index": np.arange(tokens)[None].astype(np.int64)}
    feeds.update({f"past_key_values.{i}.{k}": np.zeros(kv, np.float32) for i in range(dcfg["num_layers"]) for k in ("key", "value")})
    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0][0] for p in (decoder, prefill)]
    a, b = (o.astype(np.float64) for o in outs)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)
    return {"logits_cosine_min": round(float(cos.min()), 6), "top1_agreement": round(float((a.argmax(-1) == b.argmax(-1)).mean()), 4),
            "tokens": tokens}


def vision_fidelity(reference: Path, candidate: Path, vision_config: dict, family=None) -> dict:
    """Cosine and relative max error of `candidate`'s vision outputs against `reference`'s on the smoke image
    (`vision_config`: the export manifest's runtime.vision; `family`'s preprocessor says how to read it,
    Qwen3-VL's patches by default)."""
    import numpy as np
    import onnxruntime as ort

    if family is not None and family.preprocessor == "tiling":
        from egm_edge.runtime.tiling import TilingConfig, tile_image

        feeds = {"pixel_values": tile_image(_smoke_image(), TilingConfig.from_dict(vision_config))}
    else:
        from egm_edge.runtime.preprocess import ImageProcessorConfig, preprocess_image
        from egm_edge.runtime.vision_inputs import VisionGridConfig, vision_grid_inputs

        prep = preprocess_image(_smoke_image(), ImageProcessorConfig.from_json(reference.parent / "preprocessor_config.json"))
        grid = vision_grid_inputs([prep.grid_thw], VisionGridConfig.from_dict(vision_config))
        feeds = {"pixel_patches": prep.pixel_values.astype(np.float32), **grid}
    outs = []
    for path in (reference, candidate):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        outs.append(sess.run(["image_features"], {k: v for k, v in feeds.items() if k in names})[0].ravel().astype(np.float64))
    a, b = outs
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    return {"image_features_cosine": round(cos, 6), "max_abs_err_rel": round(float(np.abs(a - b).max() / (np.abs(a).max() + 1e-30)), 6)}


def _smoke_image():
    """A small image with two shapes, enough to drive one full grounding."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (320, 240), (235, 235, 235))
    d = ImageDraw.Draw(img)
    d.rectangle((40, 60, 120, 140), fill=(220, 30, 30))
    d.ellipse((180, 80, 270, 170), fill=(30, 60, 220))
    return img


def build_cpu(export_dir, out_dir, *, think_budget: int | str | None = None, budget_mode: str = "hard",
              max_answer_tokens: int = 128, max_seq_len: int = 4096, force: bool = False,
              name: str | None = None, vision_int8: bool = False, prefill_int8: bool = False, progress: Callable[[str], None] | None = None,
              extra_manifest: dict | None = None) -> Path:
    """Build a CPU bundle from an export directory; returns `out_dir`.

    `vision_int8` runs the vision tower in dynamic int8 (`dynamic_int8_graph`): faster image encoding,
    a small accuracy change of its own, measured against the float32 tower and recorded in the manifest.
    `prefill_int8` adds prefill.onnx: the decoder with every Linear in dynamic int8, which the runtime uses
    for prompts (many tokens at once) while decode steps keep decoder.onnx; it costs an int8 copy of the
    language model's weights (and of the embedding table), and its logit agreement with decoder.onnx is
    recorded in the manifest."""
    from egm_edge.artifacts import check_output_dir, file_hashes, staged_output, write_manifest
    from egm_edge.runtime.bundle import GenerationConfig
    from egm_edge.runtime.settings import DecodeSettings, budget_to_json

    say = progress or (lambda _m: None)
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    check_output_dir(out_dir, force, inputs=[export_dir])  # before anything is read: --out may never clobber the export
    em = _read_export(export_dir)
    family = export_family(export_dir, em)
    family.require("runtime", f"Export {export_dir}")
    if em.get("precision") == "auto":
        from egm_edge.targets import check_layer_formats, load_target

        check_layer_formats(load_target("cpu"), (em.get("layer_formats") or {}).values(), f"Export {export_dir}")
    # Validated before any work; a budget not given is the built-in one, unlimited (up to max_seq_len).
    defaults = DecodeSettings(think_budget, budget_mode, max_answer_tokens).resolved()
    gen = GenerationConfig.for_family(family, think_budget=budget_to_json(defaults.think_budget),
                           budget_mode=defaults.budget_mode, max_answer_tokens=defaults.max_answer_tokens, max_seq_len=max_seq_len)
    t0 = time.perf_counter()
    timings = {}
    ort_settings = em.get("onnxruntime") or {}
    disabled = tuple(ort_settings.get("disabled_optimizers") or ())
    with staged_output(out_dir, force=force, inputs=[export_dir]) as tmp:
        for graph in ("vision", "decoder"):
            external = bool((em.get("graphs", {}).get(graph) or {}).get("external_data"))
            say(f"optimising {graph}.onnx for ONNX Runtime (CPU)")
            t = time.perf_counter()
            if graph == "vision" and vision_int8:
                say("quantizing the vision tower to dynamic int8")
                _optimized_int8(export_dir / "vision.onnx", tmp, "vision.onnx", external, disabled)
            else:
                optimize_graph(export_dir / f"{graph}.onnx", tmp / f"{graph}.onnx", external, disabled)
            timings[f"optimize_{graph}"] = round(time.perf_counter() - t, 3)
        vision = {"precision": "float32"}
        if vision_int8:
            vision = {"precision": "int8-dynamic",
                      "fidelity_vs_float32": vision_fidelity(export_dir / "vision.onnx", tmp / "vision.onnx", em["runtime"]["vision"],
                                                            family)}
            say(f"int8 vision tower vs float32: {vision['fidelity_vs_float32']}")
        prefill = None
        if prefill_int8:
            say("writing prefill.onnx: the decoder with dynamic int8 Linear layers, for prompts")
            t = time.perf_counter()
            external = bool((em.get("graphs", {}).get("decoder") or {}).get("external_data"))
            n = _optimized_int8(export_dir / "decoder.onnx", tmp, "prefill.onnx", external, disabled, include_nbits=True)
            prefill = {"precision": "int8-dynamic", "int8_layers": n,
                       "fidelity_vs_decoder": prefill_fidelity(tmp / "decoder.onnx", tmp / "prefill.onnx", em["runtime"]["decoder"])}
            timings["prefill_graph"] = round(time.perf_counter() - t, 3)
            say(f"int8 prefill vs decoder: {prefill['fidelity_vs_decoder']}")
        for f in _SIDE_FILES:
            shutil.copyfile(export_dir / f, tmp / f)
        for f in ("config.json", "chat_template.jinja", "tokenizer_config.json"):
            if (export_dir / f).is_file():
                shutil.copyfile(export_dir / f, tmp / f)
        import json

        (tmp / "generation_config.json").write_text(json.dumps(gen.to_dict(), indent=2))
        manifest = dict(
            target="cpu",
            family=family.name,
            name=name or out_dir.name,
            precision=em.get("precision", "full"),
            executor="onnxruntime",
            inputs={"export": str(export_dir.resolve()), "export_manifest_sha256": file_hashes(export_dir, ["manifest.json"])["manifest.json"],
                    "checkpoint": (em.get("inputs") or {}).get("checkpoint")},
            runtime=em["runtime"],
            onnxruntime=ort_settings,
            source_validation=em.get("validation"),
            vision=vision,
            **({"prefill": prefill} if prefill else {}),
            **(extra_manifest or {}),
        )
        # The smoke test needs a manifest to open the bundle; the final one (with figures) replaces it.
        write_manifest(tmp, "build", **manifest)
        say("checking that the bundle loads and grounds one image")
        t = time.perf_counter()
        smoke = _smoke_test(tmp)
        timings["smoke_test"] = round(time.perf_counter() - t, 3)
        timings["total"] = round(time.perf_counter() - t0, 3)
        sizes = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file() and p.name != "manifest.json"}
        write_manifest(tmp, "build", **manifest, smoke_test=smoke, sizes_bytes=sizes,
                       outputs={"sha256": file_hashes(tmp, [n for n in sizes])}, timings_s=timings)
    say(f"wrote {out_dir}")
    return out_dir


def _smoke_test(bundle_dir: Path) -> dict:
    from egm_edge.errors import EgmError
    from egm_edge.runtime.grounder import Grounder

    try:
        g = Grounder.open(bundle_dir)
        r = g.ground(_smoke_image(), "the red square", think_budget=8, max_answer_tokens=32)
    except EgmError:
        raise
    except Exception as e:  # a bundle that cannot run is a failed build, with the reason
        raise EgmError(f"The built bundle failed its smoke test ({type(e).__name__}: {e}); nothing was written.") from e
    return {"think_tokens": r.think_tokens, "answer_tokens": r.answer_tokens, "box": r.to_dict()["box"],
            "total_ms": r.timings.get("total")}
