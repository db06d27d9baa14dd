"""The reference runner: a local checkpoint decoded greedily with PyTorch + transformers.

Contract: `ReferenceRunner.open(model_dir)` loads a checkpoint of a family whose record
runs the reference stage with the record's transformers class (safetensors only, no
remote code, nothing downloaded; a ModelOpt quantized checkpoint goes through
`egm_edge.quantize.loader.load_dequantized`). Two layouts (the record's preprocessor and
positions): Qwen3-VL's smart-resize patches with 3-D M-RoPE, and InternVL's 448-px tiles
(`egm_edge.runtime.tiling`) with plain 1-D positions.
Inputs are built as the HF processor builds them but without torchvision:
`egm_edge.runtime.preprocess` / `runtime.tiling` for pixels, the family record's
`chat_prompt` for the text, the checkpoint's tokenizer.json through `tokenizers`.
Decoding shares the runtime's pieces (`runtime.budget.BudgetPolicy`,
`runtime.sampling.Sampler`), so the thinking budget and token choice here are the ones
the deployed runtime applies (a closing think tag that is text, not one token, as in
InternVL-3's tokenizer, is matched as a sequence there); only the network differs.
`ground()` returns a `GroundingResult` whose box is in pixels of the original image,
parsed with the family's tags. An original-layout checkpoint (config.json without
text_config, e.g. OpenGVLab's InternVLChatModel) is refused with the `egm-edge convert`
command that fixes it. torch/transformers load in `open()`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from egm_edge.errors import CheckpointError, InputError, UnsupportedError
from egm_edge.models.families import Family, family_of_config, get_family
from egm_edge.runtime.preprocess import ImageProcessorConfig, PreprocessedImage, preprocess_image

DTYPES = ("float32", "bfloat16", "float16")
# What this runner drives (from the family record's preprocessor and positions).


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def read_model_config(model_dir: Path, stage: str = "reference") -> dict[str, Any]:
    """config.json of a checkpoint whose family runs `stage`, or one sentence saying what was found instead:
    a CheckpointError for an architecture no family claims, an UnsupportedError for a family `stage` does not run."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"Model directory {model_dir} does not exist; pass a local Hugging Face checkpoint directory.")
    from egm_edge.artifacts import read_json

    cfg = read_json(model_dir / "config.json", restore="restore the checkpoint's config.json",
                    missing=f"Model directory {model_dir} has no config.json; pass a Hugging Face checkpoint directory.")
    family = family_of_config(cfg, f"checkpoint {model_dir}")
    family.require(stage, f"Checkpoint {model_dir}")
    arch = (cfg.get("architectures") or [None])[0]
    if arch and arch != family.hf_class and "text_config" not in cfg:  # e.g. OpenGVLab's remote-code InternVL layout
        raise CheckpointError(
            f"Checkpoint {model_dir} is in the original {arch} layout, which {family.hf_class} does not load; convert it "
            f"first: egm-edge convert --checkpoint {model_dir} --out DIR."
        )
    family.require_layout(f"Checkpoint {model_dir}", "the reference runner")
    return cfg


def _image_config(model_dir: Path, cfg: dict[str, Any], family: Family):
    """The checkpoint's image settings: an ImageProcessorConfig (smart resize) or a TilingConfig (tiles)."""
    if family.preprocessor == "tiling":
        return _tiling_config(model_dir, cfg)
    vision = cfg.get("vision_config") or {}
    path = model_dir / "preprocessor_config.json"
    if path.is_file():
        icfg = ImageProcessorConfig.from_json(path)
    else:
        icfg = ImageProcessorConfig(
            patch_size=int(vision.get("patch_size", 16)),
            merge_size=int(vision.get("spatial_merge_size", 2)),
            temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
        )
    for key, mine in (("patch_size", icfg.patch_size), ("spatial_merge_size", icfg.merge_size), ("temporal_patch_size", icfg.temporal_patch_size)):
        if key in vision and int(vision[key]) != mine:
            raise CheckpointError(
                f"{path.name} has {key}={mine} but config.json's vision_config has {vision[key]}; the checkpoint is inconsistent."
            )
    return icfg


def _tiling_config(model_dir: Path, cfg: dict[str, Any]):
    """preprocessor_config.json's tiles, checked against config.json's geometry (tile, patch, pixel shuffle)."""
    from egm_edge.models.hf_config import spec_from_config
    from egm_edge.runtime.tiling import TilingConfig

    v = spec_from_config(cfg).vision
    path = model_dir / "preprocessor_config.json"
    if not path.is_file():
        return TilingConfig(tile_size=v.image_size, max_patches=v.max_tiles or 12, use_thumbnail=v.thumbnail, patch_size=v.patch,
                            downsample_ratio=1 / v.merge)
    tcfg = TilingConfig.from_json(path)
    for key, mine, theirs in (("tile size", tcfg.tile_size, v.image_size), ("patch_size", tcfg.patch_size, v.patch),
                              ("pixel-shuffle factor", round(1 / tcfg.downsample_ratio), v.merge)):
        if mine != theirs:
            raise CheckpointError(
                f"{path.name} has {key} {mine} but config.json has {theirs}; the checkpoint is inconsistent."
            )
    return tcfg


@dataclass
class TiledImage:
    """One image as InternVL's processor hands it over: its tiles (thumbnail included) and prompt size."""

    pixel_values: Any  # float32 [tiles, 3, tile, tile]
    original: tuple[int, int]  # (height, width) as loaded
    n_image_tokens: int
    grid_thw: None = None  # no patch grid: tiles have a fixed size

    @property
    def n_tiles(self) -> int:
        return int(self.pixel_values.shape[0])


@dataclass
class Generation:
    """Output of one decode: emitted token ids (stop token included) and how they came about."""

    tokens: list[int]
    think_tokens: int
    answer_tokens: int
    budget_forced: bool
    truncated: bool
    timings: dict[str, float] = field(default_factory=dict)  # ms: vision, prefill, decode, ms_per_token

    @property
    def decode_steps(self) -> int:
        return max(len(self.tokens) - 1, 0)


@dataclass
class Prompt:
    """A rendered grounding request: token ids and the image tensors they refer to."""

    ids: list[int]
    image: PreprocessedImage | TiledImage
    preprocess_ms: float


class ReferenceRunner:
    """A loaded checkpoint plus its tokenizer and image settings; reusable across requests."""

    def __init__(self, model, tokenizer, image_config, model_dir: Path, device: str,
                 family: Family | str | None = None):
        from egm_edge.runtime.budget import ThinkTokens
        from egm_edge.runtime.bundle import GenerationConfig

        # The family a model in hand belongs to, when not given: its config's architecture (or model_type).
        self.family = get_family(family) if family is not None else family_of_config(model.config.to_dict(), "the model's config")
        self.model = model
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.model_dir = model_dir
        self.device = device
        self.image_token_id = int(model.config.image_token_id)
        t = self.family.tokens
        generation = GenerationConfig(family=self.family.name, think_open=t.think_open, think_close=t.think_close,
                                      stop_tokens=tuple(t.stop))
        self.think_ids = ThinkTokens.from_tokenizer(tokenizer, generation)

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def open(cls, model_dir: str | Path, dtype: str = "float32", device: str = "cpu") -> "ReferenceRunner":
        """Load a local checkpoint (see the module docstring for what is refused)."""
        model_dir = Path(model_dir)
        cfg = read_model_config(model_dir)
        family = family_of_config(cfg, f"checkpoint {model_dir}")
        if dtype not in DTYPES:
            raise InputError(f"Unknown dtype {dtype!r}. Choose from: {', '.join(DTYPES)}.")
        if not (model_dir / "tokenizer.json").is_file():
            raise CheckpointError(f"Model directory {model_dir} has no tokenizer.json; copy the model's tokenizer files there.")
        image_config = _image_config(model_dir, cfg, family)
        quantized = (model_dir / "hf_quant_config.json").is_file()
        if not quantized and not any(model_dir.glob("*.safetensors")):
            others = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt*"))
            raise CheckpointError(
                f"Model directory {model_dir} has no .safetensors weights (found {', '.join(others) or 'none'}); "
                "only safetensors are loaded, convert the checkpoint first."
            )

        import torch
        from tokenizers import Tokenizer

        tdtype = getattr(torch, dtype)
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise UnsupportedError(f"Device {device!r} was asked for but this machine has no CUDA; use --device cpu.")
        if quantized:
            try:
                from egm_edge.quantize.loader import load_dequantized
            except ImportError as e:
                raise CheckpointError(
                    f"Checkpoint {model_dir} is ModelOpt-quantized (hf_quant_config.json) but its loader "
                    f"egm_edge.quantize.loader is not available ({e}); install egm-edge with the quant extra."
                ) from None
            model = load_dequantized(model_dir, dtype=tdtype)
        else:
            model = _load_hf(model_dir, tdtype, family)
        model = model.to(device).eval()
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        return cls(model, tokenizer, image_config, model_dir, device, family)

    # -- inputs ----------------------------------------------------------------------------

    def build_prompt(self, image, expression: str, task: str = "vanilla", *, exif_transpose: bool = True) -> Prompt:
        """Load + preprocess the image and tokenize the EGM prompt for it."""
        from egm_edge.grounding import clean_expression
        from egm_edge.runtime.image import load_image

        t0 = time.perf_counter()
        fam = self.family
        text = fam.user_text(clean_expression(expression), task)  # validates expression and task before any pixel work
        img = load_image(image, exif_transpose=exif_transpose)
        pre = self.preprocess(img)
        ids = self.tokenizer.encode(fam.chat_prompt(text, pre.n_image_tokens), add_special_tokens=False).ids
        n_pad = sum(1 for i in ids if i == self.image_token_id)
        if n_pad != pre.n_image_tokens:
            raise CheckpointError(
                f"The tokenizer in {self.model_dir} turned {pre.n_image_tokens} {fam.tokens.image} into {n_pad} image tokens "
                f"(id {self.image_token_id}); tokenizer.json and config.json do not belong together."
            )
        return Prompt(ids, pre, _ms(t0))

    def preprocess(self, img) -> PreprocessedImage | TiledImage:
        """A loaded PIL image as this family's processor prepares it."""
        if self.family.preprocessor != "tiling":
            return preprocess_image(img, self.image_config)
        from egm_edge.runtime.tiling import image_token_count, tile_image

        px = tile_image(img, self.image_config)
        return TiledImage(px, (img.height, img.width), image_token_count(int(px.shape[0]), self.image_config))

    # -- decoding --------------------------------------------------------------------------

    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        pixel_values=None,
        grid_thw=None,
        *,
        settings=None,
        think_budget=None,
        budget_mode: str | None = None,
        max_new_tokens: int | None = None,
        max_answer_tokens: int | None = None,
        sampling=None,
    ) -> Generation:
        """Decode after `prompt_ids` with a KV cache under the thinking budget policy.

        pixel_values: float32 [n_patches, 3*T*P*P] (numpy or torch) and grid_thw
        [n_images, 3] (or one (t, h, w) tuple); both None for a text-only prompt. For a tiled
        family (InternVL): pixel_values [tiles, 3, tile, tile] and no grid_thw.
        settings: a `runtime.settings.DecodeSettings`; the keywords override it. What is not given takes the
        built-in defaults (unlimited, hard, 4096 new and 128 answer tokens, greedy as EGM evaluates).
        """
        import numpy as np
        import torch

        from egm_edge.runtime.budget import BudgetPolicy
        from egm_edge.runtime.sampling import Sampler, SamplingSpec

        s = _settings(settings, think_budget, budget_mode, max_new_tokens, max_answer_tokens, sampling)
        policy = BudgetPolicy(s, self.think_ids, s.max_new_tokens)
        sampler = Sampler(s.sampling or SamplingSpec(), banned=(self.image_token_id,))  # as the runtime does
        model, dev = self.model, self.device
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=dev)
        timings: dict[str, float] = {}

        with torch.inference_mode():
            t0 = time.perf_counter()
            mm: dict[str, Any] = {}
            grid = None
            rope1d = self.family.positions == "rope1d"
            if pixel_values is not None:
                pv = torch.as_tensor(np.asarray(pixel_values, dtype=np.float32), device=dev).to(next(model.parameters()).dtype)
                if rope1d:
                    mm["image"] = model.model.get_image_features(pv, return_dict=True)
                else:
                    grid = torch.as_tensor(np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3), device=dev)
                    mm["image"] = model.model.get_image_features(pv, grid, return_dict=True)
            timings["vision"] = _ms(t0)

            t0 = time.perf_counter()
            positions, delta = self._prefill_positions(ids, grid)
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config.get_text_config())
            out = model(
                input_ids=ids,
                **({} if rope1d else {"image_grid_thw": grid}),
                mm_encoder_outputs=mm or None,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits[0, -1]
            timings["prefill"] = _ms(t0)

            t0 = time.perf_counter()
            tokens: list[int] = []
            past = ids.shape[1]
            while True:
                tok = policy.forced()
                if tok is None:
                    tok = sampler(logits.float().cpu().numpy())
                tokens.append(tok)
                policy.observe(tok)
                if policy.done:
                    break
                if rope1d:
                    step_pos = torch.full((1, 1), past, dtype=torch.long, device=dev)
                else:
                    step_pos = torch.full((4, 1, 1), past, dtype=torch.long, device=dev)
                    step_pos[1:] += delta  # mrope rows continue from the image-shifted position
                out = model(
                    input_ids=torch.tensor([[tok]], dtype=torch.long, device=dev),
                    position_ids=step_pos,
                    past_key_values=cache,
                    use_cache=True,
                )
                logits = out.logits[0, -1]
                past += 1
            timings["decode"] = _ms(t0)
        steps = max(len(tokens) - 1, 0)
        timings["ms_per_token"] = timings["decode"] / steps if steps else 0.0
        return Generation(tokens, policy.think_tokens, policy.answer_tokens, policy.budget_forced, policy.truncated, timings)

    def _prefill_positions(self, ids, grid):
        """[4, 1, S] position ids (text row + 3 mrope rows) and the mrope delta, via transformers' own get_rope_index;
        for 1-D RoPE, [1, S] positions 0..S-1 (image tokens count as text)."""
        import torch

        n = ids.shape[1]
        if self.family.positions == "rope1d":
            return torch.arange(n, dtype=torch.long, device=ids.device).view(1, n), 0
        text = torch.arange(n, dtype=torch.long, device=ids.device).view(1, 1, n)
        if grid is None:
            return text.expand(4, 1, n).clone(), 0
        mm_types = (ids == self.image_token_id).int()
        rope, deltas = self.model.model.get_rope_index(ids, mm_types, image_grid_thw=grid)
        return torch.cat([text, rope], dim=0), int(deltas.reshape(-1)[0])

    def decode_text(self, tokens: Sequence[int]) -> str:
        """Output text as the runtime gives it: every generated token, special ones included (InternVL's `<box>`
        tags are special), the stop token dropped. The answer parses the same either way (EGM's order finds the
        bracketed numbers), and reference and bundle texts compare like for like."""
        return self.tokenizer.decode([t for t in tokens if t not in self.think_ids.stop], skip_special_tokens=False)

    # -- grounding -------------------------------------------------------------------------

    def ground(
        self,
        image,
        expression: str,
        *,
        settings=None,
        think_budget=None,
        task: str = "vanilla",
        budget_mode: str | None = None,
        max_new_tokens: int | None = None,
        max_answer_tokens: int | None = None,
        exif_transpose: bool = True,
        sampling=None,
    ):
        """Ground `expression` in `image` (path, bytes, data URL or PIL image) -> GroundingResult.

        Decode settings as in `generate_ids`: a whole `DecodeSettings`, keywords overriding it."""
        from egm_edge.grounding import GroundingResult

        t0 = time.perf_counter()
        s = _settings(settings, think_budget, budget_mode, max_new_tokens, max_answer_tokens, sampling)  # before the image
        prompt = self.build_prompt(image, expression, task, exif_transpose=exif_transpose)
        gen = self.generate_ids(prompt.ids, prompt.image.pixel_values, prompt.image.grid_thw, settings=s)
        text = self.decode_text(gen.tokens)
        timings = {"preprocess": prompt.preprocess_ms, **gen.timings}
        timings["total"] = _ms(t0)
        height, width = prompt.image.original
        return GroundingResult.from_output(
            text,
            width,
            height,
            think_tokens=gen.think_tokens,
            answer_tokens=gen.answer_tokens,
            budget_forced=gen.budget_forced,
            family=self.family.name,
            timings=timings,
        )

    def ground_many(self, samples: Iterable[Any], *, progress: bool = True, **kwargs) -> list:
        """Ground each sample (anything with .image and .expression, optionally .task; or (image, expression) pairs)."""
        items = list(samples)
        results = []
        for s in _progress(items, progress):
            if isinstance(s, (tuple, list)):
                image, expr, task = s[0], s[1], kwargs.get("task", "vanilla")
            else:
                image, expr, task = s.image, s.expression, getattr(s, "task", None) or kwargs.get("task", "vanilla")
            results.append(self.ground(image, expr, **{**kwargs, "task": task}))
        return results


def _settings(settings, think_budget, budget_mode, max_new_tokens, max_answer_tokens, sampling):
    """One resolved `DecodeSettings` from a whole one and keyword overrides (a checkpoint has no defaults of its own)."""
    from egm_edge.runtime.settings import DecodeSettings

    return (settings or DecodeSettings()).override(
        think_budget=think_budget, budget_mode=budget_mode, max_new_tokens=max_new_tokens, max_answer_tokens=max_answer_tokens,
        sampling=sampling).resolved()


def _load_hf(model_dir: Path, dtype, family: Family):
    import transformers
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return getattr(transformers, family.hf_class).from_pretrained(
            model_dir, dtype=dtype, local_files_only=True, trust_remote_code=False, use_safetensors=True
        )
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Could not load the checkpoint in {model_dir} ({str(e).splitlines()[0]}); check that its files are complete.") from None
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _progress(items: list, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with transformers; without it, run silently
        return items
    return tqdm(items, desc="grounding", unit="sample")
