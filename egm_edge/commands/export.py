"""`egm-edge export`: a Qwen3-VL checkpoint to the ONNX IR (vision.onnx, decoder.onnx), validated against PyTorch."""

from __future__ import annotations

import argparse
import json
import sys

NAME = "export"
HELP = "Export a Qwen3-VL checkpoint to ONNX (vision.onnx + decoder.onnx) and validate it against PyTorch."
ORDER = 30


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="Hugging Face checkpoint directory (config.json, *.safetensors)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must be new or empty unless --force)")
    p.add_argument("--lowering", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                   help="INT4 lowering: MatMulNBits for ONNX Runtime (CPU bundles, default) or blocked INT4 DequantizeLinear for TensorRT")
    p.add_argument("--int4-accuracy-level", type=int, choices=[0, 4], default=0, metavar="{0,4}",
                   help="MatMulNBits compute for int4 on ONNX Runtime: 0 = fp32 (default, faithful), 4 = int8 (about 2x faster on CPU)")
    p.add_argument("--lm-head", default="float", metavar="{float,int8,int4}[:BLOCK]",
                   help="store the lm_head weight-only round-to-nearest as MatMulNBits (ONNX Runtime): far fewer bytes "
                        "read per decoded token at real vocabulary sizes, a small accuracy change of its own (default float; "
                        "blocks: int8 128, int4 32, or :16..:256)")
    p.add_argument("--graph-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="float dtype of the graphs' unquantized weights and activations: float32 (default, the only one for "
                        "onnxruntime) or a 16-bit one for --lowering tensorrt, as its engines run them (float16 on Jetson "
                        "Orin, bfloat16 where the target has bf16; `egm-edge build` picks it from the target)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--decode-steps", type=int, default=4, metavar="N", help="decode steps checked after the prefill (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation inputs (default 0)")
    p.add_argument("--json", action="store_true", help="print the manifest's validation figures as JSON")


def run(args: argparse.Namespace) -> int:
    from egm_edge.errors import InputError
    from egm_edge.export.pipeline import export

    if args.decode_steps < 1:
        raise InputError(f"--decode-steps must be at least 1, got {args.decode_steps}.")
    out = export(args.checkpoint, args.out, lowering=args.lowering, int4_accuracy_level=args.int4_accuracy_level, lm_head=args.lm_head, graph_dtype=args.graph_dtype, force=args.force, decode_steps=args.decode_steps, seed=args.seed,
                 progress=lambda msg: print(f"export: {msg}", file=sys.stderr))
    manifest = json.loads((out / "manifest.json").read_text())
    if args.json:
        print(json.dumps(manifest["validation"], indent=2))
        return 0
    for case, figs in manifest["validation"]["cases"].items():
        worst = min(figs["outputs"].items(), key=lambda kv: kv[1]["cosine"])
        images = f"grids {figs['grids']}" if "grids" in figs else f"tiles {figs.get('tiles')}"  # patch grids or tiles
        print(f"{case:>7}: {images}, worst cosine {worst[1]['cosine']:.7f} ({worst[0]}), "
              f"greedy agreement {figs['greedy_agreement']:.0%}"
              + (f" ({figs['tie_steps']} of {figs['tie_steps'] + figs['decided_steps']} steps were ties within the logits error)"
                 if figs.get("tie_steps") else ""))
    v = manifest["validation"]
    if v.get("graphs"):  # 16-bit graphs ONNX Runtime could not run on CPU: say which graphs were checked
        print(f"{manifest['graph_dtype']} graphs {v['graphs']}; validated: {v.get('validated', v.get('validated_graph_dtype'))}")
    print(f"wrote {out} ({manifest['precision']}, {manifest.get('graph_dtype', 'float32')} graphs, opset {manifest['opset']}, "
          f"{manifest['timings_s']['total']:.1f} s)")
    return 0
