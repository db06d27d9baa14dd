"""Check exported graphs against the PyTorch reference right after export; failure stops the export.

Two cases, each a prefill plus `steps` greedy decode steps (the reference's
tokens are fed to both sides, so every step compares like with like):
- "random": two images of different sizes in one call, random pixel patches and
  random text tokens around the image-pad runs;
- "real": one rendered image of a third size through the family's preprocessing,
  with the family's EGM grounding prompt (its record's `chat_prompt`) when the
  checkpoint has a tokenizer.
The family's layout picks the host side: Qwen3-VL's patches, grid tensors and M-RoPE ids
(a `VisionGridConfig`), or InternVL's tiles (`tile_image`; random pixels in the "random"
case, 3 tiles over two images) with three equal rows of plain positions (a `TilingConfig`).
ONNX Runtime runs vision.onnx -> decoder.onnx end to end on them (egm_edge.runtime), the
reference is transformers' model on the same pixels and tokens. Per output (image features, deepstack
features, prefill logits, decode logits, final KV cache): cosine similarity
and max abs error relative to the reference's max magnitude. Thresholds are
per precision and graph dtype (`THRESHOLDS`, `validation_key`); a miss raises EgmError quoting
the figures. 16-bit graphs get their float inputs cast to their dtype and are compared with the
float32 reference; a graph ONNX Runtime has no CPU kernel for raises `CpuCannotRun`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from egm_edge.errors import EgmError
from egm_edge.runtime.mrope import decode_position_ids, plain_position_ids, rope_index
from egm_edge.runtime.preprocess import ImageProcessorConfig, preprocess_image, smart_resize
from egm_edge.runtime.tiling import TilingConfig, image_token_count, tile_image
from egm_edge.runtime.vision_inputs import VisionGridConfig, vision_grid_inputs


@dataclass(frozen=True)
class Threshold:
    """Pass when cosine >= `cosine` and max|ort - ref| <= `rel_max_abs` * max|ref| for every output."""

    cosine: float
    rel_max_abs: float


# fp32 graphs of a full-precision checkpoint differ from PyTorch only by kernel rounding; so do weight-only
# int4 graphs from the dequantized reference (same weights, fp32 compute). Where activations are quantized,
# a value on a rounding boundary may round the other way after a different summation order: looser bounds.
THRESHOLDS = {
    "full": Threshold(cosine=0.9999, rel_max_abs=1e-3),
    "int4_awq": Threshold(cosine=0.9999, rel_max_abs=1e-3),
    "fp8": Threshold(cosine=0.999, rel_max_abs=5e-2),
    "int8_sq": Threshold(cosine=0.999, rel_max_abs=5e-2),
    # MatMulNBits accuracy_level 4 quantizes activations to int8 per block, which the reference does not;
    # the error grows with depth: the random-weight EGM-2B (28 layers, flat logits, the worst case) reaches
    # cosine 0.99887 (benchmarks/egm2b_cpu.py), the tiny test models 0.9999+.
    "int4_awq/int8_compute": Threshold(cosine=0.998, rel_max_abs=1e-1),
    # 16-bit graphs (TensorRT lowering) against the float32 PyTorch model: what the engine computes vs the full-precision
    # model. Every unquantized weight and activation rounds to the graph's dtype (fp16 epsilon 9.8e-4, bf16 7.8e-3), once
    # per op, so the max-abs error grows with depth. Measured on the tiny test models (2 text layers, tests/export/conftest,
    # ONNX Runtime 1.32 CPU): fp16 full worst 1 - cosine 2.2e-7, rel max-abs 9.5e-4; fp16 int4_awq 2.3e-7, 1.1e-3.
    # The bounds leave ~20x (about one epsilon per layer of a 28-36 layer EGM model); a wrong graph misses cosine first.
    "full/float16": Threshold(cosine=0.999, rel_max_abs=2e-2),
    "int4_awq/float16": Threshold(cosine=0.999, rel_max_abs=2e-2),
    # Quantized activations: a 16-bit rounding of a Linear's input moves values across a quantization step (a whole fp8/int8
    # step of error where the float32 reference has none). Measured (same models): fp8 worst 1 - cosine 3.6e-4, rel max-abs
    # 4.6e-2; int8_sq (per-tensor int8, 256 steps) 3.9e-3, 1.1e-1; greedy tokens equal in both.
    "fp8/float16": Threshold(cosine=0.998, rel_max_abs=1e-1),
    "int8_sq/float16": Threshold(cosine=0.99, rel_max_abs=2.5e-1),
    # bf16 keeps 8 mantissa bits to fp16's 11: 8x the fp16 max-abs bound. Not measured in ONNX Runtime (its CPU kernels
    # lack bfloat16 Gemm, so the export validates the float32 twin); the HF model itself in bf16 vs float32 measured
    # 1 - cosine 2.8e-5, rel max-abs 1.1e-2 on the tiny full model. fp8/int8 bf16 graphs have no bound yet: twin only.
    "full/bfloat16": Threshold(cosine=0.995, rel_max_abs=1.6e-1),
    "int4_awq/bfloat16": Threshold(cosine=0.995, rel_max_abs=1.6e-1),
}


def validation_key(precision: str, lowering: str = "onnxruntime", int4_accuracy_level: int = 0, lm_head: str = "float",
                   graph_dtype: str = "float32") -> str:
    """The THRESHOLDS entry an export is checked against ("PRECISION/float16" for 16-bit graphs)."""
    nbits = precision == "int4_awq" or lm_head != "float"  # MatMulNBits somewhere in the decoder
    if nbits and lowering == "onnxruntime" and int4_accuracy_level == 4:
        return "int4_awq/int8_compute"
    return precision if graph_dtype == "float32" else f"{precision}/{graph_dtype}"


class CpuCannotRun(EgmError):
    """ONNX Runtime on CPU has no kernel (or numpy no type) for these graphs' dtype: nothing was compared."""


def disabled_optimizers(precision: str, backend: str = "onnxruntime") -> tuple[str, ...]:
    """ONNX Runtime graph transformers that must stay off to run this precision's graphs as written."""
    from egm_edge.export.lowering import QDQ_FUSION

    precision = precision.split("/")[0]  # a validation key names the precision first
    return QDQ_FUSION if precision == "fp8" or (backend == "tensorrt" and precision != "full") else ()


# Graphs that compute in fp32 like their reference: a max-abs miss is arbitrated against a float64 reference.
ARBITRATED = ("full", "int4_awq")
OUTPUTS = ("image_features", "deepstack_features", "prefill_logits", "decode_logits", "kv_cache")
PREFILL_ROWS = 8  # prefill logits compared at the last rows; the KV cache covers every position
IMAGE_SIZES = {"random": ((256, 320), (352, 224)), "real": ((300, 410),)}  # (height, width) in pixels


@dataclass(frozen=True)
class Case:
    name: str
    pixel_patches: np.ndarray  # Qwen3-VL patches [N, patch_dim], or tiles [N, 3, T, T] (`tiles` given)
    grids: tuple[tuple[int, int, int], ...]
    input_ids: np.ndarray  # [1, S]
    tiles: tuple[int, ...] = ()  # tiles per image, for a tiling family


def _metric(got: np.ndarray, ref: np.ndarray) -> dict:
    g, r = got.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    if g.shape != r.shape:
        return {"cosine": 0.0, "max_abs_err": float("inf"), "ref_max_abs": 0.0, "rel_max_abs": float("inf"), "shape": list(got.shape)}
    denom = np.linalg.norm(g) * np.linalg.norm(r)
    cos = float(g @ r / denom) if denom > 0 else float(np.allclose(g, r))
    err = float(np.abs(g - r).max()) if g.size else 0.0
    scale = float(np.abs(r).max()) if r.size else 0.0
    return {"cosine": cos, "max_abs_err": err, "ref_max_abs": scale, "rel_max_abs": err / scale if scale > 0 else err, "shape": list(ref.shape)}


def _special_ids(dcfg: dict) -> set[int]:
    return {dcfg["image_token_id"], dcfg["vision_start_token_id"], dcfg["vision_end_token_id"]}


def _prompt(text_before: list[int], n_tokens: list[int], text_after: list[int], dcfg: dict) -> np.ndarray:
    ids = list(text_before)
    for n in n_tokens:
        ids += [dcfg["vision_start_token_id"]] + [dcfg["image_token_id"]] * n + [dcfg["vision_end_token_id"]]
    return np.asarray([ids + list(text_after)], dtype=np.int64)


def _render(height: int, width: int, rng: np.random.Generator):
    """A deterministic picture with smooth gradients and a few solid shapes (natural-image-like statistics)."""
    from PIL import Image, ImageDraw

    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / width * 200 + 30, yy / height * 180 + 40, (xx + yy) / (width + height) * 120 + 60], -1)
    img = Image.fromarray(base.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width * 3 // 4)), int(rng.integers(0, height * 3 // 4))
        x1, y1 = x0 + int(rng.integers(width // 8, width // 3)), y0 + int(rng.integers(height // 8, height // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return img


def _processor_config(checkpoint: Path, vcfg: VisionGridConfig) -> ImageProcessorConfig:
    if (checkpoint / "preprocessor_config.json").is_file():
        return ImageProcessorConfig.from_json(checkpoint / "preprocessor_config.json")
    return ImageProcessorConfig(patch_size=vcfg.patch_size, merge_size=vcfg.spatial_merge_size, temporal_patch_size=vcfg.temporal_patch_size)


def _family_prompt(checkpoint: Path, family, n_image_tokens: int, image_token_id: int) -> np.ndarray | None:
    """The family's EGM prompt for one image, tokenized by the checkpoint's tokenizer (None without one, or when
    the tokenizer does not keep the image token whole)."""
    if not (checkpoint / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    from egm_edge.models.families import get_family

    fam = get_family(family)
    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    prompt = fam.chat_prompt(fam.user_text("the largest round shape"), n_image_tokens)
    enc = tok.encode(prompt, add_special_tokens=False).ids
    if sum(i == image_token_id for i in enc) != n_image_tokens:
        return None
    return np.asarray([enc], dtype=np.int64)


def _tiling_cases(checkpoint: Path, tcfg: TilingConfig, dcfg: dict, seed: int, family) -> list[Case]:
    """The two cases for a tiling family: random tiles (2 + 1, two images) and a rendered image through `tile_image`."""
    from egm_edge.models.families import get_family

    rng = np.random.default_rng(seed)
    fam = get_family(family)
    marks = (None, None)
    if (checkpoint / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
        marks = (tok.token_to_id(fam.tokens.image_start), tok.token_to_id(fam.tokens.image_end))
    special = {dcfg["image_token_id"], *(m for m in marks if m is not None)}
    vocab = min(dcfg["vocab_size"], 50_000)

    def text(n: int) -> list[int]:
        return [int(i) if int(i) not in special else 0 for i in rng.integers(0, vocab, n)]

    def prompt(before, tiles, after):
        ids = list(before)
        for n in tiles:
            run = [dcfg["image_token_id"]] * image_token_count(n, tcfg)
            ids += ([marks[0]] if marks[0] is not None else []) + run + ([marks[1]] if marks[1] is not None else [])
        return np.asarray([ids + list(after)], dtype=np.int64)

    tiles = (2, 1)
    pixels = rng.standard_normal((sum(tiles), 3, tcfg.tile_size, tcfg.tile_size)).astype(np.float32)
    cases = [Case("random", pixels, (), prompt(text(5), tiles, text(7)), tiles)]
    (h, w), = IMAGE_SIZES["real"]
    real = tile_image(_render(h, w, rng), tcfg)
    n = real.shape[0]
    ids = _family_prompt(checkpoint, family, image_token_count(n, tcfg), dcfg["image_token_id"])
    cases.append(Case("real", real, (), ids if ids is not None else prompt(text(4), (n,), text(12)), (n,)))
    return cases


def build_cases(checkpoint: Path, vcfg: VisionGridConfig | TilingConfig, dcfg: dict, seed: int = 0, *, family) -> list[Case]:
    """The two cases of the module docstring; `family` (a name or a record) gives the real case's prompt."""
    if isinstance(vcfg, TilingConfig):
        return _tiling_cases(Path(checkpoint), vcfg, dcfg, seed, family)
    rng = np.random.default_rng(seed)
    pcfg = _processor_config(checkpoint, vcfg)
    m2 = vcfg.spatial_merge_size**2
    special = _special_ids(dcfg)
    vocab = min(dcfg["vocab_size"], 50_000)

    def text(n: int) -> list[int]:
        ids = rng.integers(0, vocab, n)
        return [int(i) if int(i) not in special else 0 for i in ids]

    grids = []
    for h, w in IMAGE_SIZES["random"]:
        rh, rw = smart_resize(h, w, pcfg.factor, pcfg.min_pixels, pcfg.max_pixels)
        grids.append((1, rh // vcfg.patch_size, rw // vcfg.patch_size))
    n_patches = sum(t * h * w for t, h, w in grids)
    patches = rng.standard_normal((n_patches, vcfg.patch_dim)).astype(np.float32)
    cases = [Case("random", patches, tuple(grids), _prompt(text(5), [t * h * w // m2 for t, h, w in grids], text(7), dcfg))]

    (h, w), = IMAGE_SIZES["real"]
    pre = preprocess_image(_render(h, w, rng), pcfg)
    ids = _family_prompt(checkpoint, family, pre.n_image_tokens, dcfg["image_token_id"])
    if ids is None:
        ids = _prompt(text(4), [pre.n_image_tokens], text(12), dcfg)
    cases.append(Case("real", pre.pixel_values, (pre.grid_thw,), ids))
    return cases


def _reference(model, case: Case, steps: int, tokens: list[int] | None = None) -> dict:
    """The model's outputs on `case`: greedy for `steps` tokens, or fed `tokens` (so a second reference compares step for step)."""
    import torch

    image_id = model.config.image_token_id
    ids = torch.from_numpy(case.input_ids)
    pix = torch.from_numpy(case.pixel_patches).to(next(model.parameters()).dtype)
    with torch.no_grad():
        if case.tiles:  # InternVL: features of every tile in order, no deepstack; transformers' own 1-D positions
            feats = model.get_image_features(pixel_values=pix).pooler_output
            feats = feats.reshape(-1, feats.shape[-1])
            deep = feats.new_zeros((0, *feats.shape))
            inputs = {"pixel_values": pix}
        else:
            grid = torch.tensor(case.grids, dtype=torch.long)
            vis = model.model.visual(pix, grid_thw=grid)
            feats, deep = vis.pooler_output, torch.stack(list(vis.deepstack_features))
            inputs = {"pixel_values": pix, "image_grid_thw": grid, "mm_token_type_ids": (ids == image_id).int()}
        out = model(input_ids=ids, **inputs, use_cache=True, logits_to_keep=PREFILL_ROWS)
        logits, cache = out.logits, out.past_key_values
        prefill = logits.numpy()
        forced, tokens, step_logits = tokens, [], []
        for k in range(steps if forced is None else len(forced)):
            nxt = logits[:, -1].argmax(-1) if forced is None else torch.tensor([forced[k]])
            tokens.append(int(nxt[0]))
            out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
            logits, cache = out.logits, out.past_key_values
            step_logits.append(logits[:, -1].numpy())
        kv = np.concatenate([np.concatenate([l.keys.numpy().ravel(), l.values.numpy().ravel()]) for l in cache.layers])
    return {
        "image_features": feats.numpy(),
        "deepstack_features": deep.numpy(),
        "prefill_logits": prefill[:, -PREFILL_ROWS:],
        "tokens": tokens,
        "decode_logits": np.stack(step_logits),
        "kv_cache": kv,
    }


_ORT_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class _Session:
    """An ONNX Runtime session whose float feeds are cast to the graph's input dtypes (float32 on the host side)."""

    def __init__(self, sess):
        self.sess = sess
        self.types = {i.name: i.type for i in sess.get_inputs()}

    def run(self, outputs, feeds: dict):
        cast = {}
        for name, a in feeds.items():
            t = self.types.get(name)
            if np.issubdtype(a.dtype, np.floating) and t not in _ORT_FLOATS:
                raise CpuCannotRun(f"input {name} is {t}, which numpy and ONNX Runtime's Python feeds do not carry")
            cast[name] = a.astype(_ORT_FLOATS[t], copy=False) if np.issubdtype(a.dtype, np.floating) else a
        return self.sess.run(outputs, cast)


def _ort(vision, decoder, case: Case, tokens: list[int], vcfg: VisionGridConfig | TilingConfig, dcfg: dict) -> dict:
    ids = case.input_ids
    s = ids.shape[1]
    if case.tiles:
        feats, deep = vision.run(["image_features", "deepstack_features"], {"pixel_values": case.pixel_patches})
        pos, delta = plain_position_ids(s), np.zeros(1, np.int64)
    else:
        feats, deep = vision.run(["image_features", "deepstack_features"],
                                 {"pixel_patches": case.pixel_patches, **vision_grid_inputs(case.grids, vcfg)})
        pos, delta = rope_index(ids, case.grids, dcfg["image_token_id"], vcfg.spatial_merge_size)
    n_layers, kvh, hd = dcfg["num_layers"], dcfg["num_kv_heads"], dcfg["head_dim"]
    past = [np.zeros((1, kvh, 0, hd), np.float32) for _ in range(2 * n_layers)]
    names = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    outs = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    feeds = {"input_ids": ids, "image_features": feats, "deepstack_features": deep, "position_ids": pos,
             "attention_mask": np.ones((1, s), np.int64), "logits_index": np.arange(max(s - PREFILL_ROWS, 0), s, dtype=np.int64)[None]}
    res = decoder.run(["logits", *outs], {**feeds, **dict(zip(names, past))})
    prefill, past = res[0], res[1:]
    empty_f = np.zeros((0, feats.shape[1]), np.float32)
    empty_d = np.zeros((deep.shape[0], 0, deep.shape[2]), np.float32)
    step_logits, greedy = [], [int(prefill[0, -1].argmax())]
    for k, tok in enumerate(tokens):
        feeds = {"input_ids": np.asarray([[tok]], np.int64), "image_features": empty_f, "deepstack_features": empty_d,
                 "position_ids": decode_position_ids([s + k], delta), "attention_mask": np.ones((1, s + k + 1), np.int64),
                 "logits_index": np.zeros((1, 1), np.int64)}
        res = decoder.run(["logits", *outs], {**feeds, **dict(zip(names, past))})
        step_logits.append(res[0][:, -1])
        greedy.append(int(res[0][0, -1].argmax()))
        past = res[1:]
    kv = np.concatenate([p.ravel() for p in past])
    return {"image_features": feats, "deepstack_features": deep, "prefill_logits": prefill,
            "decode_logits": np.stack(step_logits), "kv_cache": kv, "greedy": greedy}


def _step_logits(out: dict, k: int) -> np.ndarray:
    """The logits greedy step k picked its token from: the prefill's last row, then decode step k-1's row."""
    return np.asarray(out["prefill_logits"][0, -1] if k == 0 else out["decode_logits"][k - 1][0], np.float64)


def greedy_figures(got: dict, ref: dict) -> dict:
    """Greedy agreement, and which steps could not decide it. At a step where the reference's top-2 margin is at
    most twice the step's max |logit error| (the error measured between the two runs), either token is what this
    precision computes: a tie, not a disagreement. Flat logits (random weights) make most steps ties, and which
    way a tie falls depends on the host's kernels (int8 compute on AMX vs AVX-512): so the agreement on decided
    steps is what is comparable across hosts; a disagreement on a decided step cannot come from rounding alone."""
    pairs = list(zip(got["greedy"], ref["tokens"]))
    ties, flips_decided = [], 0
    for k, (a, b) in enumerate(pairs):
        r, g = _step_logits(ref, k), _step_logits(got, k)
        top2 = np.partition(r, -2)[-2:]
        tie = bool(top2[1] - top2[0] <= 2 * float(np.abs(g - r).max()))
        ties.append(tie)
        flips_decided += int(a != b and not tie)
    decided = len(pairs) - sum(ties)
    agree = sum(a == b for a, b in pairs)
    return {"greedy_agreement": agree / max(len(pairs), 1), "tie_steps": sum(ties), "decided_steps": decided,
            "greedy_agreement_decided": (decided - flips_decided) / decided if decided else None}


def _sessions(out_dir: Path, precision: str, backend: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # Validate what the CPU bundle will run: ONNX Runtime with all its graph optimisations.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    off = list(disabled_optimizers(precision, backend))

    def mk(name: str) -> _Session:
        try:
            return _Session(ort.InferenceSession(str(out_dir / name), so, providers=["CPUExecutionProvider"], disabled_optimizers=off))
        except _ort_not_implemented() as e:  # a kernel missing for the graph's dtype: said, not hidden
            raise CpuCannotRun(f"{name}: {' '.join(str(e).split())[:300]}") from None

    return mk("vision.onnx"), mk("decoder.onnx")


def _ort_not_implemented():
    from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented

    return OrtNotImplemented


def reference_outputs(model, checkpoint: Path, vcfg: VisionGridConfig, dcfg: dict, steps: int = 4, seed: int = 0, *,
                      family) -> list:
    """[(case, reference outputs)] for the validation cases; small enough to keep once the model is gone."""
    return [(case, _reference(model, case, steps)) for case in build_cases(Path(checkpoint), vcfg, dcfg, seed, family=family)]


def compare_with_onnxruntime(out_dir: Path, refs: list, vcfg: VisionGridConfig, dcfg: dict, precision: str = "full",
                             backend: str = "onnxruntime", float64_model: Callable[[], object] | None = None) -> dict:
    """Run `out_dir`'s graphs on the cases of `refs`; returns the figures, raises EgmError on a miss.

    `float64_model` (a callable loading the reference model again) arbitrates a max-abs miss of an fp32-compute
    export (`ARBITRATED`): see `egm_edge.export.arbiter`."""
    if precision not in THRESHOLDS:
        from egm_edge.errors import UnsupportedError

        raise UnsupportedError(f"No validation threshold for precision {precision!r}; export supports: {', '.join(THRESHOLDS)}.")
    threshold = THRESHOLDS[precision]
    t0 = time.perf_counter()
    vision, decoder = _sessions(Path(out_dir), precision, backend)
    steps = len(refs[0][1]["tokens"]) if refs else 0
    report: dict = {"precision": precision, "backend": backend, "threshold": asdict(threshold), "steps": steps, "cases": {}}
    misses, gots = [], []
    for case, ref in refs:
        try:
            got = _ort(vision, decoder, case, ref["tokens"], vcfg, dcfg)
        except _ort_not_implemented() as e:
            raise CpuCannotRun(" ".join(str(e).split())[:300]) from None
        gots.append(got)
        outputs = {k: _metric(got[k], ref[k]) for k in OUTPUTS}
        report["cases"][case.name] = {
            **({"tiles": list(case.tiles)} if case.tiles else {"grids": [list(g) for g in case.grids]}),
            "prompt_tokens": int(case.input_ids.shape[1]),
            "outputs": outputs,
            **greedy_figures(got, ref),
        }
        misses += [(case.name, name, m) for name, m in outputs.items()
                   if not (m["cosine"] >= threshold.cosine and m["rel_max_abs"] <= threshold.rel_max_abs)]
    del vision, decoder
    if misses and float64_model is not None and precision in ARBITRATED and all(m["cosine"] >= threshold.cosine for *_, m in misses):
        from egm_edge.export.arbiter import arbitrate

        report["arbiter"] = arbitrate(misses, refs, gots, float64_model)
        misses = [(c, n, m) for c, n, m in misses if not report["arbiter"][f"{c}/{n}"]["passed"]]
    report["seconds"] = round(time.perf_counter() - t0, 3)
    report["passed"] = not misses
    if misses:
        failures = [f"{c}/{n}: cosine {m['cosine']:.6f} (need >= {threshold.cosine}), max abs err {m['max_abs_err']:.3g} = "
                    f"{m['rel_max_abs']:.3g} of max |ref| (need <= {threshold.rel_max_abs})"
                    + (f", {report['arbiter'][f'{c}/{n}']['export_vs_float64']:.3g} of max |float64| against "
                       f"PyTorch fp32's own {report['arbiter'][f'{c}/{n}']['reference_vs_float64']:.3g}" if f"{c}/{n}" in report.get("arbiter", {}) else "")
                    for c, n, m in misses]
        raise EgmError(f"Exported graphs disagree with the PyTorch reference ({precision}): {'; '.join(failures)}; "
                       "the export was not written, report this with the checkpoint's config.json.")
    return report


def validate_export(out_dir: Path, model, checkpoint: Path, vcfg: VisionGridConfig, dcfg: dict, precision: str = "full",
                    steps: int = 4, seed: int = 0, backend: str = "onnxruntime", *, family) -> dict:
    """`reference_outputs` then `compare_with_onnxruntime`, for callers that keep the model anyway."""
    import copy

    report = compare_with_onnxruntime(out_dir, reference_outputs(model, checkpoint, vcfg, dcfg, steps, seed, family=family), vcfg, dcfg,
                                      precision, backend, float64_model=lambda: copy.deepcopy(model))
    return {**report, "seed": seed}
