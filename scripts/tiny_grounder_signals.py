"""Training-only signals and initial codes of the tiny grounder (scripts/train_tiny_grounder.py).

Nothing here is saved with the checkpoint, which stays a plain Qwen3-VL: dense read-outs of the
image tokens (`AuxHeads`, targets from `cell_targets`), a box read-out of the language model at box
openings (`LMAuxHead`), an attention target at every token of a box (`attention_loss`), digit-weighted
cross-entropy, a teacher-forced digit probe, and the explicit position and colour codes written into
the vision tower's initial weights.
"""

from __future__ import annotations

import math


def shape_of(scene, box) -> int:
    from egm_edge.synth.traces import box_norm

    return next((i for i in range(len(scene.shapes)) if tuple(box_norm(scene, i)) == tuple(box)), -1)


def box_openings(tok, ids: list[int]) -> list[tuple[int, tuple[int, int, int, int], int]]:
    """(index of the token that opens a box, the box, index just past its last digit) for every complete
    "[x1, y1, x2, y2" in `ids`."""
    text = [tok.id_to_token(i) for i in ids]
    runs, k = [], 0
    while k < len(ids):
        if text[k].isdigit():
            j = k
            while j < len(ids) and text[j].isdigit():
                j += 1
            runs.append((k, j))
            k = j
        else:
            k += 1
    out = []
    for n, (a, _) in enumerate(runs):
        if a == 0 or not text[a - 1].endswith("[") or n + 3 >= len(runs):
            continue
        group = runs[n:n + 4]
        if all("".join(text[group[m][1]:group[m + 1][0]]).replace("Ġ", " ") == ", " for m in range(3)):
            out.append((a - 1, tuple(int("".join(text[x:y])) for x, y in group), group[3][1]))
    return out


def cell_targets(scene, grid_thw, merge: int):
    """Dense targets for each merged image token, in the tower's output order (merge windows in raster
    order): the colour and kind of the shape covering the cell (0 = background) and that shape's full
    box (0..1 of the image, EGM's frame / 1000). A cell belongs to the shape whose box covers most of
    it (at least a fifth), and the cell holding a shape's centre always belongs to it."""
    import numpy as np

    from egm_edge.synth.traces import box_norm
    from egm_edge.synth.world import COLOURS, KINDS

    _, gh, gw = grid_thw
    rows, cols = gh // merge, gw // merge
    colour = np.zeros((rows, cols), dtype=np.int64)
    kind = np.zeros((rows, cols), dtype=np.int64)
    box = np.zeros((rows, cols, 4), dtype=np.float32)
    owner = np.full((rows, cols), -1, dtype=np.int64)
    best = np.full((rows, cols), 0.2)
    xs, ys = np.arange(cols + 1) / cols, np.arange(rows + 1) / rows
    colour_ids = {c: k + 1 for k, c in enumerate(COLOURS)}
    for i, sh in enumerate(scene.shapes):
        b = np.asarray(box_norm(scene, i), dtype=np.float32) / 1000.0
        ox = np.clip(np.minimum(xs[1:], b[2]) - np.maximum(xs[:-1], b[0]), 0, None) * cols
        oy = np.clip(np.minimum(ys[1:], b[3]) - np.maximum(ys[:-1], b[1]), 0, None) * rows
        frac = oy[:, None] * ox[None, :]
        cy, cx = min(rows - 1, int((b[1] + b[3]) / 2 * rows)), min(cols - 1, int((b[0] + b[2]) / 2 * cols))
        frac[cy, cx] = 2.0
        win = frac > best
        best = np.where(win, frac, best)
        colour[win], kind[win], box[win], owner[win] = colour_ids[sh.colour], KINDS.index(sh.kind) + 1, b, i
    return colour.reshape(-1), kind.reshape(-1), box.reshape(-1, 4), owner.reshape(-1)


def attention_loss(attn, input_ids, image_token: int, openings, targets, span: bool = False, copy_text: bool = False):
    """Mean -log(attention mass on the box's shape tokens) of head 0 at each box opening, or with `span`
    at every token from the opening to the box's last digit (each of them predicts a digit or a separator
    of that box). With `copy_text`, a box already written earlier in the same sequence (the answer repeating
    the reasoning's pick) targets that earlier box's tokens instead: copy the digits, do not re-read them."""
    import torch

    terms = []
    for n, (r, pos, box, shape, end) in enumerate(openings):
        if shape < 0:
            continue
        rows = slice(pos, end) if span else slice(pos, pos + 1)
        earlier = [(p, e) for rr, p, b, _, e in openings[:n] if copy_text and rr == r and b == box and p < pos]
        if earlier:
            p0, e0 = earlier[-1]
            keys = torch.arange(p0 + 1, e0, device=attn.device)  # the earlier box's digits and separators
        else:
            cells = torch.from_numpy(targets[r][3] == shape).to(attn.device)
            img = (input_ids[r] == image_token).nonzero().flatten()
            if cells.sum() == 0 or len(img) != len(cells):
                continue
            keys = img[cells]
        terms.append(-torch.log(attn[r, 0, rows][:, keys].sum(-1).float() + 1e-6))
    if not terms:
        return attn.sum() * 0.0, None
    nll = torch.cat(terms)
    return nll.mean(), float(torch.exp(-nll.detach()).mean())


def box_readout_loss(box_head, digit_head, x, box) -> tuple:
    """Box read-out of features `x`: smooth-L1 on the 0..1 box (x10) plus cross-entropy on each coordinate's
    hundreds digit (`digit_head`: 4 x 10 logits), and its tens digit too when the head has 80 outputs;
    returns the loss and the mean absolute error in 0..1000."""
    import torch
    import torch.nn.functional as F

    pred = box_head(x)
    v = (box * 1000).long().clamp(0, 999)
    digit = v.div(100, rounding_mode="floor")
    if digit_head.out_features == 80:
        digit = torch.cat([digit, v.div(10, rounding_mode="floor") % 10], dim=-1)
    loss = F.smooth_l1_loss(pred, box, beta=0.05) * 10 + F.cross_entropy(digit_head(x).view(-1, 10), digit.reshape(-1))
    return loss, (pred - box).abs().mean().item() * 1000


class LMAuxHead:
    """Linear box read-out of the language model's hidden state at box openings (training only)."""

    def __init__(self, dim: int, device, places: int = 1):
        import torch

        self.box = torch.nn.Linear(dim, 4).to(device)
        self.digit = torch.nn.Linear(dim, 40 * places).to(device)

    def parameters(self):
        return list(self.box.parameters()) + list(self.digit.parameters())

    def loss(self, hidden, openings) -> tuple:
        import torch

        if not openings:
            return hidden.sum() * 0.0, {}
        rows = torch.tensor([o[0] for o in openings], device=hidden.device)
        cols = torch.tensor([o[1] for o in openings], device=hidden.device)
        box = torch.tensor([o[2] for o in openings], dtype=torch.float32, device=hidden.device) / 1000.0
        loss, mae = box_readout_loss(self.box, self.digit, hidden[rows, cols].float(), box)
        return loss, {"lm_box_mae": mae}


class AuxHeads:
    """Linear read-outs of the image tokens for the dense loss (training only; never saved)."""

    def __init__(self, dim: int, device, places: int = 1):
        import torch

        from egm_edge.synth.world import COLOURS, KINDS

        self.colour = torch.nn.Linear(dim, len(COLOURS) + 1).to(device)
        self.kind = torch.nn.Linear(dim, len(KINDS) + 1).to(device)
        self.box = torch.nn.Linear(dim, 4).to(device)
        self.digit = torch.nn.Linear(dim, 40 * places).to(device)  # hundreds (and tens) digit of each coordinate

    def parameters(self):
        return [p for m in (self.colour, self.kind, self.box, self.digit) for p in m.parameters()]

    def loss(self, tokens, targets) -> tuple:
        import numpy as np
        import torch
        import torch.nn.functional as F

        colour = torch.from_numpy(np.concatenate([t[0] for t in targets])).to(tokens.device)
        kind = torch.from_numpy(np.concatenate([t[1] for t in targets])).to(tokens.device)
        box = torch.from_numpy(np.concatenate([t[2] for t in targets])).to(tokens.device)
        x = tokens.float()
        lc = F.cross_entropy(self.colour(x), colour)
        lk = F.cross_entropy(self.kind(x), kind)
        on = colour > 0
        lbox, mae = box_readout_loss(self.box, self.digit, x[on], box[on])
        with torch.no_grad():
            stats = {"colour_acc": (self.colour(x).argmax(-1) == colour).float().mean().item(),
                     "kind_acc": (self.kind(x).argmax(-1) == kind).float().mean().item(), "box_mae": mae}
        return lc + lk + lbox, stats


def init_position_grid(model, amplitude: float = 1.0) -> None:
    """Give the vision tower's learned position table an explicit (row, column) code at init.

    Qwen3-VL's `pos_embed` is a square table bilinearly resampled to each image's
    patch grid, so entry (r, c) stands for the normalised position (r, c)/(side-1),
    the frame EGM's 0..1000 coordinates live in. Random init leaves it ~30x weaker
    than the patch content, and absolute position must then be learned from scratch;
    writing linear and Fourier features of (x, y) into the first channels lets the
    model read box coordinates off the image tokens from the first steps. Only the
    initial values change; the architecture and everything else stay Qwen3-VL's.
    """
    import torch

    emb = model.model.visual.pos_embed.weight
    side = int(round(emb.shape[0] ** 0.5))
    r, c = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    feats = [2 * c - 1, 2 * r - 1]
    for f in (1, 2, 4, 8):
        for v in (c, r):
            feats += [torch.sin(math.pi * f * v), torch.cos(math.pi * f * v)]
    grid = torch.stack([f.reshape(-1) for f in feats], dim=1) * amplitude
    with torch.no_grad():
        emb[:, : grid.shape[1]] = grid.to(emb.dtype)


def digit_ids(tok) -> list[int]:
    return [tok.token_to_id(str(d)) for d in range(10)]


def weighted_loss(logits, labels, weights):
    """Token cross-entropy over labelled positions, each weighted (next-token shift as in transformers)."""
    import torch

    lg = logits[:, :-1].float()
    tgt = labels[:, 1:]
    w = weights[:, 1:]
    ce = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                                           reduction="none").view_as(tgt)
    keep = (tgt != -100).float() * w
    return (ce * keep).sum() / keep.sum()


def token_weights(labels, digits: list[int], digit_weight: float):
    import torch

    w = torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
    if digit_weight != 1.0:
        w[torch.isin(labels, torch.tensor(digits, device=labels.device))] = digit_weight
    return w


def probe(model, batch, digits: list[int]) -> dict:
    """Teacher-forced accuracy on the digits of the reasoning's boxes (read off the image, not copied)
    and on those of the answer (copied from the reasoning once it is learned)."""
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    model.train()
    pred, tgt = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
    is_digit = torch.isin(tgt, torch.tensor(digits, device=tgt.device))
    # The answer is the last box: its digits follow the last non-digit stretch containing 'bbox'.
    reasoning_mask = torch.zeros_like(is_digit)
    for r in range(tgt.shape[0]):
        idx = is_digit[r].nonzero().flatten()
        if len(idx) > 12:  # every box has at least 4 digits; the answer's are the last box's
            reasoning_mask[r, idx[: len(idx) - _answer_digits(tgt[r], idx)]] = True
    hit = pred == tgt
    return {"box_digit_acc": round(hit[reasoning_mask].float().mean().item(), 3), "all_digit_acc": round(hit[is_digit].float().mean().item(), 3)}


def _answer_digits(row, idx) -> int:
    """How many of the digit positions `idx` belong to the last bracketed group (the answer box)."""
    n, last = 1, idx[-1].item()
    for k in range(len(idx) - 2, -1, -1):
        if last - idx[k].item() > 4:  # a gap longer than ', ' + digits means a new group
            break
        n, last = n + 1, idx[k].item()
    return n


def init_colour_code(model, first: int = 18, amplitude: float = 2.0) -> int:
    """Give the patch embedding explicit colour features at init, next to the position code.

    For each RGB channel: the patch mean, left-minus-right and top-minus-bottom half
    means (9 channels from `first`); the position-code channels get no random pixel
    projection, so both codes start clean. A random projection separates shape tokens
    from (textured) background only weakly (a linear probe: 93% vs 81% chance); with
    this code the language model can match "red" to red tokens, and the half
    differences carry where an edge falls inside a patch. Only initial values change.
    Returns the first channel after the code.
    """
    import torch

    w = model.model.visual.patch_embed.proj.weight  # (hidden, 3, temporal, patch, patch)
    _, _, t, ph, pw = w.shape
    n = t * ph * pw
    half_w = torch.ones(ph, pw)
    half_w[:, pw // 2:] = -1
    half_h = torch.ones(ph, pw)
    half_h[ph // 2:, :] = -1
    with torch.no_grad():
        w[:first] = 0.0
        k = first
        for c in range(3):
            for pattern in (torch.ones(ph, pw), half_w, half_h):
                w[k] = 0.0
                w[k, c] = pattern.expand(t, ph, pw) * (amplitude / n)
                k += 1
        bias = model.model.visual.patch_embed.proj.bias
        if bias is not None:
            bias[:k] = 0.0
    return k
