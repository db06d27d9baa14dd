"""Export-friendly torch modules for Qwen3-VL's two ONNX graphs, reading the HF model's own weights.

`DecoderGraph` also exports InternVL-3's Qwen2 language model with the same decoder table (K = 0; 1-D RoPE
reads row 0 of position_ids, so the runtime passes three equal rows); InternVL's vision graph is
`egm_edge.export.graphs_internvl`.

They re-implement the forward pass of transformers' `Qwen3VLForConditionalGeneration`
with static control flow, explicit KV cache tensors and host-computed grid
tensors, so that `torch.onnx.export` sees one graph for every image size,
prompt length and cache length. Submodules of the HF model are shared, not
copied, so initializer names follow the checkpoint (`model.language_model.layers.0...`).
`egm_edge.export.validate` proves ONNX Runtime on these graphs matches the HF model.

Symbolic dimension names in the files: patches (N), image_tokens (M), batch (B), seq (S),
past_seq (P), total_seq (P+S), logit_rows (L); all other dimensions are fixed numbers.
Graphs are opset 21; quantized checkpoints add the ops of `egm_edge.export.lowering`
inside the Linear layers only, so these tables hold for every precision.
"float32" in the tables is the export's `graph_dtype` (manifest): TensorRT exports may be float16 or bfloat16
(`egm_edge.export.pipeline.export`), every float input and output then in that dtype except `logits`, always
float32 (the lm_head MatMul is 16-bit; the host samples from float32, as TensorRT-LLM returns logits). Inside a
16-bit graph three things stay float32, each behind a Cast: the RoPE angles (positions x inv_freq: fp16 holds
integers exactly only up to 2048), RMSNorm's mean of squares (transformers' Qwen3 RMSNorm upcasts the same way)
and the vision position-embedding sum (torch's fp16 sum accumulates in float32).

## vision.onnx  (N patches, M = N / merge^2 image tokens, E = out_hidden_size, K = len(deepstack_visual_indexes))

| input              | shape                   | dtype   | meaning                                        |
|--------------------|-------------------------|---------|------------------------------------------------|
| pixel_patches      | [N, C*T*P*P]            | float32 | flattened patches as the Qwen3-VL processor emits them (merge-block order) |
| pos_embed_indices  | [N, 4]                  | int64   | `egm_edge.runtime.vision_inputs.vision_grid_inputs` |
| pos_embed_weights  | [N, 4]                  | float32 | idem                                           |
| rotary_cos         | [N, vision_head_dim]    | float32 | idem                                           |
| rotary_sin         | [N, vision_head_dim]    | float32 | idem                                           |
| segment_ids        | [N]                     | int64   | idem: patches attend only within their segment (one per image frame) |

| output             | shape                   | dtype   | meaning                                        |
|--------------------|-------------------------|---------|------------------------------------------------|
| image_features     | [M, E]                  | float32 | merged visual embeddings, images in input order |
| deepstack_features | [K, M, E]               | float32 | deepstack features, added after decoder layer k at image positions |

## decoder.onnx  (B batch, S new tokens, P past tokens, L logit rows, D hidden, V vocab, L_n layers)

Design: the graph takes `input_ids`, embeds them and places `image_features`
rows, in order (row-major over batch and sequence), at the tokens equal to
`image_token_id`; the same rows of `deepstack_features[k]` are added to the
hidden states after layer k. Decode steps pass empty features ([0, E] and
[K, 0, E]). Prefill and decode are the same graph; P may be 0.

| input                       | shape                  | dtype   | meaning                                   |
|-----------------------------|------------------------|---------|-------------------------------------------|
| input_ids                   | [B, S]                 | int64   | new tokens                                |
| image_features              | [M, E]                 | float32 | one row per image-pad token in input_ids  |
| deepstack_features          | [K, M, E]              | float32 | from vision.onnx                          |
| position_ids                | [3, B, S]              | int64   | M-RoPE ids, `egm_edge.runtime.mrope`      |
| attention_mask              | [B, P+S]               | int64   | 1 = real token, 0 = padding (past and new) |
| logits_index                | [B, L]                 | int64   | positions in 0..S-1 whose logits to return (e.g. [[S-1]]) |
| past_key_values.{i}.key     | [B, kv_heads, P, head_dim] | float32 | cache of layer i, i in 0..L_n-1     |
| past_key_values.{i}.value   | [B, kv_heads, P, head_dim] | float32 |                                     |

| output                      | shape                  | dtype   | meaning                                   |
|-----------------------------|------------------------|---------|-------------------------------------------|
| logits                      | [B, L, V]              | float32 | next-token logits at the requested rows   |
| present.{i}.key             | [B, kv_heads, P+S, head_dim] | float32 | past + new keys (RoPE applied)      |
| present.{i}.value           | [B, kv_heads, P+S, head_dim] | float32 |                                     |

With the ONNX Runtime lowering (`DecoderGraph(fused_attention=True)`, CPU bundles) each
layer's attention core is one `com.microsoft::GroupQueryAttention` (egm_edge.export.fused)
and MatMulNBits layers that share an input are stacked into one (q/k/v, gate/up). The
table above still holds; in addition a layer's past and present may be bound to one
buffer of any capacity >= P+S (the manifest's `runtime.decoder.kv_cache` is then
"in_place"), which the runtime does so that a decode step copies no cache.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from egm_edge.errors import UnsupportedError

_ACTS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
}


def _act(name: str):
    if name not in _ACTS:
        raise UnsupportedError(f"Unsupported activation {name!r} in the checkpoint config; supported: {', '.join(_ACTS)}.")
    return _ACTS[name]


# The plain attention (TensorRT lowering) is written in the form TensorRT fuses into one attention kernel
# ("Fused Attention", TensorRT developer guide, transformers section): softmax(Q * K^T + add-mask) * V with Q
# multiplied by the attention scale before the first MatMul (the guide requires the scale on Q or K there),
# K and V keeping their N_kv heads (GQA: Q is regrouped per kv head, K/V are never repeated), the softmax in
# the graph's dtype with no Cast between the MatMuls (the fused kernels accumulate it in fp32 themselves).
# Whether a given TensorRT version fuses it is seen only in its engine (a device check), not here.
ATTENTION_FORM = "MatMul(Q*scale, K^T) + mask -> Softmax -> MatMul(V)"


def mask_value(dtype: torch.dtype) -> float:
    """The additive mask for a disallowed key: the dtype's lowest value in float32 (unchanged), half of it in 16-bit,
    where score + finfo.min may round to -inf and a fully masked row (a padded query) would then softmax to NaN."""
    low = torch.finfo(dtype).min
    return low if dtype == torch.float32 else low / 2


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Qwen3's RMSNorm written as x / sqrt(mean(x^2) + eps) * weight: the pattern ONNX Runtime fuses into
    (Skip)SimplifiedLayerNormalization (transformers' x * rsqrt(...) exports as Sqrt + Reciprocal, which it
    does not fuse: five element-wise kernels per norm, 4 norms per layer, every decode step)."""
    xf = x.float()
    return (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + _norm_eps(norm))).to(x.dtype) * norm.weight


def _norm_eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6))


def vision_io_names() -> tuple[list[str], list[str]]:
    inputs = ["pixel_patches", "pos_embed_indices", "pos_embed_weights", "rotary_cos", "rotary_sin", "segment_ids"]
    return inputs, ["image_features", "deepstack_features"]


def decoder_io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    inputs = ["input_ids", "image_features", "deepstack_features", "position_ids", "attention_mask", "logits_index"]
    return inputs + past, ["logits"] + present


class VisionGraph(nn.Module):
    """Qwen3-VL vision tower: patches + host grid tensors -> image features and deepstack features."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.model = nn.Module()
        self.model.visual = hf_model.model.visual
        visual = self.model.visual
        cfg = visual.config
        if not cfg.deepstack_visual_indexes:
            raise UnsupportedError("The checkpoint's vision config has no deepstack_visual_indexes; egm-edge exports Qwen3-VL with deepstack only.")
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.merge_hidden = cfg.hidden_size * cfg.spatial_merge_size**2
        self.deepstack_index = {layer: k for k, layer in enumerate(cfg.deepstack_visual_indexes)}
        self.act = _act(cfg.hidden_act)
        proj = visual.patch_embed.proj
        # Conv3d with stride == kernel over one patch is a linear map of the flattened patch.
        self.patch_linear = nn.Linear(proj.weight[0].numel(), proj.out_channels, bias=proj.bias is not None)
        with torch.no_grad():
            self.patch_linear.weight.copy_(proj.weight.reshape(proj.out_channels, -1))
            if proj.bias is not None:
                self.patch_linear.bias.copy_(proj.bias)
        self.patch_linear.to(proj.weight.dtype)

    def _attention(self, blk: nn.Module, x: torch.Tensor, cos, sin, bias) -> torch.Tensor:
        n = x.shape[0]
        qkv = blk.attn.qkv(x).reshape(n, 3, self.num_heads, self.head_dim).permute(1, 2, 0, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [H, N, hd]
        c, s = cos.unsqueeze(0), sin.unsqueeze(0)
        q = (q * c + _rotate_half(q) * s) * (self.head_dim**-0.5)  # scaled before the first MatMul (see ATTENTION_FORM)
        k = k * c + _rotate_half(k) * s
        scores = torch.matmul(q, k.transpose(1, 2)) + bias
        out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [H, N, hd]
        return blk.attn.proj(out.transpose(0, 1).reshape(n, -1))

    def _merge(self, merger: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if merger.use_postshuffle_norm:
            x = merger.norm(x.reshape(-1, self.merge_hidden))
        else:
            x = merger.norm(x).reshape(-1, self.merge_hidden)
        return merger.linear_fc2(F.gelu(merger.linear_fc1(x)))

    def forward(self, pixel_patches, pos_embed_indices, pos_embed_weights, rotary_cos, rotary_sin, segment_ids):
        visual = self.model.visual
        x = self.patch_linear(pixel_patches)
        pos = visual.pos_embed(pos_embed_indices) * pos_embed_weights.unsqueeze(-1)
        x = x + pos.sum(dim=1)
        same = segment_ids.unsqueeze(0) == segment_ids.unsqueeze(1)
        bias = torch.where(same, 0.0, mask_value(x.dtype)).to(x.dtype).unsqueeze(0)
        deepstack = []
        for layer, blk in enumerate(visual.blocks):
            x = x + self._attention(blk, blk.norm1(x), rotary_cos, rotary_sin, bias)
            x = x + blk.mlp.linear_fc2(self.act(blk.mlp.linear_fc1(blk.norm2(x))))
            if layer in self.deepstack_index:
                deepstack.append(self._merge(visual.deepstack_merger_list[self.deepstack_index[layer]], x))
        return self._merge(visual.merger, x), torch.stack(deepstack, dim=0)


class DecoderGraph(nn.Module):
    """The language model with explicit KV cache, image placement and deepstack injection.

    Qwen3-VL's (q/k RMSNorm, interleaved M-RoPE, deepstack) or a Qwen2 one inside InternVL (qkv bias, no q/k
    norm, 1-D RoPE, no deepstack), told apart by the model's structure: q/k norms where the attention has
    them, M-RoPE where the rotary embedding has an mrope_section, as many deepstack layers as the vision
    config lists. 1-D RoPE is M-RoPE whose every frequency reads the temporal row (section [head_dim/2, 0, 0]):
    the graph reads row 0 of position_ids only, and the IO table is the same for both.
    """

    def __init__(self, hf_model: nn.Module, image_token_id: int, fused_attention: bool = False):
        super().__init__()
        # fused_attention: each layer's attention core as GroupQueryAttention (egm_edge.export.fused), an
        # ONNX Runtime op whose cache may be updated in place; otherwise plain ONNX ops (TensorRT, any runtime).
        self.fused_attention = bool(fused_attention)
        self.model = nn.Module()
        self.model.language_model = hf_model.model.language_model
        self.lm_head = hf_model.lm_head
        lm = self.model.language_model
        cfg = lm.config
        rope = lm.rotary_emb
        rope_type = cfg.rope_parameters.get("rope_type", "default")
        if "dynamic" in rope_type or rope_type == "longrope":
            raise UnsupportedError(f"Unsupported text rope_type {rope_type!r}: its frequencies change with sequence length; supported: default, linear, yarn, llama3.")
        sliding = [i for i, t in enumerate(getattr(cfg, "layer_types", None) or ()) if t != "full_attention"]
        if sliding:
            raise UnsupportedError(f"Text layers {sliding} use sliding-window attention, which the decoder graph does not export; "
                                   "use a checkpoint with use_sliding_window false.")
        self.image_token_id = int(image_token_id)
        self.n_deepstack = len(getattr(hf_model.config.vision_config, "deepstack_visual_indexes", None) or ())
        self.qk_norm = hasattr(lm.layers[0].self_attn, "q_norm")
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.act = _act(cfg.hidden_act)
        self.rope_scaling = float(rope.attention_scaling)
        half = self.head_dim // 2
        section = list(getattr(rope, "mrope_section", None) or [half, 0, 0])
        if sum(section) != half:
            raise UnsupportedError(f"mrope_section {section} must sum to head_dim/2 = {half}.")
        # Interleaved M-RoPE: frequency j takes its position from axis H if j % 3 == 1 (within the H section),
        # from W if j % 3 == 2 (within the W section), else from T.
        axis = torch.zeros(half, dtype=torch.long)
        axis[1 : section[1] * 3 : 3] = 1
        axis[2 : section[2] * 3 : 3] = 2
        self.register_buffer("rope_axis", axis, persistent=False)
        self.register_buffer("inv_freq", rope.inv_freq.detach().float().clone(), persistent=False)
        # With the ONNX Runtime lowering, MatMulNBits layers that share an input become one (q/k/v; gate/up).
        self.qkv, self.gate_up = nn.ModuleList(), nn.ModuleList()
        self.mrope_section = section
        if self.fused_attention:
            from egm_edge.export.fused import rope_table_positions
            from egm_edge.export.lowering import fused_linear

            self.rope_positions = rope_table_positions(getattr(cfg, "max_position_embeddings", None))
            # float32 products, as transformers computes them (the tables then match its cos/sin exactly)
            freqs = torch.arange(self.rope_positions, dtype=torch.float32)[:, None] * self.inv_freq[None]
            self.register_buffer("rope_cos", (freqs.cos() * self.rope_scaling).float())
            self.register_buffer("rope_sin", (freqs.sin() * self.rope_scaling).float())

            for layer in lm.layers:
                a, m = layer.self_attn, layer.mlp
                self.qkv.append(fused_linear([a.q_proj, a.k_proj, a.v_proj]) or nn.Identity())
                self.gate_up.append(fused_linear([m.gate_proj, m.up_proj]) or nn.Identity())

    def _rope(self, position_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pos = position_ids.permute(1, 2, 0).float()  # [B, S, 3]
        pos = torch.index_select(pos, 2, self.rope_axis)  # [B, S, half]
        freqs = pos * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(dtype).unsqueeze(1)
        sin = (emb.sin() * self.rope_scaling).to(dtype).unsqueeze(1)
        return cos, sin

    def _fused_attention(self, i, attn, x, position_ids, mask_info, past_k, past_v):
        b, s, _ = x.shape
        nq, nkv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        if isinstance(self.qkv[i], nn.Identity):
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        else:
            q, k, v = self.qkv[i](x).split([nq, nkv, nkv], dim=-1)
        if self.qk_norm:
            q = _rms_norm(attn.q_norm, q.reshape(b, s, self.n_heads, self.head_dim)).reshape(b, s, nq)
            k = _rms_norm(attn.k_norm, k.reshape(b, s, self.n_kv, self.head_dim)).reshape(b, s, nkv)
        q = torch.ops.egm_edge.mrope(q, position_ids, self.rope_cos, self.rope_sin, self.n_heads, self.mrope_section)
        k = torch.ops.egm_edge.mrope(k, position_ids, self.rope_cos, self.rope_sin, self.n_kv, self.mrope_section)
        out, k, v = torch.ops.egm_edge.group_query_attention(
            q, k, v, past_k, past_v, *mask_info, self.n_heads, self.n_kv, float(self.head_dim**-0.5))
        return attn.o_proj(out), k, v

    def _mlp(self, i, mlp, x):
        if len(self.gate_up) and not isinstance(self.gate_up[i], nn.Identity):
            gate, up = self.gate_up[i](x).chunk(2, dim=-1)
        else:
            gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        return mlp.down_proj(self.act(gate) * up)

    def _qk_norm(self, attn, name: str, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(getattr(attn, name), x) if self.qk_norm else x

    def _attention(self, i, attn, x, cos, sin, bias, past_k, past_v):
        b, s, _ = x.shape
        q = self._qk_norm(attn, "q_norm", attn.q_proj(x).reshape(b, s, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self._qk_norm(attn, "k_norm", attn.k_proj(x).reshape(b, s, self.n_kv, self.head_dim)).transpose(1, 2)
        v = attn.v_proj(x).reshape(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        q = (q * cos + _rotate_half(q) * sin) * (self.head_dim**-0.5)  # scaled before the first MatMul (see ATTENTION_FORM)
        k = k * cos + _rotate_half(k) * sin
        k = torch.cat((past_k, k), dim=2)
        v = torch.cat((past_v, v), dim=2)
        rep = self.n_heads // self.n_kv
        q = q.reshape(b, self.n_kv, rep * s, self.head_dim)  # group query heads per kv head, no kv copy
        scores = torch.matmul(q, k.transpose(2, 3)).reshape(b, self.n_heads, s, -1) + bias
        probs = torch.softmax(scores, dim=-1).reshape(b, self.n_kv, rep * s, -1)  # in the graph's dtype: see ATTENTION_FORM
        out = torch.matmul(probs, v).reshape(b, self.n_heads, s, self.head_dim)
        return attn.o_proj(out.transpose(1, 2).reshape(b, s, -1)), k, v

    def forward(self, input_ids, image_features, deepstack_features, position_ids, attention_mask, logits_index, *past):
        lm = self.model.language_model
        h = lm.embed_tokens(input_ids)
        b, s, d = h.shape
        # k-th image-pad token (row-major) takes feature row k; row 0 of the padded table is a zero row.
        is_image = input_ids == self.image_token_id
        flat = is_image.reshape(-1).to(torch.long)
        slot = (torch.cumsum(flat, dim=0) * flat).reshape(b, s)
        zero = image_features.new_zeros(1, d)
        h = torch.where(is_image.unsqueeze(-1), torch.cat((zero, image_features.to(h.dtype)), dim=0)[slot], h)

        if self.fused_attention:
            return self._forward_fused(h, slot, zero, deepstack_features, position_ids, attention_mask, logits_index, past)
        cos, sin = self._rope(position_ids, h.dtype)
        p = attention_mask.shape[1] - s
        key_pos = torch.arange(attention_mask.shape[1], device=h.device)
        query_pos = torch.arange(s, device=h.device) + p
        allowed = (key_pos.unsqueeze(0) <= query_pos.unsqueeze(1)).unsqueeze(0) & attention_mask.bool().unsqueeze(1)
        bias = torch.where(allowed, 0.0, mask_value(h.dtype)).to(h.dtype).unsqueeze(1)  # [B, 1, S, P+S]

        presents = []
        for i, layer in enumerate(lm.layers):
            a, k, v = self._attention(i, layer.self_attn, _rms_norm(layer.input_layernorm, h), cos, sin, bias, past[2 * i], past[2 * i + 1])
            presents += [k, v]
            h = h + a
            h = h + self._mlp(i, layer.mlp, _rms_norm(layer.post_attention_layernorm, h))
            if i < self.n_deepstack:
                table = torch.cat((zero, deepstack_features[i].to(h.dtype)), dim=0)
                h = h + table[slot]
        h = _rms_norm(lm.norm, h)
        rows = torch.gather(h, 1, logits_index.unsqueeze(-1).expand(-1, -1, d))
        return (self.lm_head(rows).float(), *presents)

    def _forward_fused(self, h, slot, zero, deepstack_features, position_ids, attention_mask, logits_index, past):
        """The same computation with ONNX Runtime's fused ops (egm_edge.export.fused): M-RoPE and attention in one
        node each, every residual add fused with the RMSNorm that follows it."""
        from egm_edge.export.fused import mask_inputs

        lm = self.model.language_model
        b, s, d = h.shape
        mask_info = mask_inputs(attention_mask, s, h.dtype)
        layers = list(lm.layers)
        x = _rms_norm(layers[0].input_layernorm, h)
        presents = []
        for i, layer in enumerate(layers):
            a, k, v = self._fused_attention(i, layer.self_attn, x, position_ids, mask_info, past[2 * i], past[2 * i + 1])
            presents += [k, v]
            x, h = torch.ops.egm_edge.skip_rms_norm(a, h, layer.post_attention_layernorm.weight, _norm_eps(layer.post_attention_layernorm))
            m = self._mlp(i, layer.mlp, x)
            if i < self.n_deepstack:
                m = m + torch.cat((zero, deepstack_features[i].to(h.dtype)), dim=0)[slot]
            following = layers[i + 1].input_layernorm if i + 1 < len(layers) else lm.norm
            x, h = torch.ops.egm_edge.skip_rms_norm(m, h, following.weight, _norm_eps(following))
        rows = torch.gather(x, 1, logits_index.unsqueeze(-1).expand(-1, -1, d))
        return (self.lm_head(rows).float(), *presents)

# --- trace samples, dynamic axes and dimension names (every dynamic size >= 2: torch.export specialises 0 and 1)


def vision_export_spec(vcfg) -> tuple[tuple, tuple, dict]:
    """(sample args, dynamic_shapes, dimension names) for exporting VisionGraph."""
    import numpy as np

    from egm_edge.runtime.vision_inputs import vision_grid_inputs

    m = vcfg.spatial_merge_size
    grids = [(1, 2 * m, 3 * m), (1, 3 * m, m)]
    grid = vision_grid_inputs(grids, vcfg)
    n = grid["segment_ids"].shape[0]
    gen = torch.Generator().manual_seed(0)
    patches = torch.randn(n, vcfg.patch_dim, generator=gen)
    inputs, outputs = vision_io_names()
    args = (patches, *(torch.from_numpy(np.ascontiguousarray(grid[k])) for k in inputs[1:]))
    dyn = torch.export.Dim.DYNAMIC
    shapes = tuple({0: dyn} for _ in inputs)
    dims = {name: ["patches"] for name in inputs}
    dims.update({"image_features": ["image_tokens", None], "deepstack_features": [None, "image_tokens", None]})
    return args, shapes, dims


def decoder_export_spec(dcfg: dict) -> tuple[tuple, tuple, dict]:
    """(sample args, dynamic_shapes, dimension names) for exporting DecoderGraph."""
    b, s, p, n_img, d = 2, 7, 3, 3, dcfg["hidden_size"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(dcfg["vocab_size"], 100), (b, s), generator=gen)
    ids[0, 2:4] = dcfg["image_token_id"]
    ids[1, 1] = dcfg["image_token_id"]
    kv = (b, dcfg["num_kv_heads"], p, dcfg["head_dim"])
    past = tuple(torch.randn(kv, generator=gen) for _ in range(2 * dcfg["num_layers"]))
    args = (
        ids,
        torch.randn(n_img, d, generator=gen),
        torch.randn(dcfg["num_deepstack"], n_img, d, generator=gen),
        torch.randint(0, 9, (3, b, s), generator=gen),
        torch.ones(b, p + s, dtype=torch.long),
        torch.tensor([[s - 1, s - 2], [s - 1, 0]]),
        *past,
    )
    dyn = torch.export.Dim.DYNAMIC
    shapes = ({0: dyn, 1: dyn}, {0: dyn}, {1: dyn}, {1: dyn, 2: dyn}, {0: dyn, 1: dyn}, {0: dyn, 1: dyn},
              tuple({0: dyn, 2: dyn} for _ in past))
    inputs, outputs = decoder_io_names(dcfg["num_layers"])
    dims = {
        "input_ids": ["batch", "seq"], "image_features": ["image_tokens", None],
        "deepstack_features": [None, "image_tokens", None], "position_ids": [None, "batch", "seq"],
        "attention_mask": ["batch", "total_seq"], "logits_index": ["batch", "logit_rows"],
        "logits": ["batch", "logit_rows", None],
    }
    dims.update({name: ["batch", None, "past_seq", None] for name in inputs if name.startswith("past_key_values.")})
    dims.update({name: ["batch", None, "total_seq", None] for name in outputs if name.startswith("present.")})
    return args, shapes, dims
