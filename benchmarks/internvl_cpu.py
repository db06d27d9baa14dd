"""EGM-InternVL3-1B on this CPU: the egm-edge CPU bundles side by side with transformers eager.

Not a test (timings on shared machines are noisy): a script that prints a table and writes JSON. In one run it
1. writes a random-weight HF-native InternVLForConditionalGeneration checkpoint of the registry spec
   `get_spec("egm-internvl3-1b")` (Qwen2 text 896 x 24 layers, 14/2 heads, MLP 4864, untied lm_head;
   InternViT-300M 24 x 1024 over 448-px tiles), config from `to_hf_config`, bf16 safetensors, through
   `write_tiny_checkpoint(family="internvl")`; the tokenizer is the real 151k Qwen BPE (shared/data) with
   InternVL's added tokens (<img>, </img>, <IMG_CONTEXT>, ...) appended by the family record and written
   by `egm_edge.synth.tokenizer.write_tokenizer_files`, so the vocabulary and chat template are InternVL's;
2. runs quantize (int4_awq, a 4-sample synthetic calibration, 1 held out), export and build --target cpu
   for the int4 bundle, and export + build for the fp32 bundle (of the bf16 checkpoint), each stage in its
   own process with its wall time and peak RSS recorded;
3. times, for one 640x480 image (the preprocessor's tiling: the checkpoint writer caps it at 4 tiles +
   thumbnail) and exactly NEW_TOKENS greedy tokens: vision, prefill, decode ms/token and end-to-end,
   for each bundle through `egm_edge.runtime.Grounder` and for transformers eager in bf16 and fp32,
   each system in its own process (peak RSS after load, vision, prefill and decode).

    python benchmarks/internvl_cpu.py [--work DIR] [--systems ...] [--threads 2] [--repeats 1] [--skip-quantize]
                                      [--unchecked-export] [--out FILE.json]

Both default exports pass their validation (the fp32 max-abs bound through the float64 arbiter,
egm_edge/export/arbiter.py). `egm-int4-i8` (MatMulNBits accuracy level 4: int8 activations) misses its
threshold on these random weights, so it is timed only with --unchecked-export, which opens the thresholds for
that run; the export's manifest records the opened threshold and the figures measured.

Every stage's output lives in a directory named by a hash of what it was made from, so a rerun (or a run
with other --systems) reuses what exists and resumes after an interruption; timings are taken afresh.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from egm2b_cpu import CALIB as CALIB_2B, agreement, bench_image, bundle_timings, egm, hf_greedy, plot, run_stage  # noqa: E402

SPEC = "egm-internvl3-1b"
QWEN_TOKENIZER = REPO.parent / "shared" / "data" / "qwen3-vl-tokenizer"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "egm-edge" / "bench" / "internvl3-1b"
NEW_TOKENS = 32
EXPRESSION = "the person on the left"
CALIB = CALIB_2B.replace("EGM-2B", "EGM-InternVL3-1B").replace("holdout = 2", "holdout = 1")
SYSTEMS = ("egm-int4", "egm-fp32", "hf-bf16", "hf-fp32")
OPTIONAL = ("egm-int4-i8",)  # needs --unchecked-export at this scale
INT4_EXPORT = {"egm-int4": [], "egm-int4-i8": ["--int4-accuracy-level", "4"]}
LABELS = {"egm-int4": "egm-edge int4_awq bundle (lm_head float)", "egm-fp32": "egm-edge fp32 bundle",
          "egm-int4-i8": "egm-edge int4_awq, int8 compute (unchecked)",
          "hf-bf16": "transformers eager bf16", "hf-fp32": "transformers eager fp32"}


def key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)


# --- stages ---------------------------------------------------------------------------------------------

def checkpoint_inputs() -> dict:
    from egm_edge.models import get_spec
    from egm_edge.models.hf_config import to_hf_config

    d = to_hf_config(get_spec(SPEC))
    text = {k: v for k, v in d["text_config"].items() if k not in ("architectures", "model_type", "vocab_size")}
    vision = {k: v for k, v in d["vision_config"].items() if k != "model_type"}
    tok = hashlib.sha256((QWEN_TOKENIZER / "tokenizer.json").read_bytes()).hexdigest()[:12]
    return {"text": text, "vision": vision, "tokenizer": tok, "dtype": "bfloat16", "seed": 0}


def write_checkpoint(out: str) -> None:
    """The InternVL tokenizer (Qwen's BPE + the family's added tokens), then the random checkpoint over it."""
    from tokenizers import AddedToken, Tokenizer

    from egm_edge.models.families import get_family
    from egm_edge.reference.checkpoint import write_tiny_checkpoint
    from egm_edge.synth.tokenizer import write_tokenizer_files

    inp = checkpoint_inputs()
    tok = Tokenizer.from_file(str(QWEN_TOKENIZER / "tokenizer.json"))
    for name, special in get_family("internvl").added_tokens:
        if tok.token_to_id(name) is None:
            t = AddedToken(name, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
            (tok.add_special_tokens if special else tok.add_tokens)([t])
    tok_dir = Path(out + ".tokenizer")
    write_tokenizer_files(tok, tok_dir, model_max_length=32768, family="internvl")
    write_tiny_checkpoint(Path(out), tok_dir, seed=inp["seed"], text=inp["text"], vision=inp["vision"],
                          dtype=inp["dtype"], family="internvl")


def export_unchecked(argv: list[str]) -> int:
    """`egm_edge.export.export` with every validation threshold opened to cosine >= 0.9 and rel max-abs <= 1: the
    random-weight InternVL3-1B misses the stated ones (see benchmarks/README.md), and speed does not depend on it.
    The figures measured still go into the export's manifest; never use such a bundle for anything but timing."""
    from egm_edge.export import export, validate

    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint")
    p.add_argument("--out")
    p.add_argument("--force", action="store_true")
    p.add_argument("--decode-steps", type=int, default=2)
    p.add_argument("--int4-accuracy-level", type=int, default=0)
    a = p.parse_args(argv)
    for name, t in validate.THRESHOLDS.items():
        validate.THRESHOLDS[name] = type(t)(cosine=0.9, rel_max_abs=1.0)
    out = export(a.checkpoint, a.out, force=a.force, decode_steps=a.decode_steps, int4_accuracy_level=a.int4_accuracy_level,
                 progress=lambda msg: print(f"export: {msg}", file=sys.stderr))
    for case, figs in json.loads((Path(out) / "manifest.json").read_text())["validation"]["cases"].items():
        print(case, {k: v.get("cosine") for k, v in figs["outputs"].items()}, "greedy", figs.get("greedy_agreement"))
    return 0


def pipeline(work: Path, systems: list[str], skip_quantize: bool, stages: list[dict], unchecked: bool = False) -> dict[str, Path]:
    log = work / "stages.log"
    ck = key(checkpoint_inputs())
    ckpt = work / f"checkpoint-{ck}"
    if not (ckpt / "config.json").is_file():
        stages.append(run_stage("checkpoint", [sys.executable, __file__, "--write-checkpoint", str(ckpt)], log))
    out = {"checkpoint": ckpt}
    if set(INT4_EXPORT) & set(systems):
        q = work / f"int4_awq-{key(ck, CALIB)}"
        if not (q / "manifest.json").is_file():
            if skip_quantize:
                raise SystemExit(f"--skip-quantize: no int4_awq checkpoint at {q}; run without it once, or drop the int4 systems.")
            calib = work / "calib.toml"
            calib.write_text(CALIB)
            stages.append(run_stage("quantize int4_awq", egm("quantize", "--model", str(ckpt), "--recipe", "int4_awq",
                                                              "--calib", str(calib), "--out", str(q), "--no-fidelity",
                                                              "--cache-dir", str(work / "calib-cache"), "--force"), log))
        for name in sorted(set(INT4_EXPORT) & set(systems)):
            out[name] = export_and_build(work, name, q, INT4_EXPORT[name], stages, log, unchecked and name in OPTIONAL)
    if "egm-fp32" in systems:
        out["egm-fp32"] = export_and_build(work, "egm-fp32", ckpt, [], stages, log)
    return out


def export_and_build(work: Path, name: str, src: Path, export_args: list[str], stages: list[dict], log: Path,
                     unchecked: bool = False) -> Path:
    k = key(src.name, export_args, "unchecked" if unchecked else "checked")
    exp, bundle = work / f"{name}-{k}.export", work / f"{name}-{k}.bundle"
    if not (bundle / "manifest.json").is_file():
        if not (exp / "manifest.json").is_file():
            cmd = [sys.executable, __file__, "--export-unchecked"] if unchecked else egm("export")
            stages.append(run_stage(f"export {name}", [*cmd, "--checkpoint", str(src), "--out", str(exp), "--force",
                                                          "--decode-steps", "2", *export_args], log))
        stages.append(run_stage(f"build {name}", egm("build", "--export", str(exp), "--target", "cpu", "--out", str(bundle),
                                                     "--force"), log))
    return bundle


# --- timing (each in its own process) ---------------------------------------------------------------------

def time_bundle(bundle: Path, threads: int, repeats: int) -> dict:
    from egm_edge.grounding import user_text
    from egm_edge.runtime import Grounder

    g = Grounder.open(bundle, threads=threads)
    rss = {"load": rss_gb()}
    image, _ = bench_image()
    out = bundle_timings(g, image, user_text(EXPRESSION, "vanilla", family="internvl"), repeats, NEW_TOKENS)
    rss["run"] = rss_gb()
    return {**out, "peak_rss_gb": rss}


def time_transformers(ckpt: Path, dtype: str, threads: int, repeats: int) -> dict:
    """Eager transformers on the same tiles and prompt ids as the bundles: vision (get_image_features), prefill
    (the forward over the whole prompt minus its vision part) and a NEW_TOKENS greedy decode with the KV cache."""
    import torch
    from tokenizers import Tokenizer
    from transformers import InternVLForConditionalGeneration

    from egm_edge.grounding import chat_prompt, user_text
    from egm_edge.runtime.tiling import TilingConfig, image_token_count, tile_image

    torch.set_num_threads(threads)
    model = InternVLForConditionalGeneration.from_pretrained(ckpt, dtype=getattr(torch, dtype), attn_implementation="eager",
                                                             local_files_only=True).eval()
    rss = {"load": rss_gb()}
    cfg = TilingConfig.from_json(ckpt / "preprocessor_config.json")
    tiles = tile_image(bench_image()[0], cfg)
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    prompt = chat_prompt(user_text(EXPRESSION, "vanilla", family="internvl"), image_token_count(tiles.shape[0], cfg), family="internvl")
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
    pixels = torch.from_numpy(tiles).to(model.dtype)
    runs, tokens = [], None
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            model.model.get_image_features(pixels, vision_feature_layer=-1, vision_feature_select_strategy="default")
            t1 = time.perf_counter()
            rss.setdefault("vision", rss_gb())
            out = model(input_ids=ids, pixel_values=pixels, use_cache=True, logits_to_keep=1)
            t2 = time.perf_counter()
            rss.setdefault("prefill", rss_gb())
            t3 = time.perf_counter()
            toks = hf_greedy(model, out, NEW_TOKENS)
            t4 = time.perf_counter()
            rss.setdefault("decode", rss_gb())
            runs.append({"vision": (t1 - t0) * 1e3, "prefill": (t2 - t1 - (t1 - t0)) * 1e3,
                         "ms_per_token": (t4 - t3) * 1e3 / (NEW_TOKENS - 1)})
            tokens = toks
    runs = runs[1:] if len(runs) > 1 else runs
    med = lambda k: float(np.median([r[k] for r in runs]))  # noqa: E731
    return {"vision_ms": med("vision"), "prefill_ms": med("prefill"), "decode_ms_per_token": med("ms_per_token"),
            "end_to_end_ms": med("vision") + med("prefill") + med("ms_per_token") * NEW_TOKENS,
            "prompt_tokens": int(ids.shape[1]), "image_tiles": int(tiles.shape[0]), "new_tokens": len(tokens),
            "tokens": tokens, "peak_rss_gb": rss}


# --- report ---------------------------------------------------------------------------------------------

def report(rows: dict, stages: list[dict], out: Path, args) -> None:
    base = rows.get("hf-bf16")
    fmt = lambda v, f="{:.0f}": "-" if v is None else f.format(v)  # noqa: E731
    print(f"\nimage 640x480; {NEW_TOKENS} new tokens (greedy); threads {args.threads}; repeats {args.repeats}")
    print("| system | prompt tok | vision ms | prefill ms | decode ms/tok | end-to-end ms | vs hf bf16 | peak RSS GB "
          "(load / run) | greedy agreement vs fp32 bundle |\n|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        speed = base["end_to_end_ms"] / r["end_to_end_ms"] if base else None
        rss = r["peak_rss_gb"]
        agree = agreement(r["tokens"], rows["egm-fp32"]["tokens"]) if "egm-fp32" in rows and name.startswith("egm-") else None
        r["greedy_agreement_vs_egm_fp32"] = agree
        print(f"| {LABELS[name]} | {r['prompt_tokens']} | {r['vision_ms']:.0f} | {r['prefill_ms']:.0f} | "
              f"{r['decode_ms_per_token']:.1f} | {r['end_to_end_ms']:.0f} | {fmt(speed, '{:.2f}x')} | "
              f"{rss['load']} / {r['process_peak_rss_gb']} | {fmt(agree, '{:.2f}')} |")
    print("\n| stage | wall s | peak RSS GB |\n|---|---|---|")
    for s in {s["stage"]: s for s in stages}.values():  # the last run of each stage
        print(f"| {s['stage']} | {s['wall_s']} | {s['peak_rss_gb']} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"spec": SPEC, "threads": args.threads, "repeats": args.repeats, "new_tokens": NEW_TOKENS,
                               "image": "640x480", "stages": stages,
                               "systems": {k: {**v, "label": LABELS[k]} for k, v in rows.items()}}, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"), LABELS, NEW_TOKENS, "EGM-InternVL3-1B architecture on this CPU")
    print(f"wrote {out} and {out.with_suffix('.png')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=CACHE, help=f"stage outputs (default {CACHE})")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {', '.join(SYSTEMS + OPTIONAL)}")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per system after one warm-up (medians)")
    p.add_argument("--skip-quantize", action="store_true", help="use an existing int4_awq checkpoint; never quantize")
    p.add_argument("--build-only", action="store_true", help="run the pipeline stages, time nothing")
    p.add_argument("--unchecked-export", action="store_true",
                   help="export egm-int4-i8 with the validation thresholds opened (timing only; the measured figures stay in the manifest)")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default WORK/results.json)")
    p.add_argument("--write-checkpoint", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--time-one", help=argparse.SUPPRESS)
    p.add_argument("--target", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.write_checkpoint:
        write_checkpoint(args.write_checkpoint)
        return 0
    if args.time_one:
        if args.time_one.startswith("egm-"):
            r = time_bundle(args.target, args.threads, args.repeats)
        else:
            r = time_transformers(args.target, {"hf-bf16": "bfloat16", "hf-fp32": "float32"}[args.time_one], args.threads, args.repeats)
        args.out.write_text(json.dumps(r))
        return 0
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if set(systems) - set(SYSTEMS + OPTIONAL):
        p.error(f"unknown systems {sorted(set(systems) - set(SYSTEMS + OPTIONAL))}; choose from {', '.join(SYSTEMS + OPTIONAL)}")
    if "egm-int4-i8" in systems and not args.unchecked_export:
        p.error("egm-int4-i8's export misses its int8-compute threshold on these random weights (logits cosine 0.96); "
                "add --unchecked-export to time it anyway")
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    args.work.mkdir(parents=True, exist_ok=True)
    # Stage records persist in WORK, so a stage reused from an earlier run keeps its wall time and peak RSS.
    record = args.work / "stages.json"
    stages: list[dict] = json.loads(record.read_text()) if record.is_file() else []
    try:
        built = pipeline(args.work, systems, args.skip_quantize, stages, args.unchecked_export)
    finally:
        record.write_text(json.dumps(stages, indent=2) + "\n")
    if args.build_only:
        return 0
    rows = {}
    for name in systems:
        res = args.work / f"timing-{name}.json"
        target = built["checkpoint"] if name.startswith("hf-") else built[name]
        cmd = [sys.executable, __file__, "--time-one", name, "--target", str(target), "--threads", str(args.threads),
               "--repeats", str(args.repeats), "--out", str(res)]
        rec = run_stage(f"time {name}", cmd, args.work / "timing.log")
        rows[name] = {**json.loads(res.read_text()), "process_peak_rss_gb": rec["peak_rss_gb"], "process_wall_s": rec["wall_s"]}
    report(rows, stages, args.out or args.work / "results.json", args)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--export-unchecked"]:
        sys.exit(export_unchecked(sys.argv[2:]))
    sys.exit(main())
