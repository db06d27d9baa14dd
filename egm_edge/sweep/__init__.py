"""Sweep: accuracy vs latency over quantization recipe x thinking budget (x target), and the configuration to deploy.

Public API:
- `sweep(model_dir, recipes=("full", "fp8", "int4_awq"), budgets=(0, 16, 32, 64, 128, None),
  targets=("cpu",), *, data, out_dir, limit=None, latency_budget_ms=None, memory_budget_gb=None, cluster=None, ...)
  -> SweepResult`; `cluster="auto"` (or HOST:PORT, ray://HOST:PORT) runs its units as Ray tasks (`egm_edge.sweep.cluster`);
- `sweep_deployed(endpoint_url_or_bundle, budgets, *, data, out_dir, target=..., endpoint_kind="auto", ...)`: budgets
  on something already deployed, latency measured there (`egm_edge.sweep.deployed`);
- `analyze(records, out_dir, latency_budget_ms=..., memory_budget_gb=...)`: table, plots, recommendation from records only;
- `RecordStore(out_dir).load()`: the records of a sweep folder.
"""

from egm_edge.sweep.api import DEFAULT_BUDGETS, DEFAULT_RECIPES, SweepResult, analyze, sweep
from egm_edge.sweep.deployed import sweep_deployed
from egm_edge.sweep.records import RecordStore

__all__ = ["DEFAULT_BUDGETS", "DEFAULT_RECIPES", "RecordStore", "SweepResult", "analyze", "sweep", "sweep_deployed"]
