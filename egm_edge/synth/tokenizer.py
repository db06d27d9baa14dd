"""A small byte-level BPE tokenizer with a family's special tokens (Qwen3's by default), for tiny test models.

Contract: `build_tokenizer(corpus, vocab_size)` trains a byte-level BPE with
Qwen2/3's pre-tokenizer (digits split one per token, the same split regex) on
`corpus`, then appends Qwen3's 26 added tokens by name with Qwen's `special`
flags (<think>/</think> are not "special", so decoding keeps them). Every byte is
in the alphabet, so any text encodes. `write_tokenizer_files(tok, dir, template)`
writes tokenizer.json, tokenizer_config.json (eos <|im_end|>, pad <|endoftext|>)
and chat_template.jinja. Ids are whatever training produced: read them by name.
The token texts, the generation prompt and the default template come from the
Qwen3-VL family record (egm_edge.models.families); `family=` takes another record's added
tokens instead (InternVL-3: Qwen2.5's plus <img>, </img>, <IMG_CONTEXT>, ..., no <think>), and
its tokenizer_config.json then names the image tokens transformers' InternVLProcessor reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from egm_edge.models.families import QWEN3_VL

# Qwen2/Qwen3's pre-tokenizer split: words, single digits, punctuation runs, newlines, spaces.
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
FAMILY = QWEN3_VL  # the tiny grounder is a Qwen3-VL model: its tokens and prompts come from that record


def _jinja_output(text: str) -> str:
    """The jinja statement a chat template writes `text` with (newlines escaped, as Qwen's templates write them)."""
    return "{{- '" + text.replace("\n", "\\n") + "' }}"


# The Thinking template opens the reasoning in the generation prompt; the instruct one stops before it.
_THINKING_GEN = _jinja_output(FAMILY.generation_prompt)
_INSTRUCT_GEN = _jinja_output(FAMILY.generation_prompt.removesuffix(FAMILY.tokens.think_open + "\n"))


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 768, family=FAMILY):
    """Train the BPE on `corpus`, then add `family`'s added tokens (a name or a record); `vocab_size` counts the
    byte alphabet and merges, not the added tokens."""
    from egm_edge.models.families import get_family

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    for name, special in get_family(family).added_tokens:
        t = AddedToken(name, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        (tok.add_special_tokens if special else tok.add_tokens)([t])
    return tok


def thinking_template(instruct_template: str) -> str:
    """The Qwen3-VL instruct template with the Thinking generation prompt."""
    if _INSTRUCT_GEN not in instruct_template:
        raise ValueError(f"the chat template has no {_INSTRUCT_GEN} generation prompt to extend")
    return instruct_template.replace(_INSTRUCT_GEN, _THINKING_GEN)


def write_tokenizer_files(tok, out_dir, chat_template: str | None = None, model_max_length: int = 4096, family=FAMILY) -> None:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja (by default the family record's template,
    for Qwen3-VL the Thinking one)."""
    from egm_edge.models.families import get_family

    fam = get_family(family)
    chat_template = fam.chat_template if chat_template is None else chat_template
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    # Qwen ends a turn with its first stop token and pads with the other (<|endoftext|>), not a special of its own.
    eos, pad = fam.tokens.stop[0], fam.tokens.stop[-1]
    added = {
        str(tok.token_to_id(name)): {
            "content": name, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": special,
        }
        for name, special in fam.added_tokens
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [n for n, s in fam.added_tokens if s and n != pad],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": pad,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if fam.preprocessor == "tiling":  # InternVLProcessor reads its image tokens from these attributes
        t = fam.tokens
        config["extra_special_tokens"] = {"start_image_token": t.image_start, "end_image_token": t.image_end,
                                          "context_image_token": t.image}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(chat_template)
