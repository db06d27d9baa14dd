"""`egm-edge convert`: an original-layout InternVL checkpoint (OpenGVLab's remote-code layout) into transformers' layout."""

from __future__ import annotations

import argparse

NAME = "convert"
HELP = "Convert an InternVL-3 checkpoint in OpenGVLab's original (remote-code) layout into transformers' layout, which every other stage reads."
ORDER = 15


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="SRC", help="original-layout checkpoint directory (config.json with llm_config)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must be new or empty unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def run(args: argparse.Namespace) -> int:
    from egm_edge.reference.convert import convert_checkpoint

    out = convert_checkpoint(args.checkpoint, args.out, force=args.force)
    print(f"wrote {out} (transformers layout; quantize, ground and validate read it)")
    return 0
