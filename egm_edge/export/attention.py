"""Fused decoder attention for ONNX Runtime: `com.microsoft::GroupQueryAttention`.

For the "onnxruntime" lowering (CPU bundles) each decoder layer's attention core
(after q/k norms and M-RoPE, which stay ordinary ops because GroupQueryAttention's
own rotary is 1-D) is one GroupQueryAttention node. It appends the new keys and
values to the cache, groups query heads per KV head without copying the cache,
applies the causal mask and the softmax, in one kernel instead of ~15 ops.

Its cache contract is the graph's (`egm_edge.export.graphs`): past [B, kv, P, hd]
in, present [B, kv, P+S, hd] out. In addition the same graph can run with the cache
updated in place: when the past and present of a layer are bound to one buffer of
capacity C >= P+S (ONNX Runtime I/O binding, `egm_edge.runtime.executors`), the node
writes the S new rows at P..P+S-1 and reads the first P+S rows, so a decode step
copies nothing (a growing past costs a full cache copy per step, 8 ms at EGM-2B).
Padding (left or right) is an additive bias built from `attention_mask`, as in the
plain graph; every row counts as full length for the node's own causal mask.

`group_query_attention` is the torch reference of exactly that computation; the
exporter translates it with `translation_table()`.
"""

from __future__ import annotations

import torch

# Fields of the export manifest's runtime.decoder that tell the runtime what the graph allows.
KV_CACHE_IN_PLACE = "in_place"  # past/present may share one buffer (GroupQueryAttention)
KV_CACHE_GROWING = "growing"  # present is a new tensor, past + new rows


@torch.library.custom_op("egm_edge::group_query_attention", mutates_args=())
def group_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                          seqlens_k: torch.Tensor, total_len: torch.Tensor, bias: torch.Tensor, num_heads: int,
                          kv_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, S, H*hd], k/v [B, S, KV*hd], past [B, KV, P, hd], seqlens_k [B] int32 (valid length - 1 per row),
    total_len [] int32, bias [B, 1, S, P+S] added to the scores -> (out [B, S, H*hd], present_k, present_v
    [B, KV, P+S, hd]). Query i of row b sits at position seqlens_k[b] - S + 1 + i and sees the keys at or
    before it."""
    b, s, _ = q.shape
    hd = q.shape[-1] // num_heads
    rep = num_heads // kv_heads
    qh = q.reshape(b, s, num_heads, hd).transpose(1, 2)
    pk = torch.cat((past_k, k.reshape(b, s, kv_heads, hd).transpose(1, 2)), dim=2)
    pv = torch.cat((past_v, v.reshape(b, s, kv_heads, hd).transpose(1, 2)), dim=2)
    t = pk.shape[2]
    scores = torch.matmul(qh.reshape(b, kv_heads, rep * s, hd), pk.transpose(2, 3)).reshape(b, num_heads, s, t) * scale
    query_pos = seqlens_k.to(torch.long)[:, None] - s + 1 + torch.arange(s)[None, :]  # [B, S]
    allowed = torch.arange(t)[None, None, :] <= query_pos[:, :, None]  # [B, S, T]
    scores = (scores.float() + bias.float()).masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype).reshape(b, kv_heads, rep * s, t)
    out = torch.matmul(probs, pv).reshape(b, num_heads, s, hd).transpose(1, 2).reshape(b, s, num_heads * hd)
    return out, pk, pv


@group_query_attention.register_fake
def _(q, k, v, past_k, past_v, seqlens_k, total_len, bias, num_heads, kv_heads, scale):
    b, s, _ = q.shape
    hd = q.shape[-1] // num_heads
    t = past_k.shape[2] + s
    return q.new_empty(b, s, num_heads * hd), past_k.new_empty(b, kv_heads, t, hd), past_v.new_empty(b, kv_heads, t, hd)


def mask_inputs(attention_mask: torch.Tensor, s: int, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seqlens_k [B] int32, total_len [] int32, bias [B, 1, S, P+S]) from `attention_mask`, once per graph.
    Every row counts as full length (the node's causal mask then is the plain one) and padding, left or
    right, is masked by the bias, so a padded batch means what it means for the plain graph."""
    total = torch.ones_like(attention_mask[0]).sum()
    seqlens_k = (torch.zeros_like(attention_mask[:, 0]) + total - 1).to(torch.int32)
    pad = attention_mask.bool()[:, None, None, :].expand(-1, -1, s, -1)  # [B, 1, S, T]
    bias = torch.where(pad, 0.0, torch.finfo(dtype).min).to(dtype)
    return seqlens_k, total.to(torch.int32), bias


def _register_schema() -> None:
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("GroupQueryAttention", "com.microsoft"):
        return
    p, a = OpSchema.FormalParameter, OpSchema.Attribute
    opt = {"param_option": OpSchema.FormalParameterOption.Optional}
    onnx.defs.register_schema(OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[p("query", "T"), p("key", "T"), p("value", "T"), p("past_key", "T", **opt), p("past_value", "T", **opt),
                p("seqlens_k", "M"), p("total_sequence_length", "M"), p("cos_cache", "T", **opt),
                p("sin_cache", "T", **opt), p("position_ids", "P", **opt), p("attention_bias", "T", **opt)],
        outputs=[p("output", "T"), p("present_key", "T"), p("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], ""),
                          ("P", ["tensor(int64)"], "")],
        attributes=[a("num_heads", OpSchema.AttrType.INT, ""), a("kv_num_heads", OpSchema.AttrType.INT, ""),
                    a("scale", OpSchema.AttrType.FLOAT, "")],
    ))


def translation_table() -> dict:
    """`custom_translation_table` entry: the reference op as com.microsoft::GroupQueryAttention."""
    import onnxscript

    _register_schema()
    msft = onnxscript.values.Opset("com.microsoft", 1)

    def t_gqa(q, k, v, past_k, past_v, seqlens_k, total_len, bias, num_heads: int, kv_heads: int, scale: float):
        return msft.GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total_len, None, None, None, bias,
                                        num_heads=num_heads, kv_num_heads=kv_heads, scale=scale)

    return {torch.ops.egm_edge.group_query_attention.default: t_gqa}
