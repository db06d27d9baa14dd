"""Model specs: the architecture numbers of an EGM model and the parameter counts they imply.

Contract: `ModelSpec` is a frozen dataclass (family, name, `TextSpec`, `VisionSpec`)
that validates itself when built and round-trips through `to_dict`/`from_dict`
(plain JSON types); its family is a name in the family registry
(`egm_edge.models.families`). `spec.params()` derives the parameter count of every part
(embeddings, language-model blocks, lm_head, vision blocks, mergers) from the
dimensions alone, split into matmul weights (what quantization touches) and
other parameters (norms, biases, embeddings tables, position tables), exactly as
the Hugging Face modules lay them out; the vision tower's count is the function the
family's record names (`vision_params`). Pure Python: no torch, no numpy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from egm_edge.errors import CheckpointError
from egm_edge.models.families import family_names, get_family

FAMILIES = family_names()  # the built-in families; ModelSpec checks against the live registry
PARTS = ("embeddings", "language_blocks", "lm_head", "vision_blocks", "mergers")
SPEC_VERSION = 1


def _check_positive(owner: str, obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(obj, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise CheckpointError(f"Model spec {owner}.{name}={v!r} must be a positive integer; fix the model config.")


@dataclass(frozen=True)
class TextSpec:
    """The language model: a decoder of `layers` blocks with grouped-query attention and a gated MLP."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool = False  # Qwen2 (InternVL's LLM) has q/k/v biases; Qwen3 does not
    qk_norm: bool = True  # Qwen3 RMS-normalises q and k per head
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, ...] = ()  # () = plain 1-D RoPE; Qwen3-VL splits T/H/W
    mrope_interleaved: bool = False
    max_positions: int = 262_144

    def __post_init__(self) -> None:
        _check_positive("text", self, ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "max_positions"))
        if self.heads % self.kv_heads:
            raise CheckpointError(f"Model spec text.heads={self.heads} is not a multiple of kv_heads={self.kv_heads}; fix the model config.")
        object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
        if self.mrope_section and sum(self.mrope_section) * 2 != self.head_dim:
            raise CheckpointError(
                f"Model spec mrope_section={list(self.mrope_section)} covers {2 * sum(self.mrope_section)} rotary dims, "
                f"not head_dim={self.head_dim}; fix rope_scaling in the model config."
            )

    def kv_elements_per_token(self) -> int:
        """Elements of K and V cached per token, all layers together."""
        return 2 * self.layers * self.kv_heads * self.head_dim


@dataclass(frozen=True)
class VisionSpec:
    """The vision tower: a ViT over `patch` x `patch` pixels, then `merge` x `merge` patches per LLM token."""

    depth: int
    hidden: int
    heads: int
    intermediate: int
    patch: int
    merge: int
    out_hidden: int  # the LLM's hidden size the merger projects to
    temporal_patch: int = 1  # Qwen3-VL folds 2 frames (a still image is duplicated)
    deepstack: tuple[int, ...] = ()  # ViT layers whose features are injected into early LLM layers
    num_position_embeddings: int = 0  # learned position table (Qwen3-VL: 2304, interpolated)
    image_size: int = 0  # fixed tile side (InternVL: 448); 0 = dynamic resolution (Qwen)
    class_token: bool = False  # InternViT prepends a CLS token per tile
    layer_scale: bool = False  # InternViT scales both residual branches (ls1/ls2)
    max_tiles: int = 0  # InternVL dynamic tiling: most 448-px tiles per image
    thumbnail: bool = False  # InternVL adds a global thumbnail tile when it tiles
    min_pixels: int = 65_536  # Qwen smart-resize bounds (preprocessor_config.json)
    max_pixels: int = 16_777_216
    in_channels: int = 3

    def __post_init__(self) -> None:
        _check_positive("vision", self, ("depth", "hidden", "heads", "intermediate", "patch", "merge", "out_hidden", "temporal_patch", "in_channels"))
        if self.hidden % self.heads:
            raise CheckpointError(f"Model spec vision.hidden={self.hidden} is not a multiple of heads={self.heads}; fix the model config.")
        object.__setattr__(self, "deepstack", tuple(int(i) for i in self.deepstack))
        bad = [i for i in self.deepstack if not 0 <= i < self.depth]
        if bad:
            raise CheckpointError(f"Model spec deepstack indexes {bad} are outside the {self.depth} vision layers; fix the model config.")

    @property
    def tiled(self) -> bool:
        return self.image_size > 0


@dataclass(frozen=True)
class PartParams:
    """Parameters of one part: `matmul` weights (quantizable) and `other` (norms, biases, tables)."""

    matmul: int
    other: int

    @property
    def total(self) -> int:
        return self.matmul + self.other


@dataclass(frozen=True)
class ModelSpec:
    """An EGM model's architecture: family, display name, language model and vision tower."""

    family: str
    name: str
    text: TextSpec
    vision: VisionSpec
    source: str = ""  # checkpoint the numbers come from (e.g. a Hugging Face id)
    published_params_b: float | None = None  # size the model card states, billions

    def __post_init__(self) -> None:
        if self.family not in family_names():
            raise CheckpointError(f"Unknown model family {self.family!r}; egm-edge supports {', '.join(family_names())}.")
        if not self.name:
            raise CheckpointError("A model spec needs a name; pass one.")
        if self.vision.out_hidden != self.text.hidden:
            raise CheckpointError(
                f"Vision out_hidden={self.vision.out_hidden} does not match the language model's hidden={self.text.hidden}; fix the model config."
            )

    # ---- parameter counts -------------------------------------------------------------------
    def params(self) -> dict[str, PartParams]:
        """Parameter counts by part, derived from the dimensions (see the module docstring)."""
        t, v = self.text, self.vision
        q_out, kv_out = t.heads * t.head_dim, t.kv_heads * t.head_dim
        block_matmul = t.hidden * (q_out + 2 * kv_out) + q_out * t.hidden + 3 * t.hidden * t.intermediate
        block_other = 2 * t.hidden  # input and post-attention RMSNorm
        if t.qkv_bias:
            block_other += q_out + 2 * kv_out
        if t.qk_norm:
            block_other += 2 * t.head_dim
        lm = PartParams(t.layers * block_matmul, t.layers * block_other + t.hidden)  # + final norm
        table = t.vocab * t.hidden
        parts = {
            "embeddings": PartParams(0, table),
            "language_blocks": lm,
            # A tied lm_head is the embedding table itself: no parameters of its own.
            "lm_head": PartParams(0 if t.tied_embeddings else table, 0),
        }
        parts.update(get_family(self.family).code("vision_params")(v, t.hidden))
        return parts

    def total_params(self) -> int:
        return sum(p.total for p in self.params().values())

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["text"]["mrope_section"] = list(self.text.mrope_section)
        d["vision"]["deepstack"] = list(self.vision.deepstack)
        d["version"] = SPEC_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        d = dict(d)
        version = d.pop("version", SPEC_VERSION)
        if version != SPEC_VERSION:
            raise CheckpointError(f"Model spec version {version} is not supported (this egm-edge reads version {SPEC_VERSION}); rebuild the artifact.")
        try:
            text = TextSpec(**_known(TextSpec, d.pop("text")))
            vision = VisionSpec(**_known(VisionSpec, d.pop("vision")))
            return cls(text=text, vision=vision, **_known(cls, d))
        except (TypeError, KeyError) as e:
            raise CheckpointError(f"Model spec is malformed ({e}); rebuild it with egm-edge.") from None


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)} - {"text", "vision"}
    unknown = set(d) - names
    if unknown:
        raise CheckpointError(f"Model spec has unknown fields {sorted(unknown)} for {cls.__name__}; rebuild it with this egm-edge.")
    return d


def _linear(n_in: int, n_out: int, bias: bool = True) -> PartParams:
    return PartParams(n_in * n_out, n_out if bias else 0)


def _add(*ps: PartParams) -> PartParams:
    return PartParams(sum(p.matmul for p in ps), sum(p.other for p in ps))


def _vit_block(v: VisionSpec) -> tuple[PartParams, int]:
    """(one ViT block, the patch embedding): LayerNorm x2 (weight+bias), fused qkv and output projection,
    2-layer GELU MLP; the patch embedding is a convolution kept in 16-bit like the position table: "other"."""
    h = v.hidden
    block = _add(_linear(h, 3 * h), _linear(h, h), _linear(h, v.intermediate), _linear(v.intermediate, h), PartParams(0, 4 * h))
    if v.layer_scale:
        block = _add(block, PartParams(0, 2 * h))
    patch_in = v.in_channels * v.temporal_patch * v.patch * v.patch
    return block, patch_in * h + h


def qwen3_vl_vision_params(v: VisionSpec, llm_hidden: int) -> dict[str, PartParams]:
    """Qwen3-VL's ViT: learned position table, a 2x2 patch merger and one more merger per deepstack layer."""
    h = v.hidden
    block, stem = _vit_block(v)
    stem += v.num_position_embeddings * h
    merged = h * v.merge * v.merge
    # Main merger normalises before the 2x2 shuffle (h), deepstack mergers after it (merged).
    merger = _add(_linear(merged, merged), _linear(merged, v.out_hidden))
    mergers = _add(merger, PartParams(0, 2 * h), *[_add(merger, PartParams(0, 2 * merged)) for _ in v.deepstack])
    return {"vision_blocks": PartParams(v.depth * block.matmul, v.depth * block.other + stem), "mergers": mergers}


def internvl_vision_params(v: VisionSpec, llm_hidden: int) -> dict[str, PartParams]:
    """InternViT: CLS token, position table over the tile's patches + CLS, pixel-shuffle MLP projector."""
    h = v.hidden
    block, stem = _vit_block(v)
    n_pos = (v.image_size // v.patch) ** 2 + (1 if v.class_token else 0)
    stem += n_pos * h + (h if v.class_token else 0)
    merged = h * v.merge * v.merge
    mergers = _add(PartParams(0, 2 * merged), _linear(merged, llm_hidden), _linear(llm_hidden, llm_hidden))
    return {"vision_blocks": PartParams(v.depth * block.matmul, v.depth * block.other + stem), "mergers": mergers}
