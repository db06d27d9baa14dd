"""`export(checkpoint_dir, out_dir)`: the export stage, from a checkpoint to the ONNX IR directory.

The checkpoint's family record says whether export runs it (`require("export")`), which
transformers class is the reference (`hf_class`), which module builds the graphs
(`graphs`: VisionGraph, DecoderGraph and their export specs and IO names) and what the
host drives (`preprocessor`, `positions`): Qwen3-VL's patches + grid tensors with M-RoPE, or
InternVL's tiles (`pixel_values`) with 1-D RoPE; the manifest's runtime.vision is then a
`VisionGridConfig` or a `TilingConfig` (egm_edge.runtime.tiling) as a dict.

Output directory (written in a temporary sibling and renamed into place; the
manifest is written last, so a directory without one is not an export):

    vision.onnx [+ vision.onnx.data]    see egm_edge.export.graphs for every input/output
    decoder.onnx [+ decoder.onnx.data]  weights in one external file when above EXTERNAL_DATA_THRESHOLD
    config.json, tokenizer*, preprocessor_config.json, generation_config.json, chat_template.jinja
    manifest.json   stage "export": family, architecture, inputs (sha256), precision, opset, versions, timings,
                    runtime (decoder / vision configs the host needs), graphs, validation figures; for a per-layer
                    mixed checkpoint (recipe auto) also layer_formats and lowered_as, the precision whose
                    threshold it was validated against (its loosest layer's, `CheckpointInfo.lowered_as`)

The graphs are checked against the PyTorch reference before the rename
(egm_edge.export.validate); a miss raises EgmError and leaves nothing behind.
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from egm_edge.errors import CheckpointError, UnsupportedError

MANIFEST_VERSION = 1
_BYTES_PER_DTYPE = {"float32": 4, "float16": 2, "bfloat16": 2}


def _fp32_estimate(info) -> int:
    dtype = str(info.config.get("dtype") or info.config.get("torch_dtype") or info.text.get("dtype") or "bfloat16")
    return info.weight_bytes * 4 // _BYTES_PER_DTYPE.get(dtype, 2)


def export(checkpoint_dir: str | Path, out_dir: str | Path, *, lowering: str = "onnxruntime", int4_accuracy_level: int = 0,
           lm_head: str = "float", force: bool = False, decode_steps: int = 4, seed: int = 0, graph_dtype: str = "float32",
           progress: Callable[[str], None] | None = None) -> Path:
    """Export a checkpoint to `out_dir` (vision.onnx, decoder.onnx, manifest.json); returns `out_dir`.

    `lowering` is the engine the graphs are for: "onnxruntime" (INT4 as MatMulNBits, CPU bundles) or "tensorrt"
    (blocked INT4 DequantizeLinear + MatMul); other precisions lower the same way for both.
    `int4_accuracy_level` 4 lets MatMulNBits compute in int8 (faster on CPU, looser validation threshold).
    `lm_head` "int8" or "int4" (optionally ":BLOCK", default 128 / 32) stores the lm_head weight-only round-to-nearest as MatMulNBits ("onnxruntime"
    lowering only): far fewer bytes read per decoded token, a (small) accuracy change of its own; the
    validation reference then uses the same rounded lm_head, so it still checks the export itself.
    `force` replaces an existing artifact at `out_dir` (never a folder of other files, never the checkpoint); `decode_steps` and `seed` shape the validation run.
    `graph_dtype` is the float dtype of every unquantized weight and activation in the graphs: "float32" (the only
    one of the "onnxruntime" lowering), or "float16" / "bfloat16" for "tensorrt", whose strongly typed engines compute
    in the graphs' dtypes (the build picks it from the target: `egm_edge.builder.tensorrt.graph_dtype_for`). 16-bit
    graphs are validated against the float32 PyTorch model (egm_edge.export.validate, thresholds per graph dtype);
    bfloat16 ones, which ONNX Runtime cannot run on CPU, through their float32 twin (`_validate`).
    """
    from egm_edge.artifacts import check_output_dir, staged_output
    from egm_edge.export.checkpoint import SIDE_FILES, host_configs, inspect_checkpoint, load_reference
    from egm_edge.export.onnx_io import OPSET, check_disk_space, check_environment

    say = progress or (lambda _msg: None)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force, inputs=[checkpoint_dir])  # before anything is read: --out may never clobber the checkpoint
    info = inspect_checkpoint(checkpoint_dir)
    from egm_edge.export.validate import THRESHOLDS

    from egm_edge.export.lowering import GRAPH_DTYPES, INT4_ACCURACY_LEVELS, LOWERINGS, parse_lm_head

    backend = lowering
    if backend not in LOWERINGS:
        raise UnsupportedError(f"Unknown export lowering {backend!r}. Choose from: {', '.join(LOWERINGS)}.")
    if int4_accuracy_level not in INT4_ACCURACY_LEVELS:
        raise UnsupportedError(f"int4_accuracy_level={int4_accuracy_level!r} is not one MatMulNBits offers here; choose 0 (fp32 compute) or 4 (int8 compute).")
    parse_lm_head(lm_head)  # one sentence for an unknown mode or block, before anything loads
    if lm_head != "float" and backend != "onnxruntime":
        raise UnsupportedError(f"--lm-head {lm_head} lowers to MatMulNBits, an ONNX Runtime op; TensorRT exports keep a float lm_head.")
    if graph_dtype not in GRAPH_DTYPES:
        raise UnsupportedError(f"Unknown graph dtype {graph_dtype!r}. Choose from: {', '.join(GRAPH_DTYPES)}.")
    if graph_dtype != "float32" and backend != "tensorrt":
        raise UnsupportedError(f"The {backend} lowering writes float32 graphs (CPU bundles); {graph_dtype} graphs are for TensorRT: "
                               "pass --lowering tensorrt or drop --graph-dtype.")
    if info.lowered_as not in THRESHOLDS:
        raise UnsupportedError(f"Checkpoint {info.path} is {info.precision}, which export cannot lower for ONNX Runtime; "
                               f"export one of: {', '.join(dict.fromkeys(k.split('/')[0] for k in THRESHOLDS))}.")
    if info.precision == "auto" and backend == "onnxruntime" and {"fp8", "int8_sq"} <= set(info.layer_formats.values()):
        raise UnsupportedError(f"Checkpoint {info.path} mixes FP8 and INT8 layers, which only the TensorRT lowering runs together; "
                               "export it with --lowering tensorrt, or re-quantize with --recipe auto --target cpu.")
    versions = check_environment(OPSET)
    check_disk_space(out_dir.parent, _fp32_estimate(info))
    with staged_output(out_dir, force=force, inputs=[info.path]) as tmp:
        say(f"loading {info.path} ({info.precision})")
        t = time.perf_counter()
        model = load_reference(info)
        timings["load"] = time.perf_counter() - t
        vcfg, dcfg = host_configs(model, info)
        dcfg["cache_dtype"] = graph_dtype
        refs = None
        if graph_dtype != "float32":
            from egm_edge.export.lowering import cast_parameters
            from egm_edge.export.validate import reference_outputs

            # The reference is the float32 model (what the engine should compute), so it runs before the cast.
            t = time.perf_counter()
            refs = reference_outputs(model, info.path, vcfg, dcfg, steps=decode_steps, seed=seed, family=info.family)
            timings["reference"] = time.perf_counter() - t
            cast_parameters(model, GRAPH_DTYPES[graph_dtype])
        graphs, layers = _export_graphs(model, info, vcfg, dcfg, tmp, timings, say, backend, int4_accuracy_level, lm_head, graph_dtype)
        for name in SIDE_FILES:
            if (info.path / name).is_file():
                shutil.copyfile(info.path / name, tmp / name)
        if info.record.preprocessor == "tiling" and not (tmp / "preprocessor_config.json").is_file():
            import json  # the tiling the runtime runs, as a GotOcr2 preprocessor_config.json (from_dict round-trips it)

            (tmp / "preprocessor_config.json").write_text(json.dumps(vcfg.to_dict(), indent=2) + "\n")
        say("validating ONNX Runtime against PyTorch")
        from egm_edge.export.validate import reference_outputs

        t = time.perf_counter()
        if refs is None:
            refs = reference_outputs(model, info.path, vcfg, dcfg, steps=decode_steps, seed=seed, family=info.family)
        # The reference's weights go before ONNX Runtime loads its own copy: one model in memory at a time.
        del model
        gc.collect()
        report = {**_validate(info, tmp, refs, vcfg, dcfg, backend, int4_accuracy_level, lm_head, graph_dtype, say), "seed": seed}
        timings["validate"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t_start
        _write_manifest(info, tmp, graphs, layers, backend, int4_accuracy_level, lm_head, vcfg, dcfg, versions, timings, report, OPSET,
                        graph_dtype)
    say(f"wrote {out_dir}")
    return out_dir


def _validate(info, out: Path, refs: list, vcfg, dcfg: dict, backend: str, accuracy_level: int, lm_head: str, graph_dtype: str,
              say) -> dict:
    """The validation report of the graphs in `out` (raises EgmError on a miss).

    float32 and float16 graphs run in ONNX Runtime on CPU. bfloat16 ones are tried; where ONNX Runtime cannot run
    them (few CPU kernels take bfloat16) the report says so under "graphs" and validates instead their float32 twin,
    exported by the same code path into a scratch folder, so the graph structure and the lowering are still checked."""
    from egm_edge.export.checkpoint import load_reference
    from egm_edge.export.validate import CpuCannotRun, compare_with_onnxruntime, validation_key

    from egm_edge.export.validate import THRESHOLDS

    check = validation_key(info.lowered_as, backend, accuracy_level, lm_head, graph_dtype)
    if check in THRESHOLDS or graph_dtype == "float32":
        try:
            return {"graph_dtype": graph_dtype, "validated_graph_dtype": graph_dtype,
                    **compare_with_onnxruntime(out, refs, vcfg, dcfg, check, backend, float64_model=lambda: load_reference(info))}
        except CpuCannotRun as e:
            if graph_dtype == "float32":
                raise
            reason = str(e)
    else:
        reason = f"no threshold is measured for {check} graphs yet"
    import tempfile

    say(f"ONNX Runtime cannot run the {graph_dtype} graphs on CPU ({reason}); validating their float32 twin")
    with tempfile.TemporaryDirectory(prefix=".twin-", dir=out.parent) as twin:
        model = load_reference(info)
        twin_dcfg = {**dcfg, "cache_dtype": "float32"}
        _export_graphs(model, info, vcfg, twin_dcfg, Path(twin), {}, say, backend, accuracy_level, lm_head, "float32")
        del model
        gc.collect()
        check32 = validation_key(info.lowered_as, backend, accuracy_level, lm_head, "float32")
        report = compare_with_onnxruntime(Path(twin), refs, vcfg, twin_dcfg, check32, backend, float64_model=lambda: load_reference(info))
    return {"graph_dtype": graph_dtype, "graphs": f"not run on CPU: {reason}", "validated_graph_dtype": "float32",
            "validated": "the float32 twin of these graphs (same export code path, float32 weights and activations)", **report}


def _export_graphs(model, info, vcfg, dcfg: dict, tmp: Path, timings: dict, say, backend: str, accuracy_level: int,
                   lm_head: str = "float", graph_dtype: str = "float32") -> tuple[dict, dict]:
    """Export both graphs (quantized Linears lowered while exporting); returns (graphs, lowered-layer counts).
    A quantized `lm_head` also replaces the model's own lm_head (untied) by its rounded float equivalent,
    so the validation that follows compares like with like. `model`'s parameters are already in `graph_dtype`
    (`lowering.cast_parameters`); the lowered layers' scales and the trace samples are cast here."""
    g = info.record.code("graphs")  # the family's graph builders
    from egm_edge.export.onnx_io import check_disk_space, export_graph, weight_bytes

    replacements, translations, layers, post = {}, None, {}, None
    if info.precision != "full":
        from egm_edge.export import lowering as low

        replacements = low.quantized_linears(info.path, model, backend)
        if not replacements:
            raise CheckpointError(f"Checkpoint {info.path} says {info.precision} but holds no quantized Linear weights; re-run egm-edge quantize.")
        translations, layers, post = low.translation_table(accuracy_level), low.summary(replacements), low.pack_int4_weights
        say(f"lowering {sum(layers.values())} quantized Linear layers for {backend}: {layers}")
        if graph_dtype != "float32":
            low.cast_quantized(replacements, low.GRAPH_DTYPES[graph_dtype])
    if lm_head != "float":
        from egm_edge.export import lowering as low

        head = low.rtn_linear(model.lm_head, lm_head)
        model.lm_head = low.dequantized_linear(head)
        replacements = {**replacements, "lm_head": head}
        translations, post = low.translation_table(accuracy_level), low.pack_int4_weights
        layers = {**layers, f"lm_head {lm_head}/MatMulNBits weight-only": 1}
        say(f"lm_head: {lm_head} weight-only round-to-nearest (block {low.parse_lm_head(lm_head)[2]})")
    from egm_edge.runtime.bundle import KV_CACHE_GROWING, KV_CACHE_IN_PLACE

    fused = backend == "onnxruntime"
    dcfg["kv_cache"] = KV_CACHE_IN_PLACE if fused else KV_CACHE_GROWING
    if fused:
        from egm_edge.export.fused import rope_table_positions, translation_table

        translations = {**(translations or {}), **translation_table()}
        text_cfg = model.model.language_model.config
        dcfg["rope_positions"] = rope_table_positions(getattr(text_cfg, "max_position_embeddings", None))
    graphs = {}
    with _swapped(model, replacements):
        for name, build, spec, io in (
            ("vision", lambda: g.VisionGraph(model), lambda: g.vision_export_spec(vcfg), g.vision_io_names()),
            ("decoder", lambda: g.DecoderGraph(model, dcfg["image_token_id"], fused_attention=fused), lambda: g.decoder_export_spec(dcfg),
             g.decoder_io_names(dcfg["num_layers"])),
        ):
            module = build().eval()
            size = weight_bytes(module)
            check_disk_space(tmp, size)
            say(f"exporting {name}.onnx ({size / 1e6:.1f} MB of weights)")
            t = time.perf_counter()
            args, shapes, dims = spec()
            if graph_dtype != "float32":  # float inputs (pixels, features, KV cache) in the graph's dtype, ids stay int64
                import torch

                args = tuple(a.to(getattr(torch, graph_dtype)) if a.is_floating_point() else a for a in args)
            files = export_graph(module, args, tmp / f"{name}.onnx", io[0], io[1], shapes, dims, size,
                                 translations=translations, postprocess=post)
            if fused and name == "decoder":
                from egm_edge.export.fused import drop_unused_norm_statistics

                drop_unused_norm_statistics(tmp / files[0])
            timings[f"export_{name}"] = time.perf_counter() - t
            graphs[name] = {"file": files[0], "external_data": files[1] if len(files) > 1 else None,
                            "bytes": sum((tmp / f).stat().st_size for f in files), "inputs": io[0], "outputs": io[1]}
    return graphs, layers


def _swapped(model, replacements: dict):
    if not replacements:
        import contextlib

        return contextlib.nullcontext(model)
    from egm_edge.export.lowering import swapped

    return swapped(model, replacements)


def _write_manifest(info, out: Path, graphs: dict, layers: dict, backend: str, int4_accuracy_level: int, lm_head: str, vcfg, dcfg: dict,
                    versions: dict, timings: dict, report: dict, opset: int, graph_dtype: str = "float32") -> dict:
    from egm_edge.artifacts import file_hashes, package_versions, write_manifest
    from egm_edge.export.validate import disabled_optimizers

    inputs = file_hashes(info.path, [n for n in sorted(os.listdir(info.path)) if n != "manifest.json"])
    return write_manifest(
        out,
        "export",
        manifest_version=MANIFEST_VERSION,
        family=info.family,
        architecture=info.architecture,
        precision=info.precision,
        **({"layer_formats": info.layer_formats, "lowered_as": info.lowered_as} if info.precision == "auto" else {}),
        graph_dtype=graph_dtype,
        opset=opset,
        inputs={"checkpoint": str(info.path.resolve()), "sha256": inputs},
        outputs={"sha256": file_hashes(out)},
        graphs=graphs,
        lowering=backend,
        lowered_layers=layers,
        int4_accuracy_level=int4_accuracy_level if layers and backend == "onnxruntime" else None,
        lm_head=lm_head,
        onnxruntime={"disabled_optimizers": list(disabled_optimizers(info.lowered_as, backend))},
        runtime={"decoder": dcfg, "vision": vcfg.to_dict()},
        versions={**package_versions(), **versions},
        timings_s={k: round(v, 3) for k, v in timings.items()},
        validation=report,
    )
