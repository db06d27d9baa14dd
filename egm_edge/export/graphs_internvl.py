"""Export-friendly vision graph of InternVL-3 (transformers' `InternVLForConditionalGeneration`).

`InternVLVisionGraph` re-implements `InternVLModel.get_image_features` with static
shapes per tile: InternViT on each 448 px tile (CLS token + patch embeddings + the
position embeddings at their native size, no interpolation), drop CLS, pixel shuffle
exactly as `InternVLModel.pixel_shuffle` with `downsample_ratio`, then the
multi_modal_projector. Submodules of the HF model are shared, so initializer names
follow the checkpoint (`model.vision_tower...`, `model.multi_modal_projector...`).
The language model exports through `egm_edge.export.graphs.DecoderGraph`, which reads
its Qwen2 structure (qkv bias, no qk-norm, 1-D RoPE, no deepstack) from the model.

## vision.onnx  (N tiles incl. thumbnail, T tile size, M = N * tokens_per_tile, E = text hidden size)

| input              | shape            | dtype   | meaning                                              |
|--------------------|------------------|---------|------------------------------------------------------|
| pixel_values       | [N, 3, T, T]     | float32 | tiles as `egm_edge.runtime.tiling.tile_image` emits them |

| output             | shape            | dtype   | meaning                                              |
|--------------------|------------------|---------|------------------------------------------------------|
| image_features     | [M, E]           | float32 | one row per `<IMG_CONTEXT>` token, tiles in input order |
| deepstack_features | [0, M, E]        | float32 | always empty: InternVL has no deepstack; there so the runtime drives both families alike |

The decoder graph is the one of `egm_edge.export.graphs` (same IO table) with K = 0
deepstack features and position_ids [3, B, S] of which only row 0 is read (1-D RoPE):
the runtime passes three equal rows of plain positions.

The export stage reads this module through the family record's `graphs` field, by the names
Qwen3-VL's module has: VisionGraph, vision_export_spec (from the export's TilingConfig),
vision_io_names, DecoderGraph, decoder_export_spec, decoder_io_names.
"""

from __future__ import annotations

import torch
from torch import nn

from egm_edge.errors import UnsupportedError
from egm_edge.export import graphs as _graphs


def internvl_vision_io_names() -> tuple[list[str], list[str]]:
    return ["pixel_values"], ["image_features", "deepstack_features"]


def _square(v) -> int:
    """InternVL configs store image and patch sizes as [h, w]; the graph needs square ones."""
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise UnsupportedError(f"InternVL vision size {list(v)} is not square; egm-edge exports square tiles only.")
        return int(v[0])
    return int(v)


def tile_geometry(hf_config) -> tuple[int, int, int]:
    """(tile size in pixels, patches per tile side, pixel-shuffle factor n = 1 / downsample_ratio)."""
    vcfg = hf_config.vision_config
    tile, patch = _square(vcfg.image_size), _square(vcfg.patch_size)
    if tile % patch:
        raise UnsupportedError(f"InternVL tile size {tile} is not a multiple of the patch size {patch}.")
    side = tile // patch
    ratio = float(hf_config.downsample_ratio)
    shuffle = round(1 / ratio)
    if abs(shuffle * ratio - 1) > 1e-6 or side % shuffle:
        raise UnsupportedError(f"InternVL downsample_ratio {ratio} must be 1/n with n dividing the {side} patches per tile side.")
    return tile, side, shuffle


def tokens_per_tile(hf_config) -> int:
    """`<IMG_CONTEXT>` tokens (image feature rows) per tile."""
    _, side, shuffle = tile_geometry(hf_config)
    return (side // shuffle) ** 2


class InternVLVisionGraph(nn.Module):
    """InternViT + pixel shuffle + projector: tiles [N, 3, T, T] -> image features [N * tokens_per_tile, E]."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        cfg = hf_model.config
        vcfg = cfg.vision_config
        if cfg.vision_feature_layer != -1:
            raise UnsupportedError(f"InternVL vision_feature_layer={cfg.vision_feature_layer!r}; egm-edge exports the last layer (-1) only.")
        if cfg.vision_feature_select_strategy != "default":
            raise UnsupportedError(f"InternVL vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}; "
                                   "egm-edge exports 'default' (CLS token dropped) only.")
        self.model = nn.Module()
        self.model.vision_tower = hf_model.model.vision_tower
        self.model.multi_modal_projector = hf_model.model.multi_modal_projector
        self.tile, self.side, self.shuffle = tile_geometry(cfg)
        self.tokens_per_tile = (self.side // self.shuffle) ** 2
        emb = self.model.vision_tower.embeddings
        if emb.position_embeddings is not None and emb.position_embeddings.shape[1] != self.side**2 + 1:
            raise UnsupportedError(f"InternVL position embeddings hold {emb.position_embeddings.shape[1] - 1} patches, "
                                   f"not the {self.side**2} of a {self.tile} px tile; egm-edge exports the native tile size only.")
        self.num_heads = vcfg.num_attention_heads
        self.head_dim = vcfg.hidden_size // vcfg.num_attention_heads
        self.hidden = vcfg.hidden_size

    def _attention(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        q = attn.q_norm(attn.q_proj(x)).reshape(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(x)).reshape(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).reshape(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        # Q scaled before the first MatMul: the form TensorRT fuses (egm_edge.export.graphs.ATTENTION_FORM).
        probs = torch.softmax(torch.matmul(q * attn.scale, k.transpose(2, 3)), dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(n, length, self.hidden)
        return attn.projection_layer(out)

    def _pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """InternVLModel.pixel_shuffle on [N, side, side, C] (its "width, height" axes), with static sizes."""
        s, r, c = self.side, self.shuffle, self.hidden
        x = x.reshape(-1, s, s // r, c * r).permute(0, 2, 1, 3)
        x = x.reshape(-1, s // r, s // r, c * r * r).permute(0, 2, 1, 3)
        return x.reshape(-1, self.tokens_per_tile, c * r * r)

    def forward(self, pixel_values: torch.Tensor):
        tower = self.model.vision_tower
        emb = tower.embeddings
        x = emb.patch_embeddings.projection(pixel_values).flatten(2).transpose(1, 2)  # [N, side^2, C]
        x = torch.cat((emb.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if emb.position_embeddings is not None:
            x = x + emb.position_embeddings  # native tile size: what the interpolation computes there
        for layer in tower.encoder.layer:
            x = x + layer.lambda_1 * self._attention(layer.attention, layer.layernorm_before(x))
            x = x + layer.lambda_2 * layer.mlp(layer.layernorm_after(x))
        x = tower.layernorm(x)[:, 1:]
        feats = self.model.multi_modal_projector(self._pixel_shuffle(x.reshape(-1, self.side, self.side, self.hidden)))
        feats = feats.reshape(-1, feats.shape[-1])
        return feats, feats.unsqueeze(0)[:0]


def internvl_vision_export_spec(hf_config) -> tuple[tuple, tuple, dict]:
    """(sample args, dynamic_shapes, dimension names) for exporting InternVLVisionGraph (N tiles dynamic)."""
    return _vision_spec(tile_geometry(hf_config)[0], int(hf_config.vision_config.num_channels))


def vision_export_spec(tiling) -> tuple[tuple, tuple, dict]:
    """`internvl_vision_export_spec` from the export's `TilingConfig` (its tile size is the model's; RGB tiles)."""
    return _vision_spec(tiling.tile_size, 3)


def _vision_spec(t: int, channels: int) -> tuple[tuple, tuple, dict]:
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(2, channels, t, t, generator=gen),)  # 2 tiles: torch.export specialises 0 and 1
    shapes = ({0: torch.export.Dim.DYNAMIC},)
    dims = {"pixel_values": ["tiles", None, None, None], "image_features": ["image_tokens", None],
            "deepstack_features": [None, "image_tokens", None]}
    return args, shapes, dims


def internvl_decoder_config(model) -> dict:
    """Facts the runtime needs to drive an InternVL decoder.onnx (the keys of `egm_edge.runtime.bundle.DecoderShape`,
    as `egm_edge.export.checkpoint.decoder_config` gives them for Qwen3-VL), read from the loaded model."""
    from egm_edge.export.checkpoint import text_facts

    cfg = model.config
    return {
        **text_facts(cfg.text_config),
        "num_deepstack": 0,
        "image_token_id": int(cfg.image_token_id),
        "tokens_per_tile": tokens_per_tile(cfg),
        "cache_dtype": "float32",
    }


# The export stage reads these names from the family's graph module (its record's `graphs`), as for Qwen3-VL's.
VisionGraph = InternVLVisionGraph
vision_io_names = internvl_vision_io_names
DecoderGraph, decoder_export_spec, decoder_io_names = _graphs.DecoderGraph, _graphs.decoder_export_spec, _graphs.decoder_io_names
