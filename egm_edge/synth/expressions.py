"""Referring expressions over a synthetic scene, each verified to pick exactly one shape.

Contract: `make_sample(rng, amodal=False)` returns a (Scene, Expression) whose
sentence identifies exactly one shape of the scene under `resolve` (plain
geometry: centres, areas, sorted order) AND with a clear margin (centres at least
4% of the image apart along the compared axis, extreme areas at least 1.35x the
next), so a human would agree. Four expression types, used as eval splits:
unique ("the blue triangle"), relational ("the red circle left of the blue
square"), superlative ("the largest triangle", "the smallest red shape") and
ordinal ("the leftmost circle", "the second square from the top").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from egm_edge.synth.world import COLOURS, KINDS, MAX_SHAPES, MIN_SHAPES, Scene, add_occluder, make_scene, random_size

TYPES = ("unique", "relational", "superlative", "ordinal")
RELATIONS = ("left of", "right of", "above", "below")
AXES = {"left": ("x", 1), "right": ("x", -1), "top": ("y", 1), "bottom": ("y", -1)}
MARGIN = 0.04
AREA_RATIO = 1.35
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")


@dataclass(frozen=True)
class Group:
    """A set of shapes named by colour, kind or both ("red shapes", "circles", "red circles")."""

    colour: str | None
    kind: str | None

    def matches(self, shape) -> bool:
        return (self.colour is None or shape.colour == self.colour) and (self.kind is None or shape.kind == self.kind)

    def noun(self, plural: bool = False) -> str:
        kind = self.kind or "shape"
        words = ([self.colour] if self.colour else []) + [kind + ("s" if plural else "")]
        return " ".join(words)


@dataclass(frozen=True)
class Expression:
    """One referring expression: its words and what they mean over the scene."""

    type: str
    sent: str
    target: int  # index into scene.shapes
    group: Group
    relation: str | None = None  # relational: "left of", ...
    anchor: Group | None = None  # relational: the unique reference shape's group
    superlative: str | None = None  # "largest" | "smallest"
    side: str | None = None  # ordinal: "left" | "right" | "top" | "bottom"
    rank: int = 0  # ordinal: 0 = the first from `side`


def members(scene: Scene, group: Group) -> list[int]:
    return [i for i, s in enumerate(scene.shapes) if group.matches(s)]


def axis_key(scene: Scene, side: str):
    axis, sign = AXES[side]
    return lambda i: sign * (scene.shapes[i].cx if axis == "x" else scene.shapes[i].cy)


def relation_holds(scene: Scene, i: int, j: int, relation: str, margin: float = 0.0) -> bool:
    """Shape i is `relation` shape j (centre comparison; margin in pixels)."""
    a, b = scene.shapes[i], scene.shapes[j]
    return {
        "left of": a.cx < b.cx - margin,
        "right of": a.cx > b.cx + margin,
        "above": a.cy < b.cy - margin,
        "below": a.cy > b.cy + margin,
    }[relation]


def _relation_margin(scene: Scene, relation: str) -> float:
    return MARGIN * (scene.width if relation in ("left of", "right of") else scene.height)


def resolve(scene: Scene, e: Expression) -> list[int]:
    """The shapes the expression picks out under plain geometry (a good expression picks one)."""
    group = members(scene, e.group)
    if e.type == "unique":
        return group
    if e.type == "relational":
        anchors = members(scene, e.anchor)
        if len(anchors) != 1:
            return []
        return [i for i in group if i != anchors[0] and relation_holds(scene, i, anchors[0], e.relation)]
    if e.type == "superlative":
        if not group:
            return []
        sign = 1 if e.superlative == "largest" else -1
        best = max(sign * scene.shapes[i].area for i in group)
        return [i for i in group if sign * scene.shapes[i].area == best]
    if e.type == "ordinal":
        if len(group) <= e.rank:
            return []
        key = axis_key(scene, e.side)
        order = sorted(group, key=key)
        ties = [i for i in group if key(i) == key(order[e.rank])]
        return ties
    raise ValueError(f"unknown expression type {e.type!r}")


def is_clear(scene: Scene, e: Expression) -> bool:
    """The pick is unambiguous with a margin, not just by a pixel."""
    if resolve(scene, e) != [e.target]:
        return False
    group = members(scene, e.group)
    if e.type == "relational":
        (a,) = members(scene, e.anchor)
        m = _relation_margin(scene, e.relation)
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[e.relation]
        return relation_holds(scene, e.target, a, e.relation, m) and all(
            relation_holds(scene, i, a, opposite, m) for i in group if i != e.target
        )
    if e.type == "superlative":
        areas = sorted((scene.shapes[i].area for i in group), reverse=e.superlative == "largest")
        if len(areas) < 2:
            return False
        a0, a1 = areas[0], areas[1]
        return (a0 >= AREA_RATIO * a1) if e.superlative == "largest" else (a1 >= AREA_RATIO * a0)
    if e.type == "ordinal":
        key = axis_key(scene, e.side)
        vals = sorted(key(i) for i in group)
        dim = scene.width if AXES[e.side][0] == "x" else scene.height
        return len(vals) >= 2 and all(b - a >= MARGIN * dim for a, b in zip(vals, vals[1:]))
    return True


def sentence(e: Expression) -> str:
    if e.type == "unique":
        return f"the {e.group.noun()}"
    if e.type == "relational":
        return f"the {e.group.noun()} {e.relation} the {e.anchor.noun()}"
    if e.type == "superlative":
        return f"the {e.superlative} {e.group.noun()}"
    if e.rank == 0:
        return f"the {e.side}most {e.group.noun()}"
    return f"the {ORDINALS[e.rank]} {e.group.noun()} from the {e.side}"


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(0, len(seq)))]


def _random_group(rng: np.random.Generator, allow_single: bool = True) -> Group:
    colour, kind = _pick(rng, list(COLOURS)), _pick(rng, KINDS)
    mode = int(rng.integers(0, 3)) if allow_single else 2
    return Group(colour if mode != 1 else None, kind if mode != 0 else None)


def _outsider(rng: np.random.Generator, groups: list[Group]) -> tuple[str, str]:
    """A (kind, colour) in none of the groups."""
    while True:
        k, c = _pick(rng, KINDS), _pick(rng, list(COLOURS))
        if not any(g.matches(_Probe(k, c)) for g in groups):
            return k, c


@dataclass(frozen=True)
class _Probe:
    kind: str
    colour: str


def _member(rng: np.random.Generator, group: Group) -> tuple[str, str]:
    return (group.kind or _pick(rng, KINDS), group.colour or _pick(rng, list(COLOURS)))


def _attempt(rng: np.random.Generator, etype: str) -> tuple[Scene, Expression] | None:
    n = int(rng.integers(MIN_SHAPES, MAX_SHAPES + 1))
    size = random_size(rng)
    short = min(size)
    if etype == "unique":
        group = Group(_pick(rng, list(COLOURS)), _pick(rng, KINDS))
        # Distractors share the colour or the kind, so the whole phrase is needed.
        attrs = [(group.kind, group.colour)]
        while len(attrs) < n:
            k, c = _member(rng, Group(group.colour, None) if rng.random() < 0.5 else Group(None, group.kind))
            if (k, c) != (group.kind, group.colour):
                attrs.append((k, c))
        order = rng.permutation(n)
        attrs = [attrs[i] for i in order]
        scene = make_scene(rng, attrs, size=size)
        if scene is None:
            return None
        target = int(np.where(order == 0)[0][0])
        e = Expression("unique", "", target, group)
    elif etype == "relational":
        group = _random_group(rng, allow_single=rng.random() < 0.3)
        anchor = Group(_pick(rng, list(COLOURS)), _pick(rng, KINDS))
        if group.matches(_Probe(anchor.kind, anchor.colour)):
            return None
        k_members = int(rng.integers(2, min(3, n - 1) + 1))
        attrs = [_member(rng, group) for _ in range(k_members)] + [(anchor.kind, anchor.colour)]
        attrs += [_outsider(rng, [group, anchor]) for _ in range(n - len(attrs))]
        scene = make_scene(rng, attrs, size=size)
        if scene is None:
            return None
        relations = list(RELATIONS)
        rng.shuffle(relations)
        for rel in relations:
            for t in members(scene, group):
                e = Expression("relational", "", t, group, relation=rel, anchor=anchor)
                if is_clear(scene, e):
                    break
            else:
                continue
            break
        else:
            return None
    elif etype == "superlative":
        group = _random_group(rng)
        which = "largest" if rng.random() < 0.5 else "smallest"
        k_members = int(rng.integers(2, min(4, n) + 1))
        attrs = [_member(rng, group) for _ in range(k_members)]
        attrs += [_outsider(rng, [group]) for _ in range(n - k_members)]
        big = [int(round(rng.uniform(0.25, 0.30) * short))]
        small = [int(round(rng.uniform(0.13, 0.19) * short)) for _ in range(k_members - 1)]
        if which == "smallest":
            big, small = [int(round(rng.uniform(0.13, 0.16) * short))], [int(round(rng.uniform(0.20, 0.30) * short)) for _ in range(k_members - 1)]
        rest = [int(round(rng.uniform(0.14, 0.30) * short)) for _ in range(n - k_members)]
        scene = make_scene(rng, attrs, sides=big + small + rest, size=size)
        if scene is None:
            return None
        e = Expression("superlative", "", 0, group, superlative=which)
    else:  # ordinal
        group = _random_group(rng)
        k_members = int(rng.integers(2, min(4, n) + 1))
        attrs = [_member(rng, group) for _ in range(k_members)]
        attrs += [_outsider(rng, [group]) for _ in range(n - k_members)]
        scene = make_scene(rng, attrs, size=size)
        if scene is None:
            return None
        side = _pick(rng, list(AXES))
        rank = 0 if (k_members == 2 or rng.random() < 0.5) else 1
        order = sorted(members(scene, group), key=axis_key(scene, side))
        e = Expression("ordinal", "", order[rank], group, side=side, rank=rank)
    e = Expression(**{**e.__dict__, "sent": sentence(e)})
    if not is_clear(scene, e):
        return None
    return scene, e


def make_warmup_sample(rng: np.random.Generator, max_shapes: int = 2):
    """A curriculum sample for the start of training: 1..max_shapes shapes, a unique expression.

    Not part of the evaluation world (which always has 3-6 shapes): with few shapes
    a model first learns to read a box off the image, then to match words to shapes.
    """
    while True:
        n = int(rng.integers(1, max_shapes + 1))
        attrs: list[tuple[str, str]] = []
        while len(attrs) < n:
            a = (_pick(rng, KINDS), _pick(rng, list(COLOURS)))
            if a not in attrs:
                attrs.append(a)
        scene = make_scene(rng, attrs)
        if scene is None:
            continue
        target = int(rng.integers(0, n))
        k, c = attrs[target]
        e = Expression("unique", "", target, Group(c, k))
        return scene, Expression(**{**e.__dict__, "sent": sentence(e)})


def make_sample(rng: np.random.Generator, etype: str | None = None, amodal: bool = False, max_tries: int = 200):
    """A (scene, expression) pair; with `amodal`, a grey occluder hides part of the target."""
    if etype is None:
        etype = _pick(rng, TYPES)
    if etype not in TYPES:
        from egm_edge.errors import InputError

        raise InputError(f"Unknown expression type {etype!r}. Choose from: {', '.join(TYPES)}.")
    for _ in range(max_tries):
        got = _attempt(rng, etype)
        if got is None:
            continue
        scene, e = got
        if amodal:
            scene = add_occluder(rng, scene, e.target)
            if scene is None:
                continue
        return scene, e
    raise RuntimeError(f"could not draw a {etype} sample in {max_tries} tries")  # pragma: no cover
