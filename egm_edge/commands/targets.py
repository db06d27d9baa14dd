"""`egm-edge targets`: the shipped target profiles and what each supports."""

from __future__ import annotations

import argparse
import json

NAME = "targets"
HELP = "List the target device profiles: compute capability, memory, bandwidth, precisions, software versions."
ORDER = 41


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    from egm_edge.quantize.recipes import SERVING_NOTE
    from egm_edge.targets import CHECKPOINT_ONLY, list_targets, load_target, targets_dir

    profiles = [load_target(n) for n in list_targets()]
    if args.json:
        print(json.dumps([t.to_dict() for t in profiles], indent=2))
        return 0
    print(f"target profiles in {targets_dir()}")
    print(f"{'target':<22}{'kind':<8}{'SM':>5}{'memory':>10}{'shared':>8}{'GB/s':>8}  precisions; software")
    for t in profiles:
        soft = ", ".join(f"{k} {v}" for k, v in t.software.items())
        print(f"{t.name:<22}{t.kind:<8}{t.sm_text:>5}{t.memory_gib:>7.0f} GiB{'yes' if t.shared_memory else 'no':>8}"
              f"{t.memory_bandwidth_gbs:>8.0f}  {', '.join(t.precisions)}; {soft}")
        if t.serving_precisions:
            print(f"{'':<22}{CHECKPOINT_ONLY}: {', '.join(t.serving_precisions)}")
    print(f"precisions: what egm-edge build can make a bundle of. {SERVING_NOTE}.")
    return 0
