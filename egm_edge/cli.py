"""The `egm-edge` command line: a thin layer over the public calls of each stage.

Each subcommand lives in its own module under `egm_edge.commands` and exposes
`NAME`, `HELP`, `ORDER` (position in `--help`), `register(parser)` and
`run(args) -> int`. Command modules import heavy dependencies only inside `run`,
so `egm-edge --help` stays fast. User errors (`EgmError`) print one sentence and
exit non-zero; anything else keeps its traceback because it is a bug.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from egm_edge import __version__
from egm_edge.errors import EgmError


def _command_modules():
    import egm_edge.commands as pkg

    mods = [importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]
    mods = [m for m in mods if hasattr(m, "register") and hasattr(m, "run")]
    return sorted(mods, key=lambda m: (getattr(m, "ORDER", 100), m.NAME))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egm-edge",
        description="Deployment compiler and runtime for EGM reasoning grounding models.",
    )
    parser.add_argument("--version", action="version", version=f"egm-edge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.register(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except EgmError as e:
        print(f"egm-edge {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"egm-edge {args.command}: interrupted; nothing partial was left in place.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
