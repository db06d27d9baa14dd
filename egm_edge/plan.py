"""Memory and latency planner: will this model, at this precision and thinking budget, fit the target, and how fast?

Contract: `plan(spec, target, precision, think_budget, image_wh=...)` (a number of
tokens; `planned_think_budget` turns an unlimited budget into one) returns a
frozen `Plan`: weights by part (quantized language blocks; embeddings, lm_head
and the vision tower unquantized, in 16-bit, fp32 on CPU), the KV cache for
prompt + image tokens + reasoning budget + budget-closing tokens + answer,
activations and runtime overhead against the target's usable memory, a verdict
(fits or not, the largest budget that fits, or the precision / smaller model that
would), and a PREDICTED latency from a roofline: vision and prefill are the
slower of compute (dense peak x compute efficiency) and weight traffic, decode is
bytes read per token / (bandwidth x decode efficiency) plus a fixed cost per
layer. The efficiency factors are calibrated per device kind against published
measurements (`KIND_CALIBRATION`, `PUBLISHED_DECODE`) and say so in every output;
predictions are never labelled as measurements. Unsupported precisions raise
`UnsupportedError` naming the alternatives. Pure Python (+ the runtime's
smart-resize, which imports numpy/pillow).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from egm_edge.errors import InputError
from egm_edge.models import ModelSpec, get_spec, list_specs, same_architecture
from egm_edge.models.registry import alias_of
from egm_edge.targets import KV_DTYPES, PRECISIONS, TargetProfile, check_kv_dtype, check_servable, load_target

GIB = 1024**3
DEFAULT_IMAGE_WH = (640, 480)
DEFAULT_PROMPT_TOKENS = 40  # chat template + "Locate ..., output its bbox coordinates using JSON format" (36 with a 10-word expression)
DEFAULT_ANSWER_TOKENS = 48  # the fenced bbox_2d JSON answer and <|im_end|> (Qwen tokenizer)
BUDGET_CLOSE_TOKENS = 23  # Qwen's "Considering the limited time ... directly now.\n</think>\n\n" (Qwen tokenizer)
PREDICTED = "predicted (roofline x calibrated efficiency), not measured"


@dataclass(frozen=True)
class Calibration:
    """How close to the roofline a device kind gets, and where that number comes from."""

    decode_efficiency: float  # achieved / peak memory bandwidth while decoding one token
    compute_efficiency: float  # achieved / dense peak for the vision tower and prefill
    layer_overhead_us: float  # fixed cost per decoder layer per token (kernel launches, syncs)
    source: str
    # Measured decode throughput (GOPS, 2 x MACs per token / time) of precisions whose decode is bound by
    # their kernels rather than by memory (CPU low-bit GEMV dequantises on the fly); replaces peak x
    # compute_efficiency for decoding those precisions.
    decode_gops: dict[str, float] = field(default_factory=dict)


# Jetson (Orin): least-squares fit (log error) of the decode model to TensorRT Edge-LLM v0.10's runtime
# dashboard, batch 1, Qwen3-VL-2B/4B/8B INT4 AWQ on AGX Orin 64GB (98.9/54.7/32.1 tok/s), Orin NX 16GB
# (58.5/31.7/18.4) and Orin Nano 8GB (2B: 36.1): efficiency 0.90 and 95 us per layer, worst point 8% off;
# the issue's quoted figures (4B 52.4 AGX, 31.2 NX; 2B 36.9 Nano) are the check. Compute efficiency 0.57 is
# the geometric mean of the same page's ViT (260-265 image tokens: 36.2/53.0 ms AGX, 77.1/110.5 NX, 141.3
# Nano) and 292-token prefill times (0.48..0.69 of the dense FP16 peak). Thor has its own fit in its TOML.
# GPU: the nearest published batch-1 data for a discrete-class CUDA GPU are Edge-LLM v0.10's DGX Spark
# (GB10) llm_bench rows (Qwen3-VL-2B/4B/8B INT4 AWQ, 2048-token KV: 133.9/73.6/42.4 tok/s): efficiency
# 0.81 and 10 us per layer fit all three within 1%; compute efficiency 0.5 is ASSUMED, not calibrated.
# CPU: the CPU bundles' own decode rates on the dev machine (benchmarks/cpu_decode_vs_plan.py), as cpu.toml
# records them; CPU_MEASURED_DECODE below keeps the planner honest against them.
KIND_CALIBRATION: dict[str, Calibration] = {
    "jetson": Calibration(0.90, 0.57, 95.0, "fit to TensorRT Edge-LLM v0.10 published batch-1 decode, ViT and prefill times on Jetson AGX Orin / Orin NX / Orin Nano"),
    "gpu": Calibration(0.81, 0.5, 10.0, "decode fit to TensorRT Edge-LLM v0.10 batch-1 rates on DGX Spark (GB10); compute efficiency assumed, not calibrated"),
    "cpu": Calibration(0.63, 0.22, 0.0, "CPU bundle decode rates measured on the 2-core dev machine (benchmarks/cpu_decode_vs_plan.py); SGEMM efficiency from numpy"),
}


@dataclass(frozen=True)
class PublishedDecode:
    """A published batch-1 decode rate the calibration is checked against (tests keep it within 25%)."""

    model: str
    target: str
    precision: str
    tokens_per_s: float
    context: int  # tokens in the KV cache while decoding (prefill + about half the generated tokens)
    source: str


_EDGE_LLM = "TensorRT Edge-LLM v0.10 runtime dashboard (docs/source/user_guide/performance/performance-benchmarks.md)"
_ISSUE = "TensorRT Edge-LLM figures quoted in issue 7"
PUBLISHED_DECODE: tuple[PublishedDecode, ...] = (
    PublishedDecode("egm-4b", "jetson-agx-orin-64gb", "int4_awq", 52.4, 420, _ISSUE),
    PublishedDecode("egm-4b", "jetson-orin-nx-16gb", "int4_awq", 31.2, 420, _ISSUE),
    PublishedDecode("egm-2b", "jetson-orin-nano-8gb", "int4_awq", 36.9, 420, _ISSUE),
    *(PublishedDecode(m, t, "int4_awq", r, 420, _EDGE_LLM) for m, t, r in (
        ("egm-2b", "jetson-agx-orin-64gb", 98.9), ("egm-4b", "jetson-agx-orin-64gb", 54.7), ("egm-8b", "jetson-agx-orin-64gb", 32.1),
        ("egm-2b", "jetson-orin-nx-16gb", 58.5), ("egm-4b", "jetson-orin-nx-16gb", 31.7), ("egm-8b", "jetson-orin-nx-16gb", 18.4),
        ("egm-2b", "jetson-orin-nano-8gb", 36.1),
        ("egm-2b", "jetson-thor", 151.1), ("egm-4b", "jetson-thor", 82.8), ("egm-8b", "jetson-thor", 48.5),
    )),
)


# What the CPU bundles measured (benchmarks/cpu_decode_vs_plan.py --threads 1, dev machine, 2026-11-22): a random
# Qwen3-VL with text hidden 1024, 8 layers, 8/4 heads of 128, intermediate 4096, vocabulary 525, tied; 255
# tokens of context; ms per decoded token. Tests keep the cpu target's predictions within 25% of them.
CPU_BENCH_TEXT = {"layers": 8, "hidden": 1024, "heads": 8, "kv_heads": 4, "head_dim": 128, "intermediate": 4096,
                  "vocab": 525, "tied_embeddings": True, "mrope_section": (24, 20, 20)}
CPU_MEASURED_DECODE = {"fp32": 27.5, "int4_awq": 16.9, "int8_sq": 201.0}
CPU_BENCH_CONTEXT = 255


def calibration_for(target: TargetProfile) -> Calibration:
    """The kind's calibration, with any fields the target's TOML [calibration] table overrides."""
    base = KIND_CALIBRATION[target.kind]
    over: dict = {k: float(v) for k, v in target.calibration.items() if k in ("decode_efficiency", "compute_efficiency", "layer_overhead_us")}
    gops = target.calibration.get("decode_gops")
    if isinstance(gops, dict) and gops:
        over["decode_gops"] = {str(k): float(v) for k, v in gops.items()}
    if not over:
        return base
    return replace(base, **over, source=f"{base.source}; {', '.join(sorted(over))} from {target.name}.toml [calibration]")


# ---- image tokens ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageGrid:
    resized_wh: tuple[int, int]  # what the vision tower sees (per tile for InternVL)
    tiles: int  # InternVL tiles incl. thumbnail; 1 for Qwen
    vit_tokens_per_tile: int  # ViT sequence length of one attention window
    image_tokens: int  # placeholder tokens the LLM reads


def _internvl_tiles(width: int, height: int, max_tiles: int, thumbnail: bool) -> int:
    """InternVL's dynamic tiling: the (cols, rows) grid of aspect ratio closest to the image's."""
    aspect = width / height
    grids = sorted({(i, j) for n in range(1, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1) if i * j <= max_tiles},
                   key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * 448 * 448 * cols * rows:
            best = (cols, rows)  # a tie goes to the larger grid when the image has the pixels for it
    n = best[0] * best[1]
    return n + 1 if thumbnail and n > 1 else n


def image_grid(spec: ModelSpec, width: int, height: int) -> ImageGrid:
    """How many ViT and LLM tokens one `width` x `height` image costs this model."""
    from egm_edge.runtime.preprocess import smart_resize  # the runtime's exact HF arithmetic

    v = spec.vision
    if v.tiled:
        per_side = v.image_size // v.patch
        tiles = _internvl_tiles(width, height, v.max_tiles, v.thumbnail)
        seq = per_side * per_side + (1 if v.class_token else 0)
        return ImageGrid((v.image_size, v.image_size), tiles, seq, tiles * (per_side // v.merge) ** 2)
    h, w = smart_resize(height, width, factor=v.patch * v.merge, min_pixels=v.min_pixels, max_pixels=v.max_pixels)
    patches = (h // v.patch) * (w // v.patch)
    return ImageGrid((w, h), 1, patches, patches // (v.merge * v.merge))


# ---- the plan -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    """Predicted milliseconds per phase (see PREDICTED); `bound` says which roofline limit won."""

    vision_ms: float
    prefill_ms: float
    decode_ms_per_token: float  # at the mean context of the thinking phase
    think_ms: float
    answer_ms: float  # budget-closing tokens + answer
    total_ms: float
    bound: dict[str, str]

    @property
    def decode_tokens_per_s(self) -> float:
        return 1000.0 / self.decode_ms_per_token


@dataclass(frozen=True)
class Plan:
    model: str
    family: str
    target: str
    precision: str
    kv_dtype: str
    unquantized_dtype: str  # embeddings, lm_head and the vision tower
    think_budget: int
    image_wh: tuple[int, int]
    image: ImageGrid
    prompt_tokens: int
    answer_tokens: int
    close_tokens: int
    weights: dict[str, int]  # bytes per part
    kv_cache_bytes: int
    activation_bytes: int
    overhead_bytes: int
    usable_bytes: int
    fits: bool
    max_think_budget: int | None  # largest budget that fits (None: not even 0 does)
    verdict: str
    alternatives: tuple[str, ...]
    latency: Latency
    calibration: Calibration

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.image.image_tokens + self.think_budget + self.close_tokens + self.answer_tokens

    @property
    def total_bytes(self) -> int:
        return sum(self.weights.values()) + self.kv_cache_bytes + self.activation_bytes + self.overhead_bytes

    def to_dict(self) -> dict[str, Any]:
        gib = lambda b: round(b / GIB, 4)  # noqa: E731
        lat = self.latency
        return {
            "model": self.model, "family": self.family, "target": self.target, "precision": self.precision,
            "kv_dtype": self.kv_dtype, "unquantized_dtype": self.unquantized_dtype, "think_budget": self.think_budget,
            "image_wh": list(self.image_wh), "image": {**asdict(self.image), "resized_wh": list(self.image.resized_wh)},
            "tokens": {"prompt": self.prompt_tokens, "image": self.image.image_tokens, "think_budget": self.think_budget,
                       "budget_close": self.close_tokens, "answer": self.answer_tokens, "context": self.context_tokens},
            "memory_gib": {**{k: gib(v) for k, v in self.weights.items()}, "kv_cache": gib(self.kv_cache_bytes),
                           "activations": gib(self.activation_bytes), "runtime_overhead": gib(self.overhead_bytes),
                           "total": gib(self.total_bytes), "usable": gib(self.usable_bytes)},
            "fits": self.fits, "max_think_budget": self.max_think_budget, "verdict": self.verdict,
            "alternatives": list(self.alternatives),
            "predicted_latency": {
                "label": PREDICTED, "vision_ms": round(lat.vision_ms, 2), "prefill_ms": round(lat.prefill_ms, 2),
                "decode_ms_per_token": round(lat.decode_ms_per_token, 3), "decode_tokens_per_s": round(lat.decode_tokens_per_s, 2),
                "think_ms": round(lat.think_ms, 1), "answer_ms": round(lat.answer_ms, 1), "total_ms": round(lat.total_ms, 1),
                "bound": dict(lat.bound),
            },
            "calibration": asdict(self.calibration),
        }


def _resolve(spec: ModelSpec | str, target: TargetProfile | str) -> tuple[ModelSpec, TargetProfile]:
    return (get_spec(spec) if isinstance(spec, str) else spec), (load_target(target) if isinstance(target, str) else target)


def _bytes(n: int | float, per: float) -> int:
    return int(math.ceil(n * per))


class _Model:
    """The byte and FLOP counts of one (spec, target, precision) that every phase needs."""

    def __init__(self, spec: ModelSpec, target: TargetProfile, precision: str, kv_dtype: str) -> None:
        p = PRECISIONS[precision]
        self.spec, self.target, self.precision = spec, target, precision
        self.base = "bf16" if precision == "bf16" else target.unquantized_dtype
        base = KV_DTYPES[self.base]
        params = spec.params()
        self.weights = {
            "embeddings": _bytes(params["embeddings"].total, base),
            "language_blocks": _bytes(params["language_blocks"].matmul, p.bytes_per_weight) + _bytes(params["language_blocks"].other, base),
            "lm_head": _bytes(params["lm_head"].total, base),
            "vision_blocks": _bytes(params["vision_blocks"].total, base),
            "mergers": _bytes(params["mergers"].total, base),
        }
        t = spec.text
        # Decoding reads every block weight and the whole head (the tied table too) once per token.
        self.decode_weight_bytes = self.weights["language_blocks"] + _bytes(t.vocab * t.hidden, base)
        self.kv_per_token = t.kv_elements_per_token() * KV_DTYPES[kv_dtype]
        self.lm_matmul = params["language_blocks"].matmul
        self.head_flops = 2 * t.vocab * t.hidden
        self.attn_flops_per_ctx = 4 * t.layers * t.heads * t.head_dim  # QK^T and AV, per token per cached token
        self.vision_bytes = self.weights["vision_blocks"] + self.weights["mergers"]
        self.vision_matmul = params["vision_blocks"].matmul
        self.merger_matmul = params["mergers"].matmul
        self.compute = target.compute_format(precision)
        self.vision_compute = self.base
        self.act_bytes = KV_DTYPES[self.base]
        self.cal = calibration_for(target)

    def _roofline_ms(self, flops: float, nbytes: float, compute: str) -> tuple[float, str]:
        t_compute = flops / (self.target.peak(compute) * 1e12 * self.cal.compute_efficiency) * 1e3
        t_memory = nbytes / (self.target.memory_bandwidth_gbs * 1e9 * self.cal.decode_efficiency) * 1e3
        return (t_compute, "compute") if t_compute >= t_memory else (t_memory, "memory")

    def vision(self, grid: ImageGrid) -> tuple[float, str]:
        v = self.spec.vision
        seq, tiles = grid.vit_tokens_per_tile, grid.tiles
        stem = 2 * v.in_channels * v.temporal_patch * v.patch * v.patch * v.hidden
        per_tile = seq * (2 * self.vision_matmul + stem) + 4 * v.depth * v.hidden * seq * seq  # blocks + attention
        flops = tiles * per_tile + 2 * grid.image_tokens * self.merger_matmul  # every merger sees every image token
        return self._roofline_ms(flops, self.vision_bytes, self.vision_compute)

    def prefill(self, n: int) -> tuple[float, str]:
        flops = 2 * n * self.lm_matmul + self.attn_flops_per_ctx * n * n / 2 + self.head_flops
        ms, bound = self._roofline_ms(flops, self.decode_weight_bytes + self.kv_per_token * n, self.compute)
        return ms + self.spec.text.layers * self.cal.layer_overhead_us / 1e3, bound

    def decode_flops(self, context: float) -> float:
        """Operations of one decoded token: every block and the head, attention over `context` cached tokens."""
        return 2 * self.lm_matmul + self.head_flops + self.attn_flops_per_ctx * context

    def decode(self, context: float) -> tuple[float, str]:
        flops = self.decode_flops(context)
        ms, bound = self._roofline_ms(flops, self.decode_weight_bytes + self.kv_per_token * context, self.compute)
        gops = self.cal.decode_gops.get(self.precision)
        kernel_ms = flops / (gops * 1e9) * 1e3 if gops else 0.0
        if kernel_ms > ms:
            ms, bound = kernel_ms, "kernel"
        return ms + self.spec.text.layers * self.cal.layer_overhead_us / 1e3, bound

    def activations(self, grid: ImageGrid, prefill_tokens: int) -> int:
        """Peak transient buffers: the larger of the vision pass and the prefill pass."""
        t, v = self.spec.text, self.spec.vision
        unfused = self.target.kind == "cpu"  # ONNX Runtime on CPU materialises attention scores
        n = prefill_tokens
        lm = n * max(2 * t.hidden + (2 * t.heads + 2 * t.kv_heads) * t.head_dim, 2 * t.hidden + 3 * t.intermediate)
        lm = lm * self.act_bytes + t.vocab * 4 + (t.heads * n * n * 4 if unfused else 0)
        seq = grid.vit_tokens_per_tile
        vis = grid.tiles * seq * max(6 * v.hidden, 2 * v.hidden + 2 * v.intermediate) * self.act_bytes
        vis += (1 + len(v.deepstack)) * grid.image_tokens * v.out_hidden * self.act_bytes
        vis += v.heads * seq * seq * 4 if unfused else 0
        return int(max(lm, vis))


def decode_ms_per_token(spec: ModelSpec | str, target: TargetProfile | str, precision: str, context: int, kv_dtype: str | None = None) -> float:
    """Predicted milliseconds for one decoded token with `context` tokens already cached."""
    spec, target = _resolve(spec, target)
    check_servable(target, precision)  # a checkpoint-only precision is predicted as TensorRT-LLM serves it
    kv = kv_dtype or _default_kv(target, precision)
    return _Model(spec, target, precision, kv).decode(context)[0]


def _default_kv(target: TargetProfile, precision: str) -> str:
    return "bf16" if precision == "bf16" else target.kv_dtypes()[0]


def plan(
    spec: ModelSpec | str,
    target: TargetProfile | str,
    precision: str,
    think_budget: int,
    image_wh: tuple[int, int] = DEFAULT_IMAGE_WH,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    answer_tokens: int = DEFAULT_ANSWER_TOKENS,
    kv_dtype: str | None = None,
    close_tokens: int = BUDGET_CLOSE_TOKENS,
    explore: bool = True,
) -> Plan:
    """Memory verdict and predicted latency (see the module docstring); `explore` looks for alternatives."""
    spec, target = _resolve(spec, target)
    check_servable(target, precision)  # a checkpoint-only precision is predicted as TensorRT-LLM serves it
    kv = kv_dtype or _default_kv(target, precision)
    check_kv_dtype(target, kv)
    for name, v in (("think_budget", think_budget), ("prompt_tokens", prompt_tokens), ("answer_tokens", answer_tokens), ("close_tokens", close_tokens)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise InputError(f"{name}={v!r} must be a non-negative whole number of tokens.")
    w, h = image_wh
    if w < 1 or h < 1:
        raise InputError(f"Image size {w}x{h} has an empty side; pass WxH with both sides positive.")
    m = _Model(spec, target, precision, kv)
    grid = image_grid(spec, w, h)
    fixed_tokens = prompt_tokens + grid.image_tokens + close_tokens + answer_tokens
    context = spec.text.max_positions
    if fixed_tokens + think_budget > context:
        fix = (f"pass a think budget of at most {context - fixed_tokens:,}" if fixed_tokens <= context
               else "use a smaller image or fewer prompt tokens")
        raise InputError(f"A think budget of {think_budget:,} tokens plus {fixed_tokens:,} for the prompt, the {w}x{h} image, "
                         f"the budget close and the answer needs {fixed_tokens + think_budget:,} tokens, past {spec.name}'s "
                         f"maximum context of {context:,} tokens; {fix}.")
    n_prefill = prompt_tokens + grid.image_tokens
    act = m.activations(grid, n_prefill)
    overhead = int(target.runtime_overhead_gib * GIB)
    usable = int(target.usable_gib * GIB)
    static = sum(m.weights.values()) + act + overhead + m.kv_per_token * fixed_tokens
    room = usable - static
    by_positions = spec.text.max_positions - fixed_tokens
    max_budget = None if room < 0 or by_positions < 0 else min(room // m.kv_per_token, by_positions)
    fits = max_budget is not None and think_budget <= max_budget

    vision_ms, vb = m.vision(grid)
    prefill_ms, pb = m.prefill(n_prefill)
    decode_ms, db = m.decode(n_prefill + think_budget / 2)
    tail = close_tokens + answer_tokens
    answer_ms = tail * m.decode(n_prefill + think_budget + tail / 2)[0]
    latency = Latency(vision_ms, prefill_ms, decode_ms, think_budget * decode_ms, answer_ms,
                      vision_ms + prefill_ms + think_budget * decode_ms + answer_ms, {"vision": vb, "prefill": pb, "decode": db})
    base = Plan(
        spec.name, spec.family, target.name, precision, kv, m.base, think_budget, (w, h), grid, prompt_tokens, answer_tokens,
        close_tokens, m.weights, m.kv_per_token * (fixed_tokens + think_budget), act, overhead, usable, fits, max_budget, "", (),
        latency, m.cal,
    )
    verdict, alternatives = _verdict(base, spec, target, explore, dict(image_wh=(w, h), prompt_tokens=prompt_tokens,
                                                                      answer_tokens=answer_tokens, close_tokens=close_tokens))
    return replace(base, verdict=verdict, alternatives=alternatives)


def planned_think_budget(spec: ModelSpec | str, think_budget, image_wh: tuple[int, int] = DEFAULT_IMAGE_WH,
                         prompt_tokens: int = DEFAULT_PROMPT_TOKENS, answer_tokens: int = DEFAULT_ANSWER_TOKENS,
                         close_tokens: int = BUDGET_CLOSE_TOKENS) -> tuple[int, str | None]:
    """The reasoning tokens a plan reserves for a parsed think budget, and a sentence when that is not what was typed.

    A number is itself. UNLIMITED has no number, so it is planned at all the model's context window holds
    after the prompt, the image, the budget close and the answer, and the sentence says so; None (not
    given) is a caller's bug here: apply the default first.
    """
    from egm_edge.runtime.settings import UNLIMITED, parse_think_budget

    spec = get_spec(spec) if isinstance(spec, str) else spec
    budget = parse_think_budget(think_budget)
    if budget is None:
        raise ValueError("planned_think_budget needs a budget; apply the default before planning")
    if budget != UNLIMITED:
        return budget, None
    w, h = image_wh
    fixed = prompt_tokens + image_grid(spec, w, h).image_tokens + close_tokens + answer_tokens
    n = max(spec.text.max_positions - fixed, 0)
    return n, (f"Think budget unlimited: planning for {n} reasoning tokens, all that {spec.name}'s {spec.text.max_positions}-token "
               f"context window holds after the prompt, a {w}x{h} image, the budget close and the answer; "
               "pass --think-budget N to plan for fewer.")


def _gib(b: int | float) -> str:
    return f"{b / GIB:.1f} GiB"


def _verdict(p: Plan, spec: ModelSpec, target: TargetProfile, explore: bool, kw: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    need = f"{_gib(p.total_bytes)} of {_gib(p.usable_bytes)} usable"
    if p.fits:
        limit = " (the context window's limit)" if p.max_think_budget == spec.text.max_positions - (p.context_tokens - p.think_budget) else ""
        return f"fits: {need}; largest think budget that fits: {p.max_think_budget}{limit}", ()
    if p.max_think_budget is not None:
        head = f"does not fit: {need}; the largest think budget that fits is {p.max_think_budget}"
    else:
        head = f"does not fit: {need}, even with no thinking"
    if not explore:
        return head, ()
    alts = []
    here = PRECISIONS[p.precision].bytes_per_weight
    for name in sorted(target.precisions, key=lambda n: -PRECISIONS[n].bytes_per_weight):
        if PRECISIONS[name].bytes_per_weight < here:
            q = plan(spec, target, name, p.think_budget, explore=False, **kw)
            if q.fits:
                alts.append(f"{name} fits ({_gib(q.total_bytes)} of {_gib(q.usable_bytes)}; largest think budget {q.max_think_budget})")
                break
    if not alts:  # a smaller model of the family, least-compressed precision first
        smaller = [get_spec(n) for n in list_specs() if n != "tiny"]
        smaller = sorted((s for s in smaller if s.family == spec.family and s.total_params() < spec.total_params()
                          and not same_architecture(s, spec)), key=lambda s: -s.total_params())
        for s in smaller:
            for name in sorted(target.precisions, key=lambda n: -PRECISIONS[n].bytes_per_weight):
                try:
                    q = plan(s, target, name, p.think_budget, explore=False, **kw)
                except InputError:  # the budget is past this smaller model's context: not an alternative
                    break
                if q.fits:
                    alts.append(f"{s.name} ({alias_of(s)}) with {name} fits ({_gib(q.total_bytes)} of {_gib(q.usable_bytes)}; "
                                f"largest think budget {q.max_think_budget})")
                    break
            if alts:
                break
    if not alts and p.max_think_budget is None:
        alts.append(f"nothing in the {spec.family} registry fits {target.name} with a {p.think_budget}-token budget")
    return head, tuple(alts)


def auto_effective_bits(spec: ModelSpec | str, target: TargetProfile | str, think_budget: int,
                        image_wh: tuple[int, int] = DEFAULT_IMAGE_WH, block: int | None = 128) -> tuple[float, dict[str, int]]:
    """(bits, {"usable_bytes", "other_bytes"}): the most effective bits recipe auto may spend on the language model's Linear weights (INT4 block
    scales counted) for `spec` to still fit `target` with `think_budget` reasoning tokens: the plan's usable memory
    less everything else it holds ("other_bytes": embeddings, head, vision, KV cache, activations, overhead), at most
    16. UnsupportedError when not even all-INT4 fits."""
    from egm_edge.errors import UnsupportedError

    spec, target = _resolve(spec, target)
    p = plan(spec, target, "auto", think_budget, image_wh=image_wh, explore=False)
    matmul = spec.params()["language_blocks"].matmul
    rest = p.total_bytes - _bytes(matmul, PRECISIONS["auto"].bytes_per_weight)
    scale_bits = 16 / block if block else 0.0
    bits = 8 * (p.usable_bytes - rest) / matmul - scale_bits
    if bits < 4:
        raise UnsupportedError(f"{spec.name} does not fit {target.name} with a {think_budget}-token think budget even with every "
                               f"language-model Linear in INT4 ({(rest + matmul * (4 + scale_bits) / 8) / GIB:.1f} GiB of "
                               f"{p.usable_bytes / GIB:.1f} GiB usable); lower the think budget or choose a larger target.")
    return min(16.0, math.floor(bits * 100) / 100), {"usable_bytes": p.usable_bytes, "other_bytes": rest}
