#!/usr/bin/env python
"""Train the tiny EGM-style grounder (a real Qwen3VLForConditionalGeneration) on the synthetic world.

Reproducible from --seed: the tokenizer corpus is stream seed+1, training samples
are stream seed (sample i = `synth.draw(seed, i)`), the periodic quick eval uses
stream seed+2; none of them is the final evaluation's seed (scripts/eval_tiny_grounder.py,
default 20261122). Every training sample is fresh. Inputs are built exactly as
the reference runner builds them at inference: `runtime.preprocess.preprocess_image`
pixels, `grounding.chat_prompt` text, and assistant ids from
`synth.assistant_ids` (reasoning, close, answer, <|im_end|>); about 22% of the
samples have their reasoning cut at a random token (0 included) and closed early,
a third of those with Qwen's stop sentence, so a budget-forced close still
yields an answer. Loss is on assistant tokens only, plus three optional
training-only signals (--aux-weight on the image tokens, --lm-aux-weight and
--attn-weight at box openings; their heads and hooks are never saved).

    python scripts/train_tiny_grounder.py --out runs/tiny --seed 0 --steps 1200

Writes OUT/init (the random checkpoint + tokenizer), OUT/last (weights + optimizer
state every --ckpt-every steps; --resume continues from it), OUT/final (the
trained checkpoint, weights stored in --save-dtype) and OUT/train_log.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_grounder_signals import (  # noqa: E402
    AuxHeads, LMAuxHead, attention_loss, box_openings, cell_targets, digit_ids, init_colour_code, init_position_grid,
    probe, shape_of, token_weights, weighted_loss,
)

TEXT = {
    "hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 32,
    "intermediate_size": 512, "max_position_embeddings": 4096,
    # head_dim 32 has 16 rotary frequencies: T/H/W 6/5/5, interleaved as in Qwen3-VL.
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5], "mrope_interleaved": True},
}
VISION = {
    "depth": 3, "hidden_size": 128, "intermediate_size": 384, "num_heads": 4, "patch_size": 16, "spatial_merge_size": 2,
    "temporal_patch_size": 2, "out_hidden_size": 192, "num_position_embeddings": 576, "deepstack_visual_indexes": [1],
}
# 64..80 image tokens per image: every synthetic image lands at a similar scale.
MIN_PIXELS, MAX_PIXELS = 64 * 1024, 80 * 1024
INSTRUCT_TEMPLATE = REPO.parent / "shared" / "data" / "qwen3-vl-tokenizer" / "chat_template.instruct.jinja"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--decay-from", type=int, default=None,
                   help="end early: follow the cosine schedule of --steps up to this step, then decay linearly")
    p.add_argument("--decay-steps", type=int, default=150, help="length of the --decay-from decay; the run then ends")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--truncate-fraction", type=float, default=0.22)
    p.add_argument("--cut-answers", choices=["target", "reasoned"], default="target",
                   help="what a cut example answers: the target, or what its reasoning so far supports "
                        "(egm_edge.synth.traces.cut_answer)")
    p.add_argument("--amodal-fraction", type=float, default=0.15)
    p.add_argument("--vocab", type=int, default=640)
    p.add_argument("--warmup-samples", type=float, default=0.6,
                   help="curriculum: fraction of 1-2 shape samples at the start, falling to 0 at --curriculum-end")
    p.add_argument("--curriculum-end", type=int, default=500)
    p.add_argument("--freeze-vision-until", type=int, default=800,
                   help="keep the vision tower's patch embedding, position table and blocks at their init until this "
                        "step (the mergers always train), so the explicit position code survives while the "
                        "language model learns to read boxes off it")
    p.add_argument("--vision-lr-scale", type=float, default=1.0,
                   help="learning-rate factor for the whole vision tower, mergers included: at full rate the merger "
                        "output grows ~100x within a few hundred steps and the position code stops being linearly "
                        "readable (R^2 0.97 -> 0.05); 0.1 keeps it (R^2 0.95)")
    p.add_argument("--colour-code", action="store_true", help="init the patch embedding with explicit colour features")
    p.add_argument("--digit-weight", type=float, default=1.0,
                   help="loss weight of the digit tokens (the box coordinates, the only tokens that need the image; "
                        "the rest is format the model learns in a few hundred steps)")
    p.add_argument("--aux-weight", type=float, default=0.0,
                   help="weight of the dense image-token loss: linear heads (used in training only, never saved) "
                        "read each image token's shape colour, kind and full box off the vision tower's output, "
                        "so every image supervises ~70 tokens instead of the few box digits of one answer")
    p.add_argument("--attn-copy-text", action="store_true",
                   help="a box the sequence already wrote (the answer after a full reasoning) is supervised to attend "
                        "to that earlier box's tokens, not to the image: the answer copies the reasoning's pick")
    p.add_argument("--aux-places", type=int, choices=[1, 2], default=1,
                   help="digit places the box read-outs classify: 1 = hundreds, 2 = hundreds and tens (the second "
                        "digit of a coordinate is where the language model's precision runs out)")
    p.add_argument("--lm-aux-weight", type=float, default=0.0,
                   help="weight of a box read-out on the language model: at each token that opens a box ('[') a "
                        "linear head (training only) regresses that box from the hidden state after --lm-aux-layer, "
                        "a smooth signal for learning which image tokens to attend to")
    p.add_argument("--lm-aux-layer", type=int, default=2)
    p.add_argument("--attn-weight", type=float, default=0.0,
                   help="weight of an attention target: at every box opening, head 0 of language layer --attn-layer "
                        "should put its mass on the image tokens of the shape that box belongs to (training only; "
                        "the text layers run eager attention so the weights exist)")
    p.add_argument("--attn-layer", default="1", help="the supervised language layer(s), comma-separated (head 0 of each)")
    p.add_argument("--attn-span", action="store_true",
                   help="supervise the attention at every token of the box (opening to last digit), not only at the "
                        "opening: each digit is predicted from its own position, which must read the shape too")
    p.add_argument("--probe-every", type=int, default=100,
                   help="teacher-forced accuracy of the reasoning's box digits on a fixed held-out batch (cheap)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-n", type=int, default=24, help="samples of the quick evals (0: none, not even at the end)")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="1 avoids OpenMP stalls on a shared machine")
    p.add_argument("--save-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from this run's weights (e.g. OTHER/last) with a fresh optimizer and schedule; the "
                        "tokenizer must be the same (the stream seed stays --seed)")
    p.add_argument("--chat-template", type=Path, default=INSTRUCT_TEMPLATE,
                   help="the Qwen3-VL instruct chat template (its Thinking variant is shipped)")
    args = p.parse_args(argv)
    if args.eval_n < 0:
        p.error(f"--eval-n must be 0 (no quick evals) or more, not {args.eval_n}")
    return args


def build_tokenizer_dir(out: Path, seed: int, vocab: int, template_path: Path) -> Path:
    from egm_edge.grounding import chat_prompt, user_text
    from egm_edge.synth import assistant_text, draw
    from egm_edge.synth.tokenizer import FAMILY, build_tokenizer, thinking_template, write_tokenizer_files

    if not template_path.is_file():
        # A clone without ../shared: reuse the template shipped with the committed checkpoint.
        from egm_edge.assets import default_model_dir

        template = (default_model_dir() / "chat_template.jinja").read_text()
    else:
        template = thinking_template(template_path.read_text())
    corpus = [FAMILY.tokens.stop_thinking] * 20
    for i in range(3000):
        s = draw(seed + 1, i)
        corpus.append(chat_prompt(user_text(s.expr.sent, s.task), 0))
        corpus.append(assistant_text(s.scene, s.expr))
    tok = build_tokenizer(corpus, vocab)
    d = out / "tokenizer"
    write_tokenizer_files(tok, d, template)
    return d


class Batcher:
    """Builds training batches of stream `seed` exactly as the runner builds inference inputs."""

    def __init__(self, tok, image_config, seed: int, truncate_fraction: float, amodal_fraction: float,
                 easy: float = 0.0, easy_until: int = 0, cut_answers: str = "target"):
        self.tok, self.cfg, self.seed, self.cut_answers = tok, image_config, seed, cut_answers
        self.easy, self.easy_until = easy, max(1, easy_until)
        self.truncate_fraction, self.amodal_fraction = truncate_fraction, amodal_fraction
        self.pad = tok.token_to_id("<|endoftext|>")
        self.image_token = tok.token_to_id("<|image_pad|>")

    def example(self, i: int, step: int = 0):
        import numpy as np

        from egm_edge.grounding import chat_prompt, user_text
        from egm_edge.runtime.preprocess import preprocess_image
        from egm_edge.synth import answer, assistant_ids, draw, reasoning, render
        from egm_edge.synth.dataset import draw_warmup
        from egm_edge.synth.traces import cut_answer

        rng = np.random.default_rng([self.seed, i, 7])
        p_easy = self.easy * max(0.0, 1.0 - step / self.easy_until)
        s = draw_warmup(self.seed, i) if rng.random() < p_easy else draw(self.seed, i, self.amodal_fraction)
        pre = preprocess_image(render(s.scene), self.cfg)
        prompt = self.tok.encode(chat_prompt(user_text(s.expr.sent, s.task), pre.n_image_tokens), add_special_tokens=False).ids
        think = reasoning(s.scene, s.expr)
        cut, qwen_stop = None, False
        if rng.random() < self.truncate_fraction:
            n = len(self.tok.encode(think, add_special_tokens=False).ids)
            cut = 0 if rng.random() < 0.3 else int(rng.integers(0, n))
            qwen_stop = bool(rng.random() < 1 / 3)
        if cut is not None and self.cut_answers == "reasoned":
            said = cut_answer(self.tok, s.scene, s.expr, cut)
        else:
            said = answer(s.scene, s.expr)
        target = assistant_ids(self.tok, think, said, cut=cut, qwen_stop=qwen_stop)
        return prompt, target, pre, s

    def batch(self, start: int, size: int, device, step: int = 0):
        import numpy as np
        import torch

        exs = [self.example(i, step) for i in range(start, start + size)]
        length = max(len(p) + len(t) for p, t, _, _ in exs)
        ids = np.full((size, length), self.pad, dtype=np.int64)
        labels = np.full((size, length), -100, dtype=np.int64)
        for r, (p, t, _, _) in enumerate(exs):
            ids[r, : len(p) + len(t)] = p + t
            labels[r, len(p) : len(p) + len(t)] = t
        ids_t = torch.from_numpy(ids)
        # Right padding under a causal mask never reaches a real token, so no attention mask is
        # needed (SDPA then takes its fast causal path); pads carry no loss.
        return {
            "input_ids": ids_t.to(device),
            "labels": torch.from_numpy(labels).to(device),
            "mm_token_type_ids": (ids_t == self.image_token).long().to(device),
            "pixel_values": torch.from_numpy(np.concatenate([e[2].pixel_values for e in exs])).to(device),
            "image_grid_thw": torch.tensor([e[2].grid_thw for e in exs], dtype=torch.long, device=device),
            "aux": [cell_targets(e[3].scene, e[2].grid_thw, self.cfg.merge_size) for e in exs],
            "lm_aux": [(r, len(p) + k, box, shape_of(e[3].scene, box), len(p) + end) for r, e in enumerate(exs)
                       for p, t in [e[:2]] for k, box, end in box_openings(self.tok, t)],
        }


def lr_at(step: int, total: int, peak: float, warmup: int, decay_from: int | None = None, decay_steps: int = 0) -> float:
    """Warmup, then cosine to 5% at `total`; with `decay_from`, linear from there to 5% over `decay_steps`."""
    if decay_from is not None and step >= decay_from:
        start = lr_at(decay_from, total, peak, warmup)
        frac = min(1.0, (step - decay_from + 1) / max(1, decay_steps))
        return start + (0.05 * peak - start) * frac
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def quick_eval(model, tok, image_config, out: Path, seed: int, n: int, device: str) -> dict:
    from egm_edge.reference.runner import ReferenceRunner
    from egm_edge.synth import draw
    from egm_edge.synth.evaluate import evaluate

    model.eval()
    runner = ReferenceRunner(model, tok, image_config, out, device)
    res = evaluate(runner, [draw(seed, i) for i in range(n)], budgets=(None, 0), max_new_tokens=256)
    model.train()
    return {b: {"acc50": round(r["all"]["acc50"], 3), "miou": round(r["all"]["miou"], 3),
                "split": {k: round(v["acc50"], 3) for k, v in r["split"].items()}} for b, r in res.items()}


def save_last(model, opt, step: int, out: Path) -> None:
    import torch

    tmp = out / "last.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    torch.save({"step": step, "optimizer": opt.state_dict()}, tmp / "train_state.pt")
    if (out / "last").exists():
        shutil.rmtree(out / "last")
    os.replace(tmp, out / "last")


def save_final(model, init: Path, out: Path, dtype: str) -> Path:
    import torch

    final = out / "final"
    tmp = out / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(init, tmp)
    for f in tmp.glob("*.safetensors"):
        f.unlink()
    model.to(getattr(torch, dtype))
    for cfg in (model.config, model.config.text_config, model.config.vision_config):
        cfg.dtype = dtype  # one stored dtype everywhere in config.json
    model.save_pretrained(tmp, safe_serialization=True)
    model.to(torch.float32)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from tokenizers import Tokenizer
    from transformers import Qwen3VLForConditionalGeneration

    from egm_edge.reference.checkpoint import write_tiny_checkpoint
    from egm_edge.models.families import QWEN3_VL
    from egm_edge.reference.runner import _image_config, read_model_config

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    init = out / "init"
    if not init.exists():
        tokdir = build_tokenizer_dir(out, args.seed, args.vocab, args.chat_template)
        write_tiny_checkpoint(init, tokdir, seed=args.seed, text=TEXT, vision=VISION, tie_word_embeddings=True,
                              min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        shutil.copyfile(tokdir / "chat_template.jinja", init / "chat_template.jinja")
    tok = Tokenizer.from_file(str(init / "tokenizer.json"))
    image_config = _image_config(init, read_model_config(init), QWEN3_VL)
    src = out / "last" if args.resume and (out / "last").exists() else init
    weights = args.init_from if src == init and args.init_from else src
    model = Qwen3VLForConditionalGeneration.from_pretrained(weights, dtype=torch.float32, local_files_only=True).to(device)
    if weights == init:
        init_position_grid(model)
        if args.colour_code:
            init_colour_code(model)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    groups = []
    for vision in (False, True):
        for decayed in (True, False):
            ps = [p for n, p in model.named_parameters() if n.startswith("model.visual.") == vision and (p.ndim >= 2) == decayed]
            groups.append({"params": ps, "weight_decay": args.weight_decay if decayed else 0.0,
                           "lr_scale": args.vision_lr_scale if vision else 1.0})
    aux = AuxHeads(TEXT["hidden_size"], device, args.aux_places) if args.aux_weight else None
    if aux is not None:
        groups.append({"params": aux.parameters(), "weight_decay": 0.0, "lr_scale": 1.0})
    lm_aux = LMAuxHead(TEXT["hidden_size"], device, args.aux_places) if args.lm_aux_weight else None
    if lm_aux is not None:
        groups.append({"params": lm_aux.parameters(), "weight_decay": 0.0, "lr_scale": 1.0})
    captured = {}
    model.model.visual.merger.register_forward_hook(lambda m, i, o: captured.__setitem__("tokens", o))
    if args.attn_weight:
        model.config.text_config._attn_implementation = "eager"  # the weights of the supervised head must exist
        attn_layers = [int(v) for v in str(args.attn_layer).split(",")]
        for n in attn_layers:
            model.model.language_model.layers[n].self_attn.register_forward_hook(
                lambda m, i, o, n=n: captured.__setitem__(f"attn{n}", o[1]))
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    start = 0
    if src != init:
        state = torch.load(src / "train_state.pt", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    batcher = Batcher(tok, image_config, args.seed, args.truncate_fraction, args.amodal_fraction,
                      args.warmup_samples, args.curriculum_end, args.cut_answers)
    meta = {"event": "start", "params": n_params, "device": device, "args": {k: str(v) for k, v in vars(args).items()},
            "train_seed": args.seed, "tokenizer_seed": args.seed + 1, "quick_eval_seed": args.seed + 2, "start_step": start}
    log = open(out / "train_log.jsonl", "a")

    def emit(rec):
        log.write(json.dumps(rec) + "\n")
        log.flush()
        print(json.dumps(rec), flush=True)

    emit(meta)
    digits = digit_ids(tok)
    # Held-out probe batch: stream seed+2 (the quick eval's), full scenes, no truncation.
    held = Batcher(tok, image_config, args.seed + 2, 0.0, args.amodal_fraction).batch(0, 32, device)
    held.pop("aux"), held.pop("lm_aux")
    t_start = time.time()
    torch.manual_seed(args.seed + start)
    ema = None
    frozen = [p for n, p in model.named_parameters() if n.startswith("model.visual.") and "merger" not in n]

    def set_vision_trainable(flag: bool) -> None:
        for p in frozen:
            p.requires_grad_(flag)

    set_vision_trainable(start >= args.freeze_vision_until)
    total = args.steps if args.decay_from is None else min(args.steps, args.decay_from + args.decay_steps)
    for step in range(start, total):
        t0 = time.time()
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.decay_from, args.decay_steps)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        if step == args.freeze_vision_until and step > start:
            set_vision_trainable(True)
            emit({"step": step, "event": "vision tower unfrozen"})
        batch = batcher.batch(step * args.batch, args.batch, device, step)
        targets, openings = batch.pop("aux"), batch.pop("lm_aux")
        hs = {"output_hidden_states": True} if lm_aux is not None else {}
        if args.digit_weight == 1.0:
            res = model(**batch, **hs)
            loss = res.loss
        else:
            res = model(**{k: v for k, v in batch.items() if k != "labels"}, **hs)
            loss = weighted_loss(res.logits, batch["labels"], token_weights(batch["labels"], digits, args.digit_weight))
        lm_loss, aux_stats = loss.item(), {}
        if aux is not None:
            aux_loss, aux_stats = aux.loss(captured["tokens"], targets)
            loss = loss + args.aux_weight * aux_loss
        if args.attn_weight:
            for n in attn_layers:
                a_loss, mass = attention_loss(captured[f"attn{n}"], batch["input_ids"], batcher.image_token, openings,
                                              targets, span=args.attn_span, copy_text=args.attn_copy_text)
                aux_stats["attn_mass" if n == attn_layers[0] else f"attn_mass{n}"] = mass if mass is not None else 0.0
                loss = loss + args.attn_weight * a_loss
        if lm_aux is not None:
            lm_aux_loss, st = lm_aux.loss(res.hidden_states[args.lm_aux_layer], openings)
            aux_stats.update(st)
            loss = loss + args.lm_aux_weight * lm_aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if step % 10 == 0 or step == total - 1:
            rec = {"lm_loss": round(lm_loss, 4)}
            if aux_stats:
                rec.update({k: round(v, 3) for k, v in aux_stats.items()})
            emit({"step": step, "loss": round(loss.item(), 4), "loss_ema": round(ema, 4), "lr": round(lr, 6), **rec,
                  "sec_per_step": round(time.time() - t0, 2), "elapsed_min": round((time.time() - t_start) / 60, 2)})
        if args.probe_every and (step + 1) % args.probe_every == 0:
            emit({"step": step + 1, "probe": probe(model, held, digits)})
        if (step + 1) % args.ckpt_every == 0:
            save_last(model, opt, step + 1, out)
        if args.eval_every and args.eval_n and (step + 1) % args.eval_every == 0 and step + 1 < total:
            emit({"step": step + 1, "quick_eval": quick_eval(model, tok, image_config, init, args.seed + 2, args.eval_n, device)})
    save_last(model, opt, total, out)
    final = save_final(model, init, out, args.save_dtype)
    wall = time.time() - t_start
    emit({"event": "done", "steps": total, "wall_min": round(wall / 60, 2), "final": str(final)})
    model.eval()
    if args.eval_n:
        emit({"step": total, "quick_eval": quick_eval(model, tok, image_config, init, args.seed + 2, args.eval_n, device)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
