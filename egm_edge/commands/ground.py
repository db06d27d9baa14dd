"""`egm-edge ground`: ground one referring expression in one image, with a bundle or a checkpoint.

With `--bundle DIR` it runs the torch-free runtime (`egm_edge.runtime.Grounder`);
otherwise the PyTorch reference runner (`egm_edge.reference.ReferenceRunner`) on a
Qwen3-VL checkpoint directory (default: the embedded model). It prints the box in pixels of
the original image, the raw output, think/answer token counts, whether the budget
closed the reasoning, and timings. Bad input (missing/corrupt image, empty or huge
expression, wrong checkpoint) is one sentence and exit status 2, checked before the
model loads.
"""

from __future__ import annotations

import argparse
import json

NAME = "ground"
HELP = "Ground a referring expression in an image with a bundle (runtime) or a Qwen3-VL checkpoint (PyTorch reference)."
ORDER = 10


def register(p: argparse.ArgumentParser) -> None:
    from egm_edge.grounding import TASKS
    from egm_edge.reference.runner import DTYPES
    from egm_edge.runtime.budget import MODES

    src = p.add_mutually_exclusive_group()
    src.add_argument("--bundle", metavar="DIR", help="bundle built by `egm-edge build` (torch-free runtime)")
    src.add_argument("--model", metavar="DIR", help="Qwen3-VL checkpoint directory (default: the embedded model)")
    p.add_argument("--image", required=True, metavar="IMG", help="image file")
    p.add_argument("--expr", required=True, metavar="TEXT", help="referring expression, e.g. 'the red car on the left'")
    p.add_argument("--think-budget", type=int, default=None, metavar="N",
                   help="maximum reasoning tokens; 0 answers at once (default: unlimited)")
    p.add_argument("--budget-mode", choices=MODES, default="hard",
                   help="how a spent budget closes the reasoning: hard '</think>' or Qwen's stop sentence (default: hard)")
    p.add_argument("--task", choices=TASKS, default="vanilla", help="vanilla or amodal grounding (default: vanilla)")
    p.add_argument("--max-new-tokens", type=int, default=4096, metavar="N", help="cap on all output tokens (default: 4096, as EGM)")
    p.add_argument("--max-answer-tokens", type=int, default=128, metavar="N", help="cap on tokens after '</think>' (default: 128)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype (default: float32)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--draw", metavar="OUT.png", help="save the image with the predicted box drawn")


def _default_model_dir():
    from egm_edge.errors import CheckpointError

    try:
        from egm_edge.assets import default_model_dir
    except ImportError as e:
        raise CheckpointError(f"No --model was given and the embedded default model is not available ({e}); pass --model DIR.") from None
    return default_model_dir()


def run(args: argparse.Namespace) -> int:
    from egm_edge.grounding import user_text
    from egm_edge.runtime.budget import BudgetSpec
    from egm_edge.runtime.image import load_image

    # Everything the user typed is checked before the (slow) model load.
    user_text(args.expr, args.task)
    BudgetSpec(args.think_budget, args.budget_mode, args.max_answer_tokens)
    image = load_image(args.image)
    kw = dict(think_budget=args.think_budget, task=args.task, budget_mode=args.budget_mode,
              max_new_tokens=args.max_new_tokens, max_answer_tokens=args.max_answer_tokens)
    if args.bundle:
        from egm_edge.runtime.grounder import Grounder

        result = Grounder.open(args.bundle).ground(image, args.expr, **kw)
    else:
        from egm_edge.reference.runner import ReferenceRunner

        runner = ReferenceRunner.open(args.model or _default_model_dir(), dtype=args.dtype, device=args.device)
        result = runner.ground(args.image, args.expr, **kw)
    if args.draw:
        from egm_edge.runtime.draw import draw_boxes

        draw_boxes(image, [(result.box, args.expr, (230, 40, 40))]).save(args.draw)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
        return 0
    print(format_result(result))
    return 0


def format_result(r) -> str:
    """Human-readable summary of a GroundingResult."""
    w, h = r.image_size or (0, 0)
    if r.box is not None:
        box = "[" + ", ".join(f"{v:g}" for v in r.box) + "]"
        norm = "[" + ", ".join(f"{v:g}" for v in r.box_norm1000) + "]" if r.box_norm1000 else "-"
        lines = [f"box: {box} px in the {w}x{h} image (0..1000: {norm}, via {r.parse_method})"]
    else:
        reason = r.parse_reason or "no box was found"
        lines = [f"box: {reason}" if reason.startswith("no box") else f"box: none ({reason})"]
    budget = "yes, the budget closed the reasoning" if r.budget_forced else "no"
    lines.append(f"think tokens: {r.think_tokens}   answer tokens: {r.answer_tokens}   budget forced: {budget}")
    t = r.timings
    order = [("preprocess", "preprocess"), ("vision", "vision"), ("prefill", "prefill"), ("decode", "decode"), ("total", "total")]
    parts = [f"{label} {t[k]:.1f}" for k, label in order if k in t]
    if "ms_per_token" in t:
        parts.append(f"{t['ms_per_token']:.2f} per output token")
    lines.append("timings (ms): " + ", ".join(parts))
    lines.append("output:")
    lines.append(r.text)
    return "\n".join(lines)
