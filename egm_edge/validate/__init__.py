"""Validate: does a candidate (bundle, checkpoint or endpoint) ground as well as its reference?

Public API:
- `validate(candidate, reference, data, *, out_dir, split_by="split", max_acc_drop=1.0,
  max_miou_drop=1.0, think_budget=None, limit=None, concurrency=4, seed=0, gate="significant",
  min_split_n=None, ...) -> Report`
  (`.verdict` pass | fail | incomplete, `.failures`, `.exit_code`, `.data` = report.json with `held`:
  over-limit drops whose paired 95% CI reaches zero, which the default gate reports without failing;
  `too_small`: splits with fewer paired samples than the gate needs; `split_mean`: the overall as EGM
  reports it, each split weighted equally, beside the pooled `groups["overall"]` that gates);
- `open_predictor(spec)`: a bundle dir, a checkpoint dir or an OpenAI-compatible http(s) URL;
- `DecodeSettings`, `EndpointPredictor`, `EndpointError`.
Importing this package is cheap: models load on their first prediction.
"""

from egm_edge.validate.api import Report, validate
from egm_edge.validate.endpoint import EndpointError, EndpointPredictor
from egm_edge.validate.predictors import BundlePredictor, CheckpointPredictor, DecodeSettings, open_predictor

__all__ = ["BundlePredictor", "CheckpointPredictor", "DecodeSettings", "EndpointError", "EndpointPredictor", "Report",
           "open_predictor", "validate"]
