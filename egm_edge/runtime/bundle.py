"""A deployable bundle on disk, as the runtime reads it (torch-free).

Layout (written by `egm-edge build`, DESIGN.md "Pipeline"):

    bundle/
      manifest.json            stage "build", target, precision, sources, versions; written last
      vision.onnx              patches + host grid tensors (Qwen3-VL) or tiles (InternVL) -> image features,
                               deepstack features
                               (dynamic int8 with build --vision-int8, manifest["vision"])
      decoder.onnx             one graph for prefill and decode with explicit KV cache
      prefill.onnx             optional (build --prefill-int8, manifest["prefill"]): the same graph with
                               dynamic-int8 Linears, which the CPU executor uses for prompts
      tokenizer.json           the model's tokenizer (every special id is read from it)
      preprocessor_config.json the HF image-processor values (min/max pixels, patch, merge; InternVL's GotOcr2 tiling)
      generation_config.json   model family, think tags, stop tokens (by name), default budget and mode, caps

manifest["runtime"] holds what the host needs to drive the graphs: `decoder`
(num_layers, num_kv_heads, head_dim, hidden_size, vocab_size, num_deepstack,
image_token_id) and `vision`: egm_edge.runtime.vision_inputs.VisionGridConfig for a family whose
preprocessor is "smart_resize", egm_edge.runtime.tiling.TilingConfig (as a dict) for "tiling", which is
then also the bundle's `image_processor`.
generation_config.json's family names the record (egm_edge.models.families) whose prompts
and forced texts the runtime uses; its think tags and stop tokens are read from it, not
assumed. A directory without manifest.json is not a bundle. `open_bundle` reads the manifest
and configs only; `Grounder.open` also checks every file against the sha256 the
manifest records (egm_edge.runtime.integrity) before loading the graphs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from egm_edge.errors import CheckpointError, InputError
from egm_edge.models.families import QWEN3_VL, Family, family_names, get_family
from egm_edge.runtime.preprocess import ImageProcessorConfig
from egm_edge.runtime.tiling import TilingConfig
from egm_edge.runtime.vision_inputs import VisionGridConfig

BUNDLE_FILES = ("manifest.json", "vision.onnx", "decoder.onnx", "tokenizer.json", "preprocessor_config.json", "generation_config.json")


# runtime.decoder.kv_cache in an export/bundle manifest: what the decoder graph lets the runtime do.
KV_CACHE_IN_PLACE = "in_place"  # past and present may be one buffer (GroupQueryAttention, egm_edge.export.fused)
KV_CACHE_GROWING = "growing"  # present is a new tensor, past + new rows (older and TensorRT-lowered exports)


@dataclass(frozen=True)
class DecoderShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    num_deepstack: int
    image_token_id: int
    kv_cache: str = KV_CACHE_GROWING  # KV_CACHE_IN_PLACE or KV_CACHE_GROWING
    # Rows of the graph's M-RoPE cos/sin tables (egm_edge.export.fused); 0: computed in the graph, no limit.
    rope_positions: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderShape":
        values = {f.name: int(d[f.name]) for f in fields(cls) if f.name not in ("kv_cache", "rope_positions")}
        return cls(**values, kv_cache=str(d.get("kv_cache") or KV_CACHE_GROWING), rope_positions=int(d.get("rope_positions") or 0))


@dataclass(frozen=True)
class GenerationConfig:
    """Decode defaults shipped with a bundle; per-request arguments override them. The family and its
    token texts default to the Qwen3-VL record's; `for_family` fills them from another record."""

    family: str = QWEN3_VL.name
    think_open: str = QWEN3_VL.tokens.think_open
    think_close: str = QWEN3_VL.tokens.think_close
    stop_tokens: tuple[str, ...] = QWEN3_VL.tokens.stop
    think_budget: int | None = None  # None = unlimited
    budget_mode: str = "hard"
    max_answer_tokens: int = 128
    max_seq_len: int = 4096  # planned maximum of prompt + image tokens + output

    @classmethod
    def for_family(cls, family, **kw) -> "GenerationConfig":
        """The config for a family (a name or a record), its think tags and stop tokens from the record."""
        f = get_family(family)
        return cls(family=f.name, think_open=f.tokens.think_open, think_close=f.tokens.think_close,
                   stop_tokens=f.tokens.stop, **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop_tokens"] = list(self.stop_tokens)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "stop_tokens" in kw:
            kw["stop_tokens"] = tuple(kw["stop_tokens"])
        return cls(**kw)


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict
    decoder: DecoderShape
    vision: VisionGridConfig | TilingConfig
    image_processor: ImageProcessorConfig | TilingConfig
    generation: GenerationConfig

    @property
    def target(self) -> str:
        return self.manifest.get("target", "cpu")

    @property
    def precision(self) -> str:
        return self.manifest.get("precision", "unknown")

    @property
    def name(self) -> str:
        return self.manifest.get("name") or self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def family(self) -> Family:
        """The record of the family generation_config.json names; one sentence when this egm-edge lacks it."""
        try:
            return get_family(self.generation.family)
        except InputError:
            raise CheckpointError(
                f"Bundle {self.path} is for the model family {self.generation.family!r}, which this egm-edge does not "
                f"know (it knows {', '.join(family_names())}); rebuild the bundle or upgrade egm-edge."
            ) from None


def _read(path: Path, what: str) -> dict:
    from egm_edge.artifacts import read_json

    return read_json(path, missing=f"{path.parent} has no {path.name}; it is not a complete {what}.", restore=f"rebuild the {what}")


def open_bundle(path) -> Bundle:
    """Read and check a bundle directory; one clear sentence for anything missing or foreign."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"Bundle directory {path} does not exist; build one with `egm-edge build --target cpu`.")
    if not (path / "manifest.json").is_file():
        raise CheckpointError(
            f"{path} has no manifest.json, so it is not a finished bundle (an interrupted build leaves none); rebuild it."
        )
    manifest = _read(path / "manifest.json", "bundle")
    if manifest.get("stage") != "build":
        raise CheckpointError(
            f"{path} holds a {manifest.get('stage', 'unknown')!r} artifact, not a bundle; run `egm-edge build` on it."
        )
    missing = [f for f in BUNDLE_FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"Bundle {path} is missing {', '.join(missing)}; rebuild it.")
    rt = manifest.get("runtime") or {}
    generation = GenerationConfig.from_dict(_read(path / "generation_config.json", "bundle"))
    tiling = generation.family in family_names() and get_family(generation.family).preprocessor == "tiling"
    try:
        decoder = DecoderShape.from_dict(rt["decoder"])
        vision = TilingConfig.from_dict(rt["vision"]) if tiling else VisionGridConfig.from_dict(rt["vision"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"Bundle {path} has an incomplete manifest 'runtime' section ({e}); rebuild it.") from None
    return Bundle(
        path=path,
        manifest=manifest,
        decoder=decoder,
        vision=vision,
        image_processor=vision if tiling else ImageProcessorConfig.from_json(path / "preprocessor_config.json"),
        generation=generation,
    )


def load_tokenizer(path):
    """The bundle's `tokenizers.Tokenizer`, or one sentence when the file is not one."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises a bare Exception for any malformed file
        raise CheckpointError(f"{path} is not a tokenizer the `tokenizers` library can read ({one_line(e)}); rebuild the bundle.") from None


def one_line(e: BaseException) -> str:
    """An exception's message as a clause inside one of our sentences: one line, no inner full stops."""
    text = " ".join(str(e).split()).replace(". ", ", ").rstrip(".")
    return text or type(e).__name__
