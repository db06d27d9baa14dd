"""Fused decoder ops for ONNX Runtime (the "onnxruntime" lowering, CPU bundles).

Each is a torch custom op whose eager implementation is the reference math and which
the exporter translates (`translation_table()`) to one ONNX Runtime contrib node:

- `group_query_attention` -> `com.microsoft::GroupQueryAttention`: each decoder layer's
  attention core (after the q/k norms, where the model has them, and M-RoPE). It appends the
  new keys and values to the cache, groups query heads per KV head without copying the
  cache, applies the causal mask and the softmax, in one kernel instead of ~15 ops. Its
  cache contract is the graph's (`egm_edge.export.graphs`): past [B, kv, P, hd] in, present
  [B, kv, P+S, hd] out. In addition the same graph can run with the cache updated in place:
  when the past and present of a layer are bound to one buffer of capacity C >= P+S (ONNX
  Runtime I/O binding, `egm_edge.runtime.executors`), the node writes the S new rows at
  P..P+S-1 and reads the first P+S rows, so a decode step copies nothing (a growing past
  costs a full cache copy per step, 8 ms at EGM-2B). Padding (left or right) is an additive
  bias built from `attention_mask`, as in the plain graph; every row counts as full length
  for the node's own causal mask.
- `mrope` -> `com.microsoft::MRotaryEmbedding` (interleaved layout, Qwen3-VL): the M-RoPE
  rotation of q or k in one node instead of six, from cos/sin tables of
  `rope_table_positions()` rows; positions at or past the table are refused by the runtime.
  1-D RoPE (InternVL's Qwen2) is the section [head_dim/2, 0, 0]: every frequency reads the
  temporal row, so the node reads row 0 of position_ids only (checked against `mrope`).
- `skip_rms_norm` -> `com.microsoft::SkipSimplifiedLayerNormalization`: the residual add and
  the next RMSNorm in one pass (the sum comes out too, for the next residual).
"""

from __future__ import annotations

import torch

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


# M-RoPE position tables: rows 0..N-1 (min of the model's max_position_embeddings and this cap;
# 32768 rows x head_dim/2 x 2 tables = 16.8 MB in float32 at head_dim 128).
ROPE_TABLE_CAP = 32768


def rope_table_positions(max_position_embeddings: int | None) -> int:
    return int(min(max_position_embeddings or ROPE_TABLE_CAP, ROPE_TABLE_CAP))


@torch.library.custom_op("egm_edge::mrope", mutates_args=())
def mrope(x: torch.Tensor, position_ids: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor, num_heads: int,
          section: list[int]) -> torch.Tensor:
    """Interleaved M-RoPE of x [B, S, H*hd] at position_ids [3, B, S] (temporal, height, width); tables
    [N, hd/2] hold cos/sin(pos * inv_freq) (times the rope's attention scaling). Frequency j takes its
    position from height if j % 3 == 1 and j < 3*section[1], from width if j % 3 == 2 and j < 3*section[2],
    else from the temporal stream; the rotation is rotate-half."""
    b, s, _ = x.shape
    hd = x.shape[-1] // num_heads
    half = hd // 2
    axis = torch.zeros(half, dtype=torch.long)
    axis[1 : section[1] * 3 : 3] = 1
    axis[2 : section[2] * 3 : 3] = 2
    pos = position_ids.permute(1, 2, 0)[..., axis]  # [B, S, half]
    j = torch.arange(half)
    cos = cos_table[pos, j].to(x.dtype)
    sin = sin_table[pos, j].to(x.dtype)
    cos, sin = torch.cat((cos, cos), -1)[:, :, None], torch.cat((sin, sin), -1)[:, :, None]
    xh = x.reshape(b, s, num_heads, hd)
    rotated = torch.cat((-xh[..., half:], xh[..., :half]), dim=-1)
    return (xh * cos + rotated * sin).reshape(b, s, num_heads * hd)


@mrope.register_fake
def _(x, position_ids, cos_table, sin_table, num_heads, section):
    return torch.empty_like(x)


@torch.library.custom_op("egm_edge::skip_rms_norm", mutates_args=())
def skip_rms_norm(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + skip) * weight, x + skip), the norm computed in float32."""
    total = x + skip
    t = total.float()
    normed = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype), total


@skip_rms_norm.register_fake
def _(x, skip, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


def _register_schema() -> None:
    import onnx
    from onnx.defs import OpSchema

    p, a = OpSchema.FormalParameter, OpSchema.Attribute
    opt = {"param_option": OpSchema.FormalParameterOption.Optional}
    if not onnx.defs.has("GroupQueryAttention", "com.microsoft"):
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
    if not onnx.defs.has("MRotaryEmbedding", "com.microsoft"):
        onnx.defs.register_schema(OpSchema(
            "MRotaryEmbedding", "com.microsoft", 1,
            inputs=[p("input", "T"), p("position_ids", "M"), p("cos_cache", "T"), p("sin_cache", "T")],
            outputs=[p("output", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int64)"], "")],
            attributes=[a("num_heads", OpSchema.AttrType.INT, ""), a("interleaved", OpSchema.AttrType.INT, ""),
                        a("rotary_embedding_dim", OpSchema.AttrType.INT, ""), a("mrope_section", OpSchema.AttrType.INTS, ""),
                        a("mrope_layout", OpSchema.AttrType.INT, ""), a("is_packed_batching", OpSchema.AttrType.INT, "")],
        ))
    if not onnx.defs.has("SkipSimplifiedLayerNormalization", "com.microsoft"):
        onnx.defs.register_schema(OpSchema(
            "SkipSimplifiedLayerNormalization", "com.microsoft", 1,
            inputs=[p("input", "T"), p("skip", "T"), p("gamma", "T")],
            outputs=[p("output", "T"), p("mean", "U", **opt), p("inv_std_var", "U", **opt),
                     p("input_skip_bias_sum", "T", **opt)],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("U", ["tensor(float)"], "")],
            attributes=[a("epsilon", OpSchema.AttrType.FLOAT, "")],
        ))


def translation_table() -> dict:
    """`custom_translation_table` entry: the reference op as com.microsoft::GroupQueryAttention."""
    import onnxscript

    _register_schema()
    msft = onnxscript.values.Opset("com.microsoft", 1)

    def t_gqa(q, k, v, past_k, past_v, seqlens_k, total_len, bias, num_heads: int, kv_heads: int, scale: float):
        return msft.GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total_len, None, None, None, bias,
                                        num_heads=num_heads, kv_num_heads=kv_heads, scale=scale)

    def t_mrope(x, position_ids, cos_table, sin_table, num_heads: int, section):
        # mrope_layout 1: the interleaved frequency-to-stream layout of Qwen3-VL (checked against `mrope`).
        return msft.MRotaryEmbedding(x, position_ids, cos_table, sin_table, num_heads=num_heads, interleaved=0,
                                     rotary_embedding_dim=0, mrope_section=list(section), mrope_layout=1,
                                     is_packed_batching=0)

    def t_skip_rms_norm(x, skip, weight, eps: float):
        out, _mean, _inv_std, total = msft.SkipSimplifiedLayerNormalization(x, skip, weight, epsilon=eps)
        return out, total

    return {torch.ops.egm_edge.group_query_attention.default: t_gqa,
            torch.ops.egm_edge.mrope.default: t_mrope,
            torch.ops.egm_edge.skip_rms_norm.default: t_skip_rms_norm}


def drop_unused_norm_statistics(path) -> int:
    """Unname the mean / inverse-std outputs of SkipSimplifiedLayerNormalization nodes that nothing reads (the
    exporter names every declared output; ONNX Runtime then writes them on every step). Rewrites only the
    graph file (external weights untouched); returns how many outputs it dropped."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    dropped = 0
    for n in model.graph.node:
        if n.op_type == "SkipSimplifiedLayerNormalization" and n.domain == "com.microsoft":
            for k in (1, 2):
                if k < len(n.output) and n.output[k] and n.output[k] not in used:
                    n.output[k] = ""
                    dropped += 1
    if dropped:
        onnx.save(model, str(path))
    return dropped
