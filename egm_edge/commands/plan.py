"""`egm-edge plan`: memory verdict and predicted latency of a model on a target (see egm_edge.plan)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

NAME = "plan"
HELP = "Will a model fit a target at a precision and thinking budget, and how fast (predicted)?"
ORDER = 40

_PARTS = {
    "embeddings": "embeddings", "language_blocks": "language blocks", "lm_head": "lm_head",
    "vision_blocks": "vision blocks", "mergers": "vision mergers",
}


def register(p: argparse.ArgumentParser) -> None:
    from egm_edge.models import choices
    from egm_edge.targets import PRECISIONS, list_targets

    p.add_argument("--model", required=True, help=f"checkpoint directory (config.json) or one of: {', '.join(choices())}")
    p.add_argument("--target", required=True, help=f"target profile name or .toml file; shipped: {', '.join(list_targets())}")
    p.add_argument("--precision", required=True, help=f"one of: {', '.join(PRECISIONS)}")
    from egm_edge.runtime.settings import add_think_budget_argument

    add_think_budget_argument(p, "reasoning tokens before the answer is forced (none: planned at all the context window holds)",
                              "", required=True)
    p.add_argument("--image", default="640x480", metavar="WxH", help="image size in pixels (default 640x480)")
    p.add_argument("--prompt-tokens", type=int, default=None, metavar="N", help="text tokens of the prompt besides the image")
    p.add_argument("--answer-tokens", type=int, default=None, metavar="N", help="tokens of the JSON answer")
    p.add_argument("--kv-dtype", default=None, help="KV-cache dtype (default: fp16 on GPUs/Jetsons, fp32 on CPU)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _image(text: str) -> tuple[int, int]:
    from egm_edge.errors import InputError

    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise InputError(f"--image {text!r} is not WIDTHxHEIGHT in pixels; pass e.g. 640x480.")
    return int(m.group(1)), int(m.group(2))


def _model(text: str):
    from egm_edge.models import get_spec, spec_from_config

    path = Path(text)
    return spec_from_config(path) if path.exists() else get_spec(text)


def render(p) -> str:
    """The plan as a table for people; every latency is labelled as a prediction."""
    from egm_edge.plan import GIB, PREDICTED

    gib = lambda b: f"{b / GIB:8.2f}"  # noqa: E731
    lat = p.latency
    iw, ih = p.image_wh
    rw, rh = p.image.resized_wh
    tiles = f", {p.image.tiles} tiles" if p.image.tiles > 1 else ""
    lines = [
        f"{p.model} on {p.target}: {p.precision}, think budget {p.think_budget}, image {iw}x{ih} -> {rw}x{rh}{tiles} "
        f"({p.image.image_tokens} image tokens)",
        "",
        f"  {'memory':<44}{'GiB':>8}",
    ]
    for part, label in _PARTS.items():
        dtype = p.precision if part == "language_blocks" else p.unquantized_dtype
        if p.weights[part]:
            lines.append(f"  {label + ' (' + dtype + ')':<44}{gib(p.weights[part])}")
    lines += [
        f"  {f'KV cache ({p.kv_dtype}, {p.context_tokens} tokens)':<44}{gib(p.kv_cache_bytes)}",
        f"  {'activations':<44}{gib(p.activation_bytes)}",
        f"  {'runtime overhead':<44}{gib(p.overhead_bytes)}",
        f"  {'total':<44}{gib(p.total_bytes)}",
        f"  {'usable on ' + p.target:<44}{gib(p.usable_bytes)}",
        "",
        f"verdict: {p.verdict}",
        *[f"  instead: {a}" for a in p.alternatives],
        "",
        f"latency, {PREDICTED}:",
        f"  {'vision encoder':<44}{lat.vision_ms:10.1f} ms  ({lat.bound['vision']}-bound)",
        f"  {f'prefill ({p.prompt_tokens + p.image.image_tokens} tokens)':<44}{lat.prefill_ms:10.1f} ms  ({lat.bound['prefill']}-bound)",
        f"  {'decode per token':<44}{lat.decode_ms_per_token:10.2f} ms  ({lat.decode_tokens_per_s:.1f} tok/s, {lat.bound['decode']}-bound)",
        f"  {f'thinking ({p.think_budget} tokens)':<44}{lat.think_ms:10.1f} ms",
        f"  {f'answer ({p.close_tokens + p.answer_tokens} tokens incl. budget close)':<44}{lat.answer_ms:10.1f} ms",
        f"  {'total (predicted)':<44}{lat.total_ms:10.1f} ms",
        "",
        f"calibration: decode efficiency {p.calibration.decode_efficiency}, compute efficiency "
        f"{p.calibration.compute_efficiency}, {p.calibration.layer_overhead_us:g} us/layer; {p.calibration.source}",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from egm_edge.plan import DEFAULT_ANSWER_TOKENS, DEFAULT_PROMPT_TOKENS, plan, planned_think_budget

    spec = _model(args.model)
    tokens = dict(image_wh=_image(args.image),
                  prompt_tokens=DEFAULT_PROMPT_TOKENS if args.prompt_tokens is None else args.prompt_tokens,
                  answer_tokens=DEFAULT_ANSWER_TOKENS if args.answer_tokens is None else args.answer_tokens)
    budget, note = planned_think_budget(spec, args.think_budget, **tokens)
    p = plan(spec, args.target, args.precision, budget, kv_dtype=args.kv_dtype, **tokens)
    if args.json:
        print(json.dumps({**p.to_dict(), **({"think_budget_note": note} if note else {})}, indent=2))
    else:
        print("\n".join([note, render(p)] if note else [render(p)]))
    return 0
