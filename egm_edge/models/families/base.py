"""The family record and the registry: what egm-edge knows about one model family, in one frozen value.

Contract: `Family` holds everything that differs between model families: the Hugging Face
architectures it accepts, EGM's user-text templates and the chat prompt around them, the
answer's box tag, the special tokens (reasoning open/close, stop, image placeholders), the
module prefixes quantization reads (language model; what stays 16-bit), the image
preprocessor and position-id scheme, the config.json keys that hold special-token ids, and
where its config reader and writer, vision parameter count, PyTorch class and export graph
builders live (dotted paths, imported only by the stage that needs them: `code(field)`). `stages`
says which stages egm-edge runs for the family today; every gate asks `require(stage)`.

`register(family)` adds one (tests register a toy family); `get_family(name)`,
`family_names()` and `family_of_config(cfg)` read the registry. Pure Python, no imports
beyond the standard library: the torch-free runtime reads it too.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from egm_edge.errors import CheckpointError, InputError, UnsupportedError

TASKS = ("vanilla", "amodal")
# (preprocessor, positions) pairs the reference runner, export and the CPU runtime have code paths for.
LAYOUTS = (("smart_resize", "mrope"), ("tiling", "rope1d"))
# What egm-edge does with a family, in pipeline order.
STAGES = ("plan", "reference", "quantize", "export", "runtime")


@dataclass(frozen=True)
class FamilyTokens:
    """Special tokens by their text (ids always come from the model's own tokenizer)."""

    think_open: str  # the generation prompt opens the reasoning with it (outputs hold only the close)
    think_close: str
    stop: tuple[str, ...]  # any of these ends generation
    image: str  # one per image feature row
    image_start: str  # around an image's run of `image` tokens
    image_end: str
    stop_thinking: str  # text forced when a think budget runs out in "qwen" mode; ends with think_close + "\n\n"
    extra: tuple[str, ...] = ()  # other special tokens a tokenizer of this family carries

    def all(self) -> tuple[str, ...]:
        names = (self.think_open, self.think_close, *self.stop, self.image, self.image_start, self.image_end, *self.extra)
        return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class Family:
    name: str  # the registry key, as bundles and manifests record it
    title: str  # for messages: "Qwen3-VL"
    architectures: tuple[str, ...]  # config.json "architectures" values this family accepts
    model_types: tuple[str, ...]  # config.json "model_type" values, for configs without architectures
    hf_class: str  # transformers class that loads a checkpoint of this family (never trust_remote_code)
    templates: Mapping[str, str]  # task -> user text with {expr}, exactly as EGM sends it
    user_turn: str  # the chat prompt's user turn: {image} then {text}
    image_placeholder: str  # {image} for one image: {tokens} is the run of image tokens
    generation_prompt: str  # after the user turn; opens the reasoning where the model thinks
    tokens: FamilyTokens
    box_tag: tuple[str, str] | None  # the answer's box tag, tried before EGM's generic rules
    language_prefix: str  # module prefix of the language model's layers (quantized)
    vision_prefixes: tuple[str, ...]  # vision tower and projector: 16-bit unless vision="fp8"
    vision_stem: str  # the patch embedding inside the vision tower: never quantized
    preprocessor: str  # "smart_resize" (Qwen3-VL processor) or "tiling" (InternVL 448-px tiles)
    positions: str  # "mrope" (3-D) or "rope1d"
    config_reader: str  # "module:function" giving a ModelSpec from a config dict
    graphs: str  # module holding the export graph builders for the vision tower
    stages: frozenset[str] = field(default_factory=frozenset)
    chat_template: str = ""  # the jinja chat template tiny test checkpoints of this family ship
    added_tokens: tuple[tuple[str, bool], ...] = ()  # a tokenizer's added tokens in order, (text, special)
    ref_tag: tuple[str, str] | None = None  # the tag around a referring expression in this family's training data
    # "module:function" writing the transformers config dict of a ModelSpec (architectures[0] names it).
    config_writer: str = ""
    # "module:function" giving {"vision_blocks", "mergers"} PartParams of a VisionSpec (models.spec.params()).
    vision_params: str = ""
    # config.json keys that hold a special token's id -> that token's text (ids come from the tokenizer).
    config_tokens: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.templates) != set(TASKS):
            raise ValueError(f"family {self.name}: templates must cover exactly {TASKS}")
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise ValueError(f"family {self.name}: unknown stages {sorted(unknown)}")
        object.__setattr__(self, "stages", frozenset(self.stages))
        object.__setattr__(self, "templates", dict(self.templates))
        object.__setattr__(self, "config_tokens", dict(self.config_tokens))

    # -- prompts ------------------------------------------------------------------------------------------
    def user_text(self, expression: str, task: str = "vanilla") -> str:
        """EGM's user text for an already cleaned expression (grounding.user_text cleans it)."""
        if task not in self.templates:
            raise InputError(f"Unknown task {task!r}. Choose from: {', '.join(TASKS)}.")
        return self.templates[task].format(expr=expression)

    def chat_prompt(self, text: str, n_image_tokens: int) -> str:
        """One user turn (image first, then text), no system prompt, then the generation prompt; the image
        placeholder expanded to `n_image_tokens` image tokens as the HF processor does."""
        if n_image_tokens < 0:
            raise ValueError(f"n_image_tokens must be >= 0, got {n_image_tokens}")
        image = self.image_placeholder.format(tokens=self.tokens.image * n_image_tokens) if n_image_tokens else ""
        return self.user_turn.format(image=image, text=text) + self.generation_prompt

    @property
    def hard_close(self) -> str:
        """What a spent think budget forces in "hard" mode: the template's own separator."""
        return "\n" + self.tokens.think_close + "\n\n"

    # -- stages -------------------------------------------------------------------------------------------
    def supports(self, stage: str) -> bool:
        return stage in self.stages

    def require(self, stage: str, what: str) -> None:
        """Refuse in one sentence a stage this family does not run yet."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        if stage not in self.stages:
            able = [f.title for f in _REGISTRY.values() if stage in f.stages]
            raise UnsupportedError(
                f"{what} is a model of the {self.title} family, which egm-edge's {stage} stage does not run yet "
                f"(it runs {', '.join(able) or 'no family'}); {self.title} goes through: "
                f"{', '.join(sorted(self.stages, key=STAGES.index)) or 'nothing'}."
            )

    def require_layout(self, what: str, who: str, layouts=LAYOUTS, then: str = "") -> None:
        """Refuse in one sentence a family whose (preprocessor, positions) `who` has no code path for."""
        if (self.preprocessor, self.positions) not in layouts:
            known = " or ".join(f"{a} preprocessing with {b} positions" for a, b in layouts)
            raise UnsupportedError(
                f"{what} is a {self.title} model ({self.preprocessor} preprocessing, {self.positions} positions), "
                f"but {who} drives only {known}{then}.")

    def load(self, ref: str) -> Any:
        """Import a "module:attribute" reference of this record (a config reader, a graph module)."""
        module, _, attr = ref.partition(":")
        mod = importlib.import_module(module)
        return getattr(mod, attr) if attr else mod

    def code(self, what: str) -> Any:
        """What this record's field `what` ("config_reader", "config_writer", "vision_params", "graphs") points to."""
        ref = getattr(self, what)
        if not ref:
            raise UnsupportedError(f"The {self.title} family's record names no {what} yet; add it to the family's record "
                                   "in egm_edge/models/families.")
        return self.load(ref)


_REGISTRY: dict[str, Family] = {}


def register(family: Family, *, replace: bool = False) -> Family:
    """Add a family; its architectures must not belong to another one."""
    if family.name in _REGISTRY and not replace:
        raise ValueError(f"family {family.name!r} is already registered")
    for other in _REGISTRY.values():
        if other.name != family.name and set(other.architectures) & set(family.architectures):
            raise ValueError(f"family {family.name!r} claims architectures of {other.name!r}")
    _REGISTRY[family.name] = family
    return family


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def family_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def families() -> tuple[Family, ...]:
    return tuple(_REGISTRY.values())


def get_family(name) -> Family:
    if isinstance(name, Family):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise InputError(f"Unknown model family {name!r}. Choose from: {', '.join(_REGISTRY)}.") from None


def family_of_config(cfg: Mapping, where: str = "the config") -> Family:
    """The family a checkpoint's config.json belongs to (by architecture, else model_type)."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    model_type = cfg.get("model_type")
    for f in _REGISTRY.values():
        if arch in f.architectures or (arch is None and model_type in f.model_types):
            return f
    found = arch or (f"model_type {model_type}" if model_type else "no architecture")
    known = ", ".join(a for f in _REGISTRY.values() for a in f.architectures)
    raise CheckpointError(f"Unsupported architecture {found!r} in {where}; egm-edge supports {known}.")
