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
    from egm_edge.runtime.settings import MODES, add_think_budget_argument

    src = p.add_mutually_exclusive_group()
    src.add_argument("--bundle", metavar="DIR", help="bundle built by `egm-edge build` (torch-free runtime)")
    src.add_argument("--model", metavar="DIR", help="Qwen3-VL checkpoint directory (default: the embedded model)")
    p.add_argument("--image", required=True, metavar="IMG", help="image file")
    p.add_argument("--expr", required=True, metavar="TEXT", help="referring expression, e.g. 'the red car on the left'")
    add_think_budget_argument(p, "maximum reasoning tokens", "the bundle's; unlimited with --model")
    p.add_argument("--budget-mode", choices=MODES, default="hard",
                   help="how a spent budget closes the reasoning: hard (the closing tag at once) or qwen (Qwen's stop sentence, then the tag) (default: hard)")
    p.add_argument("--task", choices=TASKS, default="vanilla", help="vanilla or amodal grounding (default: vanilla)")
    p.add_argument("--max-new-tokens", type=int, default=4096, metavar="N", help="cap on all output tokens (default: 4096, as EGM)")
    p.add_argument("--max-answer-tokens", type=int, default=128, metavar="N", help="cap on answer tokens after the reasoning closes (default: 128)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype (default: float32)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--draw", metavar="OUT.png", help="save the image with the predicted box drawn")
    p.add_argument("--verify", action="store_true",
                   help="re-hash every bundle file against its manifest (a bundle's first open always does; later opens "
                        "trust files whose size and times are unchanged)")


def _default_model_dir():
    from egm_edge.errors import CheckpointError

    try:
        from egm_edge.assets import default_model_dir
    except ImportError as e:
        raise CheckpointError(f"No --model was given and the embedded default model is not available ({e}); pass --model DIR.") from None
    return default_model_dir()


def run(args: argparse.Namespace) -> int:
    from egm_edge.grounding import user_text
    from egm_edge.runtime.image import load_image
    from egm_edge.runtime.settings import DecodeSettings

    # Everything the user typed is checked before the (slow) model load.
    user_text(args.expr, args.task)
    _check_options(args)
    settings = DecodeSettings(args.think_budget, args.budget_mode, args.max_answer_tokens, args.max_new_tokens)
    image = load_image(args.image)
    kw = dict(task=args.task, settings=settings)
    if args.bundle:
        from egm_edge.runtime.grounder import Grounder

        result = Grounder.open(args.bundle, verify=args.verify).ground(image, args.expr, **kw)
    else:
        from egm_edge.reference.runner import ReferenceRunner

        runner = ReferenceRunner.open(args.model or _default_model_dir(), dtype=args.dtype, device=args.device)
        result = runner.ground(args.image, args.expr, **kw)
    # The result is printed before the drawing is saved, so a drawing that cannot be written loses nothing.
    print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) if args.json else format_result(result), flush=True)
    if args.draw:
        _save_drawing(image, result, args)
    return 0


def _check_options(args: argparse.Namespace) -> None:
    """The options that otherwise fail only after inference, checked before the model loads."""
    import os
    from pathlib import Path

    from egm_edge.errors import InputError

    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    if args.verify and not args.bundle:
        raise InputError("--verify checks a bundle's files against its manifest; pass --bundle DIR with it.")
    if args.draw:
        from PIL import Image

        out = Path(args.draw)
        folder = out.parent
        if out.is_dir():
            raise InputError(f"--draw {out} is a folder; give a file name such as {out / 'box.png'}.")
        if not folder.is_dir():
            raise InputError(f"--draw {out}: the folder {folder} does not exist; create it or choose another path.")
        if not os.access(folder, os.W_OK):
            raise InputError(f"--draw {out}: the folder {folder} is not writable; choose another path.")
        if Image.registered_extensions().get(out.suffix.lower()) not in Image.SAVE:
            raise InputError(f"--draw {out} does not end in an image format Pillow can write; use .png or .jpg.")


def _save_drawing(image, result, args: argparse.Namespace) -> None:
    from egm_edge.errors import InputError
    from egm_edge.runtime.draw import draw_boxes

    try:
        draw_boxes(image, [(result.box, args.expr, (230, 40, 40))]).save(args.draw)
    except (OSError, ValueError) as e:
        raise InputError(f"Could not save --draw {args.draw} ({e}); the result above is complete.") from None


def format_result(r) -> str:
    """Human-readable summary of a GroundingResult."""
    w, h = r.image_size or (0, 0)
    if r.box is not None:
        box = "[" + ", ".join(f"{v:g}" for v in r.box) + "]"
        norm = "[" + ", ".join(f"{v:g}" for v in r.box_norm1000) + "]" if r.box_norm1000 else "-"
        lines = [f"box: {box} px in the {w}x{h} image (0..1000: {norm}, via {r.parse_method})"]
        if r.corners_swapped:
            lines.append("note: the model gave the corners swapped (x2 < x1 or y2 < y1); the box is printed as given and "
                         "scored as EGM scores it (no area), while --draw draws the rectangle it spans")
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
