"""EGM-2B on this CPU: the egm-edge CPU bundles side by side with what users would run instead.

Not a test (timings on shared machines are noisy): a script that prints a table and
writes JSON and a PNG. In one run it
1. measures this machine's streaming read bandwidth;
2. writes a random-weight checkpoint of the real EGM-2B architecture (Qwen3-VL-2B: text
   2048 x 28 layers, 16/8 heads, MLP 6144, vocabulary 151936 from the real Qwen3-VL
   tokenizer, tied embeddings; vision 24 x 1024, deepstack 5/11/17), bf16 safetensors,
   unless --work already holds it (speed does not depend on weight values);
3. runs the pipeline at that scale, each stage in its own process with its wall time and
   peak resident memory recorded: quantize (int4_awq, a 4-sample synthetic calibration),
   export, build --target cpu, for the int4 bundle (MatMulNBits, accuracy level 4) with the
   lm_head and vision tower kept float, for the "fast" int4 bundle that also stores the
   lm_head in int4 with onnxruntime-genai's block of 128 (export --lm-head int4:128), runs the
   vision tower in dynamic int8 (build
   --vision-int8) and prefills through a dynamic-int8 copy of the decoder (build
   --prefill-int8); these change accuracy a little, so they are their own row; and the fp32
   bundle (export of the bf16 checkpoint);
4. times, for one 640x480 image (300 image tokens; the prompt is the EGM chat prompt
   around it) and exactly 64 generated tokens: vision encode, prefill, decode ms/token and
   end-to-end, for each bundle through `egm_edge.runtime.Grounder`, for transformers eager
   generate in fp32 and bf16 on the same checkpoint, and for onnxruntime-genai's model
   builder int4 (block 128, accuracy level 4) on the same checkpoint (it builds only the
   text decoder, so it prefills the same number of text tokens and has no vision time);
5. reports each decode time as a multiple of its floor (bytes of weights read per token /
   measured bandwidth; an embedding table read by Gather counts one row) and the greedy
   tokens of each bundle against the fp32 bundle (agreement over the 64 tokens).

    python benchmarks/egm2b_cpu.py [--work runs/egm2b] [--threads 2] [--systems ...] [--rounds R] [--out FILE.json]

Every stage is reused when its output already exists in --work, so an interrupted run
resumes; the timings are always taken afresh. Needs ~19 GB free memory (the export's peak) and ~45 GB
of disk (exports are kept beside their bundles).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from cpu_decode_vs_plan import read_bandwidth_gbs  # noqa: E402


def parallel_read_bandwidth_gbs(threads: int, mib: int = 256, repeats: int = 5) -> float:
    """Streaming read bandwidth with `threads` numpy sums at once (numpy drops the GIL while it reduces)."""
    from concurrent.futures import ThreadPoolExecutor

    arrays = [np.ones(mib * 1024 * 1024 // 8, dtype=np.float64) for _ in range(threads)]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(np.sum, arrays))
            best = min(best, time.perf_counter() - t)
    return sum(a.nbytes for a in arrays) / best / 1e9

TOKENIZER = REPO.parent / "shared" / "data" / "qwen3-vl-tokenizer"
IMAGE = REPO.parent / "shared" / "data" / "coco128" / "images"
TEXT_2B = {
    "hidden_size": 2048, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "intermediate_size": 6144, "max_position_embeddings": 262144,
    "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True},
}
VISION_2B = {
    "depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "patch_size": 16, "spatial_merge_size": 2,
    "temporal_patch_size": 2, "out_hidden_size": 2048, "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17],
}
NEW_TOKENS = 64
EXPRESSION = "the person on the left"
CALIB = """description = "EGM-2B speed benchmark: a few synthetic samples (speed does not depend on the calibration)."
samples = 4
holdout = 2
seed = 0
task = "source"
max_pixels = 200704
min_pixels = "model"
max_new_tokens = 64

[[sources]]
kind = "synth"
n = 8
seed = 7_000_001
"""
SYSTEMS = ("egm-int4", "egm-int4-fast", "egm-fp32", "hf-fp32", "hf-bf16", "ortgenai-int4")


# --- stages: each in its own process, wall time and peak RSS recorded -----------------------------------

def run_stage(name: str, argv: list[str], log: Path, env: dict | None = None) -> dict:
    """Run `argv` as a child process; its wall time and peak resident set (os.wait4's rusage)."""
    print(f"[{name}] {' '.join(argv)}", flush=True)
    t = time.perf_counter()
    with open(log, "a") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"stage {name} failed (exit {code}); see {log}")
    rec = {"stage": name, "wall_s": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss / 1024**2, 2)}
    print(f"[{name}] {rec['wall_s']} s, peak RSS {rec['peak_rss_gb']} GB", flush=True)
    return rec


def write_checkpoint(out: str) -> None:
    from egm_edge.reference.checkpoint import write_tiny_checkpoint

    # max_pixels lets a 640x480 image through unscaled (1200 patches, 300 image tokens).
    write_tiny_checkpoint(Path(out), TOKENIZER, seed=0, text=TEXT_2B, vision=VISION_2B, tie_word_embeddings=True,
                          dtype="bfloat16", min_pixels=65536, max_pixels=1003520)


def egm(*args: str) -> list[str]:
    return [sys.executable, "-m", "egm_edge", *args]


def pipeline(work: Path, systems: list[str], stages: list[dict]) -> dict[str, Path]:
    """Checkpoint, quantize, export and build what `systems` need; returns {system: bundle or dir}."""
    log = work / "stages.log"
    ckpt = work / "checkpoint"
    if not (ckpt / "config.json").is_file():
        stages.append(run_stage("checkpoint", [sys.executable, __file__, "--write-checkpoint", str(ckpt)], log))
    out = {"checkpoint": ckpt}
    if any(s.startswith("egm-int4") for s in systems):
        (work / "calib.toml").write_text(CALIB)
        q = work / "int4_awq"
        if not (q / "manifest.json").is_file():
            stages.append(run_stage("quantize int4_awq", egm("quantize", "--model", str(ckpt), "--recipe", "int4_awq",
                                                              "--calib", str(work / "calib.toml"), "--out", str(q),
                                                              "--cache-dir", str(work / "calib-cache"), "--force"), log))
        for system, extra, build in (("egm-int4", [], []), ("egm-int4-fast", ["--lm-head", "int4:128"], ["--vision-int8", "--prefill-int8"])):
            if system in systems:
                out[system] = export_and_build(work, system, q, ["--int4-accuracy-level", "4", *extra], stages, log, build)
    if "egm-fp32" in systems:
        out["egm-fp32"] = export_and_build(work, "egm-fp32", ckpt, [], stages, log)
    return out


def export_and_build(work: Path, name: str, src: Path, export_args: list[str], stages: list[dict], log: Path,
                     build_args: list[str] = ()) -> Path:
    exp, bundle = work / f"{name}.export", work / f"{name}.bundle"
    if not (bundle / "manifest.json").is_file():
        if not (exp / "manifest.json").is_file():
            stages.append(run_stage(f"export {name}", egm("export", "--checkpoint", str(src), "--out", str(exp), "--force",
                                                          "--decode-steps", "2", *export_args), log))
        stages.append(run_stage(f"build {name}", egm("build", "--export", str(exp), "--target", "cpu", "--out", str(bundle),
                                                     "--force", *build_args), log))
    return bundle


# --- timing -------------------------------------------------------------------------------------------

def bench_image():
    from PIL import Image

    path = sorted(IMAGE.rglob("*.jpg"))[0]
    return Image.open(path).convert("RGB").resize((640, 480), Image.BICUBIC), path.name


def time_bundle(bundle: Path, threads: int, repeats: int) -> dict:
    from egm_edge.grounding import user_text
    from egm_edge.runtime import Grounder

    g = Grounder.open(bundle, threads=threads)
    image, _ = bench_image()
    return {**bundle_timings(g, image, user_text(EXPRESSION, "vanilla"), repeats, NEW_TOKENS),
            "decoder_weight_bytes_per_token": onnx_bytes_per_token(bundle / "decoder.onnx"),
            "export_check": export_check(bundle)}


def bundle_timings(g, image, text: str, repeats: int, new_tokens: int) -> dict:
    """Medians of `repeats` runs of exactly `new_tokens` new tokens on an open Grounder (a warm-up run dropped)."""
    runs, tokens, cap = [], None, new_tokens
    for _ in range(repeats + 1):  # the first run warms the sessions up and is dropped
        g._cache.clear()  # every run encodes the image
        # A random model never closes its reasoning: the budget policy forces the close and caps the answer;
        # the cap is set so that exactly new_tokens tokens come out (the policy keeps room for a stop token).
        events = list(g.stream_text(image, text, think_budget=None, max_new_tokens=cap, max_answer_tokens=16))
        ids = [e.token_id for e in events if e.token_id >= 0]
        cap += new_tokens - len(ids)
        runs.append(events[-1].result.timings)
        tokens = ids
    runs = runs[1:]
    med = lambda k: float(np.median([r[k] for r in runs]))  # noqa: E731
    return {"vision_ms": med("vision"), "prefill_ms": med("prefill"), "decode_ms_per_token": med("ms_per_token"),
            "end_to_end_ms": med("total"), "prompt_tokens": runs[0]["prompt_tokens"], "new_tokens": len(tokens),
            "tokens": tokens}


def export_check(bundle: Path) -> dict:
    """What the export stage proved for this bundle's graphs: ONNX Runtime against the PyTorch reference of the
    same checkpoint (greedy agreement over its decode steps, worst logit cosine), plus the build's own checks."""
    m = json.loads((bundle / "manifest.json").read_text())
    cases = (m.get("source_validation") or {}).get("cases") or {}
    out = {"greedy_agreement_min": min((c.get("greedy_agreement", 1.0) for c in cases.values()), default=None),
           "cosine_min": min((o.get("cosine", 1.0) for c in cases.values() for o in (c.get("outputs") or {}).values()
                              if isinstance(o, dict)), default=None)}
    for key in ("vision", "prefill"):
        if isinstance(m.get(key), dict) and len(m[key]) > 1:
            out[key] = m[key]
    return out


def onnx_bytes_per_token(path: Path) -> int:
    """Initializer bytes a decode step reads: all of them, except tables only gathered from (one row each)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    size = {}
    for t in m.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if "length" in ext:
            size[t.name] = int(ext["length"])
        else:
            size[t.name] = len(t.raw_data) if t.raw_data else int(np.prod(t.dims or [1])) * 4
    users: dict[str, set] = {}
    for node in m.graph.node:
        for i, name in enumerate(node.input):
            if name in size:
                users.setdefault(name, set()).add((node.op_type, i))
    total = 0
    for name, n in size.items():
        gathered = users.get(name) and all(op in ("Gather", "GatherBlockQuantized") and i == 0 for op, i in users[name])
        if gathered:
            dims = next(t.dims for t in m.graph.initializer if t.name == name)
            total += n // max(1, int(dims[0]))
        else:
            total += n
    return total


def hf_greedy(model, out, new_tokens: int) -> list[int]:
    """`new_tokens` greedy tokens from a transformers forward's output `out` (its logits and KV cache), one
    forward per token after the first (no generate(): its extra work is not what is timed)."""
    past, nxt, toks = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), []
    for _ in range(new_tokens - 1):
        toks.append(int(nxt))
        o = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
    return toks + [int(nxt)]


def time_transformers(ckpt: Path, dtype: str, threads: int, repeats: int) -> dict:
    """Eager transformers: vision encode, prefill (the whole prompt, image included, minus vision) and a
    64-step greedy decode with its KV cache, on the same pixels and prompt ids as the bundles."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from egm_edge.grounding import chat_prompt, user_text
    from egm_edge.runtime.preprocess import ImageProcessorConfig, preprocess_image
    from tokenizers import Tokenizer

    torch.set_num_threads(threads)
    model = Qwen3VLForConditionalGeneration.from_pretrained(ckpt, dtype=getattr(torch, dtype), attn_implementation="eager",
                                                            local_files_only=True).eval()
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    image, _ = bench_image()
    prep = preprocess_image(image, ImageProcessorConfig.from_json(ckpt / "preprocessor_config.json"))
    ids = torch.tensor([tok.encode(chat_prompt(user_text(EXPRESSION, "vanilla"), prep.n_image_tokens), add_special_tokens=False).ids])
    pixels = torch.from_numpy(prep.pixel_values).to(model.dtype)
    grid = torch.tensor([prep.grid_thw])
    runs, tokens = [], None
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            model.model.get_image_features(pixels, grid)
            t1 = time.perf_counter()
            out = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, use_cache=True,
                        mm_token_type_ids=(ids == model.config.image_token_id).long(), logits_to_keep=1)
            t2 = time.perf_counter()
            t3 = time.perf_counter()
            toks = hf_greedy(model, out, NEW_TOKENS)
            t4 = time.perf_counter()
            runs.append({"vision": (t1 - t0) * 1e3, "prefill": (t2 - t1) * 1e3 - (t1 - t0) * 1e3,
                         "ms_per_token": (t4 - t3) * 1e3 / (NEW_TOKENS - 1)})
            tokens = toks
    runs = runs[1:] if len(runs) > 1 else runs
    med = lambda k: float(np.median([r[k] for r in runs]))  # noqa: E731
    text_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model.visual."))
    embed = model.model.language_model.embed_tokens.weight.numel()
    per = torch.finfo(model.dtype).bits // 8
    # Tied embeddings: the lm_head reads the whole table every step; the Gather reads one row.
    return {"vision_ms": med("vision"), "prefill_ms": med("prefill"), "decode_ms_per_token": med("ms_per_token"),
            "end_to_end_ms": med("vision") + med("prefill") + med("ms_per_token") * NEW_TOKENS,
            "prompt_tokens": int(ids.shape[1]), "new_tokens": len(tokens), "tokens": tokens,
            "decoder_weight_bytes_per_token": int(text_params * per + (0 if model.config.tie_word_embeddings else -embed * per))}


# --- onnxruntime-genai ---------------------------------------------------------------------------------

def build_ortgenai(work: Path, ckpt: Path, stages: list[dict]) -> Path:
    out = work / "ortgenai-int4"
    if (out / "genai_config.json").is_file():
        return out
    # The builder reads Qwen3VLForConditionalGeneration itself and builds its text decoder (int4 RTN MatMulNBits,
    # tied embedding and lm_head shared and quantized too: its default on CPU).
    stages.append(run_stage("ortgenai builder int4", [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt),
                                                      "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(work / "hf-cache"),
                                                      "--extra_options", "block_size=128", "accuracy_level=4"],
                            work / "stages.log"))
    return out


def time_ortgenai(model_dir: Path, prompt_tokens: int, threads: int, repeats: int) -> dict:
    import onnxruntime_genai as og

    cfg_path = model_dir / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=4))
    model = og.Model(str(model_dir))
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 100000, size=prompt_tokens).astype(np.int32)
    runs, tokens = [], None
    for _ in range(repeats + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt_tokens + NEW_TOKENS, min_length=prompt_tokens + NEW_TOKENS, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        t1 = time.perf_counter()
        toks = []
        while not gen.is_done():
            gen.generate_next_token()
            toks.append(int(gen.get_next_tokens()[0]))
        t2 = time.perf_counter()
        # append_tokens runs the prefill and yields the first token; each later step is one decode
        runs.append({"prefill": (t1 - t0) * 1e3, "ms_per_token": (t2 - t1) * 1e3 / max(1, len(toks) - 1)})
        tokens = toks
    runs = runs[1:]
    med = lambda k: float(np.median([r[k] for r in runs]))  # noqa: E731
    return {"vision_ms": None, "prefill_ms": med("prefill"), "decode_ms_per_token": med("ms_per_token"),
            "end_to_end_ms": None, "prompt_tokens": prompt_tokens, "new_tokens": len(tokens), "tokens": tokens,
            "decoder_weight_bytes_per_token": onnx_bytes_per_token(model_dir / "model.onnx"),
            "note": "text path only (random prompt ids of the same length); no vision encoder"}


# --- report -------------------------------------------------------------------------------------------

LABELS = {
    "egm-int4": "egm-edge int4_awq bundle (lm_head float)",
    "egm-int4-fast": "egm-edge int4_awq bundle, int4 lm_head (block 128), int8 vision + prefill",
    "egm-fp32": "egm-edge fp32 bundle",
    "hf-fp32": "transformers eager fp32",
    "hf-bf16": "transformers eager bf16",
    "ortgenai-int4": "onnxruntime-genai int4 (block 128)",
}


def agreement(a: list[int], b: list[int]) -> float:
    n = min(len(a), len(b))
    return sum(x == y for x, y in zip(a[:n], b[:n])) / n if n else 0.0


def stages_in_use(stages: list[dict], ran_before: int) -> list[dict]:
    """The last record of each stage (the run whose output the timings used), in the order they last ran; `ran_now` marks
    those this invocation ran (stages.json keeps every earlier run of a stage too)."""
    last = {}
    for i, s in enumerate(stages):
        last.pop(s["stage"], None)
        last[s["stage"]] = {**s, "ran_now": i >= ran_before}
    return list(last.values())


def report(rows: dict, bw: float, stages: list[dict], out: Path, args, ran_before: int = 0) -> dict:
    for name, r in rows.items():
        r["floor_ms_per_token"] = r["decoder_weight_bytes_per_token"] / (bw * 1e9) * 1e3
        r["decode_over_floor"] = r["decode_ms_per_token"] / r["floor_ms_per_token"]
        if "egm-fp32" in rows and name.startswith("egm-"):
            r["greedy_agreement_vs_egm_fp32"] = agreement(r["tokens"], rows["egm-fp32"]["tokens"])
            first = next((i for i, (x, y) in enumerate(zip(r["tokens"], rows["egm-fp32"]["tokens"])) if x != y), None)
            r["first_divergence"] = first
    base = rows.get("hf-bf16")
    print(f"\nread bandwidth {bw:.1f} GB/s; image 640x480; {NEW_TOKENS} new tokens; threads {args.threads}")
    head = ("| system | prompt tok | vision ms | prefill ms | decode ms/tok | floor ms | x floor | end-to-end ms | speed-up vs hf bf16 "
            "| greedy agreement vs fp32 bundle | export check: greedy agreement vs PyTorch reference |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    fmt = lambda v, f="{:.0f}": "-" if v is None else f.format(v)  # noqa: E731
    for name, r in rows.items():
        speed = base["end_to_end_ms"] / r["end_to_end_ms"] if base and r.get("end_to_end_ms") else None
        print(f"| {LABELS[name]} | {r['prompt_tokens']} | {fmt(r['vision_ms'])} | {fmt(r['prefill_ms'])} | "
              f"{r['decode_ms_per_token']:.1f} | {r['floor_ms_per_token']:.1f} | {r['decode_over_floor']:.2f} | "
              f"{fmt(r.get('end_to_end_ms'))} | {fmt(speed, '{:.2f}x')} | {fmt(r.get('greedy_agreement_vs_egm_fp32'), '{:.2f}')} | "
              f"{fmt((r.get('export_check') or {}).get('greedy_agreement_min'), '{:.2f}')} |")
    if getattr(args, "rounds", 1) > 1:
        print(f"\ndecode ms/token in each of {args.rounds} rounds (systems timed in turn; the table gives medians):")
        for name, r in rows.items():
            print(f"  {LABELS[name]}: " + ", ".join(f"{v:.1f}" for v in r["decode_ms_per_token_rounds"] if v is not None))
    in_use = stages_in_use(stages, ran_before)
    print("\n| stage (the run whose output was timed) | wall s | peak RSS GB | ran now |\n|---|---|---|---|")
    for s in in_use:
        print(f"| {s['stage']} | {s['wall_s']} | {s['peak_rss_gb']} | {'yes' if s['ran_now'] else 'no, reused'} |")
    result = {"read_bandwidth_gbs": round(bw, 2), "threads": args.threads, "new_tokens": NEW_TOKENS, "image": "640x480",
              "stages": in_use, "stage_history": stages, "systems": {k: {**v, "label": LABELS[k]} for k, v in rows.items()}}
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


def plot(rows: dict, path: Path, labels: dict | None = None, new_tokens: int = NEW_TOKENS,
         title: str = "EGM-2B architecture on this CPU") -> None:
    """Stacked bars of vision, prefill and decode seconds per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    labels = labels or LABELS
    parts = [("vision_ms", "vision"), ("prefill_ms", "prefill"), ("decode", f"decode x{new_tokens}")]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(names) + 1.5))
    left = np.zeros(len(names))
    for key, label in parts:
        vals = np.array([(rows[n]["decode_ms_per_token"] * new_tokens if key == "decode" else rows[n][key] or 0) / 1e3
                         for n in names])
        ax.barh([labels[n] for n in names], vals, left=left, label=label)
        left += vals
    ax.set_xlabel(f"seconds (640x480 image, {new_tokens} new tokens)")
    ax.invert_yaxis()
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/egm2b"))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="time the systems in turn this many times (medians over rounds)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {', '.join(SYSTEMS)}")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default WORK/results.json; the PNG goes beside it)")
    p.add_argument("--build-only", action="store_true", help="run the pipeline stages, time nothing")
    p.add_argument("--write-checkpoint", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.write_checkpoint:
        write_checkpoint(args.write_checkpoint)
        return 0
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    if args.rounds < 1 or args.repeats < 1:
        p.error("--rounds and --repeats must be at least 1")
    args.work.mkdir(parents=True, exist_ok=True)
    # Stage records persist across runs (a stage reused from an earlier run keeps its figures).
    record = args.work / "stages.json"
    stages: list[dict] = json.loads(record.read_text()) if record.is_file() else []
    ran_before = len(stages)
    try:
        built = pipeline(args.work, systems, stages)
        if "ortgenai-int4" in systems:
            built["ortgenai-int4"] = build_ortgenai(args.work, built["checkpoint"], stages)
    finally:
        record.write_text(json.dumps(stages, indent=2) + "\n")
    if args.build_only:
        return 0
    bw1 = read_bandwidth_gbs()
    bw = parallel_read_bandwidth_gbs(args.threads) if args.threads > 1 else bw1
    print(f"read bandwidth: {bw1:.1f} GB/s one thread, {bw:.1f} GB/s with {args.threads} (the floors use the latter)")
    rounds: dict[str, list[dict]] = {name: [] for name in systems}
    # Each system is timed in its own process so that one model's memory is gone before the next loads. With
    # --rounds R the systems take turns R times (A B A B ...), so that a slow spell of a shared machine falls
    # on all of them; each figure is then the median over the rounds (every round's decode time is kept).
    for k in range(args.rounds):
        for name in systems:
            res = args.work / f"timing-{name}.json"
            cmd = [sys.executable, __file__, "--work", str(args.work), "--threads", str(args.threads),
                   "--repeats", str(args.repeats), "--time-one", name, "--out", str(res)]
            print(f"[time {name}" + (f", round {k + 1}/{args.rounds}]" if args.rounds > 1 else "]"), flush=True)
            subprocess.run(cmd, check=True, cwd=REPO)
            rounds[name].append(json.loads(res.read_text()))
    rows = {name: combine_rounds(rs) for name, rs in rounds.items()}
    report(rows, bw, stages, args.out or args.work / "results.json", args, ran_before)
    return 0


def combine_rounds(rs: list[dict]) -> dict:
    """One system's timing over rounds: the median of each time, the first round's other fields, all decode times."""
    out = dict(rs[0])
    for key in ("vision_ms", "prefill_ms", "decode_ms_per_token", "end_to_end_ms"):
        vals = [r[key] for r in rs if r.get(key) is not None]
        if vals:
            out[key] = float(np.median(vals))
    out["rounds"] = len(rs)
    out["decode_ms_per_token_rounds"] = [r.get("decode_ms_per_token") for r in rs]
    return out


def time_one(argv) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--work", type=Path)
    p.add_argument("--threads", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--time-one")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    ckpt = a.work / "checkpoint"
    if a.time_one.startswith("egm-"):
        r = time_bundle(a.work / f"{a.time_one}.bundle", a.threads, a.repeats)
    elif a.time_one.startswith("hf-"):
        r = time_transformers(ckpt, {"hf-fp32": "float32", "hf-bf16": "bfloat16"}[a.time_one], a.threads, a.repeats)
    else:
        from egm_edge.runtime.preprocess import ImageProcessorConfig, preprocess_image

        n = preprocess_image(bench_image()[0], ImageProcessorConfig.from_json(ckpt / "preprocessor_config.json")).n_image_tokens
        from egm_edge.grounding import chat_prompt, user_text
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
        length = len(tok.encode(chat_prompt(user_text(EXPRESSION, "vanilla"), n), add_special_tokens=False).ids)
        r = time_ortgenai(a.work / "ortgenai-int4", length, a.threads, a.repeats)
    a.out.write_text(json.dumps(r))
    return 0


if __name__ == "__main__":
    if "--time-one" in sys.argv:
        sys.exit(time_one(sys.argv[1:]))
    sys.exit(main())
