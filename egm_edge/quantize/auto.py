"""Recipe auto: per-layer formats chosen by ModelOpt's AutoQuantize, scored on grounding.

Contract:
- `candidate_configs(spec, family)`: one ModelOpt config per format of `spec.formats` (that recipe's own config
  through `policy.build_modelopt_config`, with the spec's INT4 block and AWQ variant); "do not quantize" (16-bit)
  is ModelOpt's implicit extra choice for every layer.
- `skipped_patterns(family)`: the vision tower and projector (the family record's `vision_prefixes`), lm_head and
  the embeddings: never searched (the project policy) and left out of the effective-bits cost, so the constraint
  counts the language model's Linear weights only.
- `grounding_loss(logits, item, answer_from)`: the score AutoQuantize ranks layers by: token cross entropy of the
  full-precision model's own continuation (reasoning, the reasoning's close, the answer), the answer tokens (from
  the close on: the box) weighted `BOX_WEIGHT`; prompt and image tokens do not count.
- `effective_bits_for_bytes(...)`: the constraint that keeps a checkpoint's decoder under a byte cap.
- `search(model, spec, family, items, ...)`: `mtq.auto_quantize` with the gradient method over those pieces;
  returns the quantized model (ModelOpt exports it as a MIXED_PRECISION unified checkpoint, one `quant_algo` per layer).
"""

from __future__ import annotations

from typing import Any, Callable

from egm_edge.errors import InputError, UnsupportedError

# The answer decides the box; a flipped reasoning token costs less than a flipped coordinate. 4x: the answer's
# ~15 tokens then weigh about half as much as ~120 reasoning tokens of the tiny grounder's calibration set.
BOX_WEIGHT = 4.0
INT4_SCALE_BITS = 16  # one 16-bit scale per INT4 block (ModelOpt's AWQ export), spread over the block


def candidate_configs(spec, family) -> list[dict[str, Any]]:
    from egm_edge.quantize import policy
    from egm_edge.quantize.recipes import QuantSpec

    out = []
    for fmt in spec.formats:
        int4 = fmt == "int4_awq"
        one = QuantSpec(fmt, block_size=spec.block_size if int4 else None, awq=spec.awq if int4 else None)
        out.append(policy.build_modelopt_config(one, family))
    return out


def skipped_patterns(family) -> list[str]:
    from egm_edge.models.families import get_family

    fam = get_family(family)
    return [f"{p}*" for p in fam.vision_prefixes] + ["*lm_head*", "*embed_tokens*"]


def grounding_loss(logits, item, answer_from: int | None):
    """Weighted cross entropy of `item`'s generated tokens under `logits` [1, L, V] (see module docstring)."""
    import torch

    ids = torch.as_tensor(item.input_ids, device=logits.device).view(-1)
    start = int(item.n_prompt)
    if ids.shape[0] <= start:
        raise InputError("A calibration item holds no generated tokens; recipe auto scores the model's own reasoning "
                         "(the calibration set is rendered with --calib-with-reasoning).")
    target = ids[start:]
    pred = logits[0, start - 1:-1].float()
    ce = torch.nn.functional.cross_entropy(pred, target, reduction="none")
    weight = torch.ones_like(ce)
    if answer_from is not None:
        hits = (target == answer_from).nonzero()
        if len(hits):
            weight[int(hits[0]):] = BOX_WEIGHT
    return (ce * weight).sum() / weight.sum()


def linear_params(model, family) -> int:
    """Weights of the language model's Linear layers: what AutoQuantize's effective bits are an average over."""
    from egm_edge.quantize.policy import linear_widths

    return sum(model.get_submodule(name).weight.numel() for name in linear_widths(model, family))


def effective_bits_for_bytes(max_bytes: int, full_decoder_bytes: int, linear_weights: int, full_bytes_per_weight: float,
                             block: int | None) -> float:
    """The largest effective bits whose decoder fits `max_bytes`: the full decoder's bytes with its Linear weights
    (`linear_weights` of them at `full_bytes_per_weight`) replaced by `bits / 8` bytes each, INT4 block scales counted."""
    fixed = full_decoder_bytes - linear_weights * full_bytes_per_weight
    room = max_bytes - fixed
    scale_bits = INT4_SCALE_BITS / block if block else 0.0
    bits = 8.0 * room / linear_weights - scale_bits if linear_weights else 16.0
    if bits < 4.0:
        need = fixed + linear_weights * (4.0 + scale_bits) / 8.0
        raise UnsupportedError(
            f"A decoder of at most {max_bytes / 2**20:.2f} MiB is not reachable: all-INT4 Linear layers still take "
            f"{need / 2**20:.2f} MiB (embeddings and norms stay 16-bit); raise --max-bytes.")
    return min(16.0, round(bits, 3))


def search(model, spec, family, items, *, forward_inputs: Callable, answer_from: int | None, progress: bool = False):
    """Run AutoQuantize on `model` over the calibration `items` (module docstring); returns (model, search summary)."""
    import modelopt.torch.quantization as mtq

    skip = skipped_patterns(family)

    def forward_step(m, item):
        return m(**forward_inputs(item))

    def loss_func(output, item):
        return grounding_loss(output.logits, item, answer_from)

    model, state = mtq.auto_quantize(
        model,
        constraints={"effective_bits": spec.effective_bits, "cost": {"excluded_module_name_patterns": skip}},
        quantization_formats=candidate_configs(spec, family),
        data_loader=list(items),
        forward_step=forward_step,
        loss_func=loss_func,
        disabled_layers=skip,
        num_calib_steps=len(items),
        num_score_steps=len(items),
        verbose=progress,
        method="gradient",
    )
    best = (state or {}).get("best") or {}
    return model, {"effective_bits_target": spec.effective_bits,
                   "effective_bits_found": _number(best.get("constraints", {}).get("effective_bits")),
                   "score": _number(best.get("score")), "method": "gradient", "box_weight": BOX_WEIGHT,
                   "calibration_steps": len(items), "score_steps": len(items)}


def _number(v):
    try:
        return round(float(v), 4)
    except (TypeError, ValueError):
        return None
