"""CLI subcommands, one module each, discovered by `egm_edge.cli` (see its docstring)."""
