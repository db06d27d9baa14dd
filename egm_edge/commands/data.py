"""`egm-edge data SUBCOMMAND`: work with grounding data files.

Each subcommand is one entry of SUBCOMMANDS: name -> (help, register(parser), run(args) -> int).
Add one by writing those two small functions and an entry; the logic lives in
`egm_edge.data`, this module only parses arguments and prints.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

NAME = "data"
HELP = "Check grounding data: EGM eval JSONL, the refer release (RefCOCO/+/g), COCO instance files."
ORDER = 40


def _register_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="EGM .jsonl/.json, a refer dataset folder or refs(*).p, or a COCO instances .json")
    p.add_argument("--image-root", metavar="DIR", help="folder the records' image paths are relative to (EGM's BASE_IMG_DIR)")
    p.add_argument("--lenient", action="store_true", help="skip and count bad records instead of stopping at the first")
    p.add_argument("--check-images", action="store_true", help="check that every image exists and has the recorded size")


def _run_check(args: argparse.Namespace) -> int:
    from egm_edge.data import check_report

    print(check_report(args.file, image_root=args.image_root, strict=not args.lenient, check_images=args.check_images))
    return 0


def _register_synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="new or empty output folder (gets samples.jsonl and images/)")
    p.add_argument("--n", type=int, default=200, help="number of samples (default 200)")
    p.add_argument("--seed", type=int, default=0, help="stream seed; the same seed writes the same bytes")
    p.add_argument("--amodal-fraction", type=float, default=0.15, help="fraction of amodal samples (default 0.15)")
    p.add_argument("--force", action="store_true", help="replace a synthetic set already at --out (never other files)")


def _run_synth(args: argparse.Namespace) -> int:
    from egm_edge.synth import generate

    path = generate(args.out, args.n, args.seed, amodal_fraction=args.amodal_fraction, force=args.force)
    print(f"wrote {args.n} samples to {path}")
    return 0


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "check": (
        "Load a data file; print counts per split and every skipped record with its reason (exit 2 on a bad record unless --lenient).",
        _register_check,
        _run_check,
    ),
    "synth": (
        "Write a synthetic grounding set (coloured shapes, verified referring expressions) as EGM eval JSONL + PNGs.",
        _register_synth,
        _run_synth,
    ),
}


def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    for name, (text, reg, run_sub) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=text, description=text)
        reg(sp)
        sp.set_defaults(_data_run=run_sub)


def run(args: argparse.Namespace) -> int:
    return int(args._data_run(args) or 0)
