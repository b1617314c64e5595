"""The embedded RefCOCO-style dataset: procedurally generated scenes written in the REFER layout.

No RefCOCO download is possible here, so the project makes its own referring-segmentation data:
textured photo backgrounds (scikit-image's bundled photos) with 3-6 coloured shapes, several of
one category in every image (so only the expression picks the target), occlusion, and
expressions from a small grammar. The files are what lichengunc's REFER API reads:

    <out>/images/mscoco/images/train2014/COCO_train2014_<image_id:012d>.jpg
    <out>/refcoco/instances.json      COCO images/annotations (polygons)/categories
    <out>/refcoco/refs(unc).p         list of refs {ref_id, ann_id, image_id, split, sentences, ...}
    <out>/refcoco+/instances.json     the same annotations
    <out>/refcoco+/refs(unc).p        the same images, expressions without location words

Splits train/val/testA/testB are disjoint by image. As RefCOCO's testA (people) and testB (other
objects), testA refers only to the "round" categories and testB only to the "angular" ones.

Each annotation carries an extra `synthetic` field (colour, radius, centre, depth order and which
objects cover it; the REFER API ignores unknown fields). `oracle_predict` parses an expression
with the grammar's own semantics and resolves it on that scene graph: the tests compare it with
language-blind predictors to show the expressions are needed and sufficient.
"""

from __future__ import annotations

import dataclasses
import io
import json
import multiprocessing
import os
import pickle
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rkd_jax import cli

# Bump when the generated data changes for a given seed, so caches of older output are redone.
GENERATOR_VERSION = 2
SPLITS = ("train", "val", "testA", "testB")
IMAGE_SUBDIR = Path("images") / "mscoco" / "images" / "train2014"
VARIANTS = ("refcoco", "refcoco+")


@dataclasses.dataclass(frozen=True)
class Category:
    id: int
    name: str
    group: str  # "round" -> testA, "angular" -> testB
    nouns: tuple[str, ...]  # the first is the category name; the others are paraphrases


CATEGORIES = (
    Category(1, "circle", "round", ("circle", "disc", "ball")),
    Category(2, "heart", "round", ("heart",)),
    Category(3, "crescent", "round", ("crescent", "moon")),
    Category(4, "flower", "round", ("flower", "blossom")),
    Category(5, "square", "angular", ("square", "box", "block")),
    Category(6, "triangle", "angular", ("triangle",)),
    Category(7, "star", "angular", ("star",)),
    Category(8, "cross", "angular", ("cross", "plus")),
)
GROUPS = {"round": "testA", "angular": "testB"}
_CATEGORY = {c.name: c for c in CATEGORIES}
_NOUN_TO_CATEGORY = {noun: c.name for c in CATEGORIES for noun in c.nouns}

COLOURS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (35, 160, 55),
    "blue": (35, 85, 215),
    "purple": (135, 50, 185),
    "white": (242, 242, 242),
}

_SIZE_WORDS = {
    "big": "big",
    "large": "big",
    "bigger": "big",
    "larger": "big",
    "biggest": "big",
    "largest": "big",
    "small": "small",
    "smaller": "small",
    "smallest": "small",
    "little": "small",
    "tiny": "small",
}
_LOC_WORDS = {
    "left": "left",
    "leftmost": "left",
    "right": "right",
    "rightmost": "right",
    "top": "top",
    "upper": "top",
    "topmost": "top",
    "bottom": "bottom",
    "lower": "bottom",
}
# Relation phrases, longest first; the kind is what the parser returns.
_RELATIONS = (
    (("in", "front", "of"), "front"),
    (("closest", "to"), "closest"),
    (("nearest", "to"), "closest"),
    (("next", "to"), "closest"),
    (("hidden", "by"), "behind"),
    (("covered", "by"), "behind"),
    (("nearest",), "closest"),
    (("behind",), "behind"),
    (("covering",), "front"),
)
# Words that RefCOCO+ forbids (absolute and relative location). "covering"/"hidden by" describe
# how objects occlude each other, which RefCOCO+ annotators were allowed to use.
LOCATION_WORDS = frozenset(
    [
        "left",
        "right",
        "top",
        "bottom",
        "upper",
        "lower",
        "leftmost",
        "rightmost",
        "topmost",
        "bottommost",
        "middle",
        "center",
        "centre",
        "above",
        "below",
        "under",
        "over",
        "behind",
        "front",
        "closest",
        "nearest",
        "near",
        "next",
        "far",
        "farthest",
        "side",
        "corner",
        "beside",
    ]
)
FAMILIES = ("location", "colour_shape", "relation", "size", "shape_only", "colour_only")
# Target proportions of the expression families (the prototype's mix, docs/miniature.md).
_FAMILY_WEIGHTS = {
    "refcoco": {
        "location": 27,
        "colour_shape": 26,
        "relation": 22,
        "size": 10,
        "shape_only": 9,
        "colour_only": 6,
    },
    "refcoco+": {
        "colour_shape": 34,
        "relation": 24,
        "size": 22,
        "shape_only": 12,
        "colour_only": 8,
    },
}

# Generation margins: an expression is only used when its answer is clear to a person.
_SIZE_RATIO = 1.3  # target radius vs the runner-up's
_LOC_MARGIN = 0.12  # fraction of the image side between the target and the runner-up
_CLOSEST_RATIO = 1.3  # distance of the runner-up vs the target's, to the anchor
_MIN_OCCLUSION = 0.10  # overlapping objects cover at least this much of the one behind
_MIN_VISIBLE = 0.55  # every object keeps at least this much of itself visible


@dataclasses.dataclass(frozen=True)
class Query:
    """The meaning of an expression: filters, then a relation, then a superlative."""

    shape: str | None = None  # category name
    colour: str | None = None
    size: str | None = None  # "big" | "small"
    loc: str | None = None  # "left" | "right" | "top" | "bottom"
    rel: tuple[str, Query] | None = None  # ("closest" | "behind" | "front", anchor)


@dataclasses.dataclass
class SceneObject:
    """What the grammar knows about one object: [x, y] centre, radius, depth order, occluders."""

    category: str
    colour: str
    radius: float
    center: tuple[float, float]
    occluded_by: frozenset[int] = frozenset()  # indices of the objects lying on top of it


def parse_expression(text: str) -> Query:
    """Read an expression of the grammar back into its Query (unknown words are ignored)."""
    words = text.lower().replace(",", " ").replace(".", " ").split()
    for i in range(len(words)):
        for phrase, kind in _RELATIONS:
            if tuple(words[i : i + len(phrase)]) == phrase:
                head = _parse_phrase(words[:i])
                anchor = _parse_phrase(words[i + len(phrase) :])
                return dataclasses.replace(head, rel=(kind, anchor))
    return _parse_phrase(words)


def _parse_phrase(words: Sequence[str]) -> Query:
    shape = colour = size = loc = None
    for w in words:
        if w in _NOUN_TO_CATEGORY:
            shape = _NOUN_TO_CATEGORY[w]
        elif w in COLOURS:
            colour = w
        elif w in _SIZE_WORDS:
            size = _SIZE_WORDS[w]
        elif w in _LOC_WORDS:
            loc = _LOC_WORDS[w]
    return Query(shape=shape, colour=colour, size=size, loc=loc)


def resolve(
    query: Query, objects: Sequence[SceneObject], strict: bool = False, anchor: int | None = None
) -> int | None:
    """Index of the one object `query` picks in the scene, or None (no object or ambiguous).

    `strict` applies the generation margins (clearly bigger, clearly further left, ...), so an
    expression is only emitted when a person would not hesitate; the oracle resolves without them.
    `anchor`: the index the relation's anchor is already known to resolve to.
    """
    cands = [
        i
        for i, o in enumerate(objects)
        if (query.shape is None or o.category == query.shape)
        and (query.colour is None or o.colour == query.colour)
    ]
    if query.rel is not None:
        kind, anchor_query = query.rel
        if anchor is None:
            anchor = resolve(anchor_query, objects, strict)
        if anchor is None:
            return None
        cands = [i for i in cands if i != anchor]
        if kind == "closest":
            ax, ay = objects[anchor].center
            dist = {
                i: np.hypot(objects[i].center[0] - ax, objects[i].center[1] - ay) for i in cands
            }
            cands = _extreme(cands, dist, smallest=True, strict=strict, ratio=_CLOSEST_RATIO)
        elif kind == "behind":
            cands = [i for i in cands if anchor in objects[i].occluded_by]
        elif kind == "front":
            cands = [i for i in cands if i in objects[anchor].occluded_by]
    if query.size is not None:
        radius = {i: objects[i].radius for i in cands}
        cands = _extreme(
            cands, radius, smallest=query.size == "small", strict=strict, ratio=_SIZE_RATIO
        )
    if query.loc is not None:
        axis = 0 if query.loc in ("left", "right") else 1
        coord = {i: objects[i].center[axis] for i in cands}
        cands = _extreme(
            cands,
            coord,
            smallest=query.loc in ("left", "top"),
            strict=strict,
            margin=_LOC_MARGIN * _scene_extent(objects, axis) if strict else 0.0,
        )
    return cands[0] if len(cands) == 1 else None


def _scene_extent(objects: Sequence[SceneObject], axis: int) -> float:
    # The image side is not in SceneObject; the scene's own spread is a good proxy for it.
    lo = min(o.center[axis] - o.radius for o in objects)
    hi = max(o.center[axis] + o.radius for o in objects)
    return hi - lo


def _extreme(cands, value, smallest: bool, strict: bool, ratio: float = 1.0, margin: float = 0.0):
    """The one candidate with the smallest/largest value (a tie: none); margins when strict."""
    if not cands:
        return []
    order = sorted(cands, key=lambda i: value[i], reverse=not smallest)
    if len(order) == 1:
        return order
    best, second = value[order[0]], value[order[1]]
    if best == second:
        return []
    if strict:
        if ratio != 1.0:
            lo, hi = (best, second) if smallest else (second, best)
            if hi < ratio * lo:
                return []
        if abs(second - best) < margin:
            return []
    return order[:1]


def scene_from_annotations(anns: Sequence[dict]) -> tuple[list[int], list[SceneObject]]:
    """Scene graph of one image from its annotations' `synthetic` fields -> (ann_ids, objects)."""
    ids = [a["id"] for a in anns]
    index = {a: i for i, a in enumerate(ids)}
    names = {c.id: c.name for c in CATEGORIES}
    objects = []
    for a in anns:
        meta = a.get("synthetic")
        if meta is None:
            raise ValueError(f"annotation {a['id']}: no 'synthetic' field (not a generated image)")
        objects.append(
            SceneObject(
                category=names[a["category_id"]],
                colour=meta["colour"],
                radius=float(meta["radius"]),
                center=(float(meta["center"][0]), float(meta["center"][1])),
                occluded_by=frozenset(index[j] for j in meta["occluded_by"]),
            )
        )
    return ids, objects


def oracle_predict(sentence: str, anns: Sequence[dict]) -> int | None:
    """Annotation id that `sentence` refers to among one image's annotations (None: no answer)."""
    ids, objects = scene_from_annotations(anns)
    found = resolve(parse_expression(sentence), objects)
    return None if found is None else ids[found]


def _noun(rng: np.random.Generator, category: str) -> str:
    nouns = _CATEGORY[category].nouns
    # The category name is the usual word; paraphrases appear a third of the time.
    return nouns[0] if len(nouns) == 1 or rng.random() < 0.67 else str(rng.choice(nouns[1:]))


def _noun_phrase(rng: np.random.Generator, q: Query) -> str:
    """'[size] [colour] noun' (or 'colour one') without the article."""
    words = []
    if q.size is not None:
        words.append(
            str(
                rng.choice(
                    {
                        "big": ["big", "large", "bigger", "larger", "biggest"],
                        "small": ["small", "smaller", "smallest", "little"],
                    }[q.size]
                )
            )
        )
    if q.colour is not None:
        words.append(q.colour)
    words.append(_noun(rng, q.shape) if q.shape is not None else str(rng.choice(["one", "thing"])))
    return " ".join(words)


def realize(rng: np.random.Generator, q: Query, variant: str) -> str:
    """One paraphrase of `q` as a lower-case expression (the `sent` of REFER)."""
    if q.rel is not None:
        kind, anchor = q.rel
        head = _noun_phrase(rng, dataclasses.replace(q, rel=None))
        phrases = {
            ("refcoco", "closest"): ["closest to", "nearest to", "next to", "nearest"],
            ("refcoco", "behind"): ["behind"],
            ("refcoco", "front"): ["in front of"],
            ("refcoco+", "behind"): ["partly hidden by", "covered by", "hidden by"],
            ("refcoco+", "front"): ["covering", "partly covering"],
        }[(variant, kind)]
        article = str(rng.choice(["the ", "the ", ""]))
        return f"{article}{head} {rng.choice(phrases)} the {_noun_phrase(rng, anchor)}"
    if q.loc is not None:
        np_ = _noun_phrase(rng, dataclasses.replace(q, loc=None))
        templates = {
            "left": [
                "the {np} on the left",
                "left {np}",
                "the leftmost {np}",
                "the left {np}",
                "{np} on the left side",
            ],
            "right": [
                "the {np} on the right",
                "right {np}",
                "the rightmost {np}",
                "the right {np}",
                "{np} on the right side",
            ],
            "top": [
                "the top {np}",
                "the {np} at the top",
                "the upper {np}",
                "top {np}",
                "the topmost {np}",
            ],
            "bottom": [
                "the bottom {np}",
                "the {np} at the bottom",
                "the lower {np}",
                "bottom {np}",
            ],
        }[q.loc]
        return str(rng.choice(templates)).format(np=np_)
    if q.size is not None:
        np_ = _noun_phrase(rng, q)
        return str(rng.choice(["the {np}", "{np}", "the {np}"])).format(np=np_)
    if q.shape is None:  # colour only
        c = q.colour
        return str(rng.choice([f"the {c} one", f"the {c} thing", f"{c} object", f"the {c} shape"]))
    n = _noun(rng, q.shape)
    if q.colour is None:  # shape only
        return str(rng.choice([f"the {n}", n, f"{_a(n)} {n}", f"the {n} shape"]))
    c = q.colour
    return str(
        rng.choice(
            [
                f"the {c} {n}",
                f"{c} {n}",
                f"{_a(c)} {c} {n}",
                f"the {n} that is {c}",
                f"the {c} colored {n}",
            ]
        )
    )


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _family(q: Query) -> str:
    if q.rel is not None:
        return "relation"
    if q.loc is not None:
        return "location"
    if q.size is not None:
        return "size"
    if q.shape is None:
        return "colour_only"
    return "shape_only" if q.colour is None else "colour_shape"


def expression_family(sentence: str) -> str:
    """The family (one of FAMILIES) of an expression of this grammar, read back by the parser.

    The parser inverts `realize`, so this is the family the generator drew the expression
    from; evaluation uses it to score the embedded data per family.
    """
    return _family(parse_expression(sentence))


def anchor_queries(objects: Sequence[SceneObject]) -> list[list[Query]]:
    """Per object, the simple descriptions (no relation) that name it alone in the scene."""
    out = []
    for a, o in enumerate(objects):
        qs = (
            Query(shape=o.category),
            Query(shape=o.category, colour=o.colour),
            Query(colour=o.colour),
        )
        out.append([q for q in qs if resolve(q, objects) == a])
    return out


def candidate_queries(
    target: int,
    objects: Sequence[SceneObject],
    variant: str,
    anchors: list[list[Query]] | None = None,
    families: Sequence[str] = FAMILIES,
) -> dict:
    """Every query of the grammar that picks `target` with clear margins -> {family: [Query]}.

    Only `families` are enumerated (relations are the costly ones).
    """
    o = objects[target]
    out: dict[str, list[Query]] = {f: [] for f in families}

    def keep(q: Query, family: str, anchor: int | None = None):
        if resolve(q, objects, strict=True, anchor=anchor) == target:
            out[family].append(q)

    if "shape_only" in out:
        keep(Query(shape=o.category), "shape_only")
    if "colour_only" in out:
        keep(Query(colour=o.colour), "colour_only")
    if "colour_shape" in out:
        keep(Query(shape=o.category, colour=o.colour), "colour_shape")
    heads = ((o.category, None), (o.category, o.colour))
    for shape, colour in heads:
        # Size and location only where they are needed: the head alone is ambiguous.
        if not {"size", "location"} & out.keys():
            break
        if resolve(Query(shape=shape, colour=colour), objects) is not None:
            continue
        if "size" in out:
            for size in ("big", "small"):
                keep(Query(shape=shape, colour=colour, size=size), "size")
        if "location" in out and variant == "refcoco":
            for loc in ("left", "right", "top", "bottom"):
                keep(Query(shape=shape, colour=colour, loc=loc), "location")
    if "relation" not in out:
        return out
    anchors = anchor_queries(objects) if anchors is None else anchors
    kinds = ("closest", "behind", "front") if variant == "refcoco" else ("behind", "front")
    for a, aqs in enumerate(anchors):
        if a == target:
            continue
        for aq in aqs:
            for kind in kinds:
                if kind == "behind" and a not in o.occluded_by:
                    continue
                if kind == "front" and target not in objects[a].occluded_by:
                    continue
                for shape, colour in heads:
                    keep(Query(shape=shape, colour=colour, rel=(kind, aq)), "relation", a)
    return out


def choose_expressions(
    rng: np.random.Generator,
    target: int,
    objects: Sequence[SceneObject],
    variant: str,
    count: int,
    anchors: list[list[Query]] | None = None,
) -> list[tuple[str, str]]:
    """Up to `count` distinct expressions for `target` -> [(family, sent)], families varied.

    A family is drawn by its weight among the families that can describe the target (prefering
    families not used yet); its queries are only enumerated once it is drawn.
    """
    weights = _FAMILY_WEIGHTS[variant]
    options: dict[str, list[Query]] = {}
    chosen: list[tuple[str, str]] = []
    used_families: set[str] = set()
    attempts = 0
    while len(chosen) < count and attempts < 4 * count:
        possible = [f for f in weights if options.get(f, True)]  # unknown or non-empty
        if not possible:
            break
        fresh = [f for f in possible if f not in used_families] or possible
        cum = np.cumsum([weights[f] for f in fresh])
        family = fresh[int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))]
        if family not in options:
            options.update(candidate_queries(target, objects, variant, anchors, (family,)))
            if not options[family]:
                continue  # drawing again among the rest = drawing among the available ones
        attempts += 1
        q = options[family][int(rng.integers(len(options[family])))]
        text = realize(rng, q, variant)
        # The emitted words must mean what was chosen: the grammar's own round trip.
        if resolve(parse_expression(text), objects) != target:
            raise AssertionError(f"expression {text!r} does not resolve to its target")
        if any(text == t for _, t in chosen):
            continue
        chosen.append((family, text))
        used_families.add(family)
    return chosen


def _unit_shape(rng: np.random.Generator, category: str) -> np.ndarray:
    """Outline of a shape with circumradius ~1 centred at 0 -> [K, 2] (x, y), y pointing down."""
    if category == "circle":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
        spin = 0.0
    elif category == "heart":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y], 1)
        pts -= (pts.max(0) + pts.min(0)) / 2
        pts /= np.abs(pts).max()
        spin = rng.uniform(-0.35, 0.35)
    elif category == "crescent":
        # Outer unit circle minus a circle of radius 0.85 centred 0.5 to the right.
        xi = (1 - 0.85**2 + 0.5**2) / (2 * 0.5)
        a0 = np.arctan2(np.sqrt(1 - xi**2), xi)
        outer = np.linspace(a0, 2 * np.pi - a0, 30)
        b0 = np.arctan2(np.sqrt(1 - xi**2), xi - 0.5)
        inner = np.linspace(2 * np.pi - b0, b0, 20)
        pts = np.concatenate(
            [
                np.stack([np.cos(outer), np.sin(outer)], 1),
                np.stack([0.5 + 0.85 * np.cos(inner), 0.85 * np.sin(inner)], 1),
            ]
        )
        spin = rng.uniform(0, 2 * np.pi)
    elif category == "flower":
        t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        r = 0.72 + 0.28 * np.cos(6 * t)  # six round petals: not to be mistaken for a star
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
        spin = rng.uniform(0, 2 * np.pi)
    elif category == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) / np.sqrt(2)
        spin = rng.uniform(-0.4, 0.4)
    elif category == "triangle":
        t = -np.pi / 2 + np.array([0, 2, 4]) * np.pi / 3
        pts = np.stack([np.cos(t), np.sin(t)], 1)
        pts[:, 1] += 0.25  # centre the triangle's box, not its centroid
        spin = rng.uniform(-0.4, 0.4)
    elif category == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
        spin = rng.uniform(0, 2 * np.pi)
    elif category == "cross":
        a, b = 0.33, 1.0
        pts = np.array(
            [
                [-a, -b],
                [a, -b],
                [a, -a],
                [b, -a],
                [b, a],
                [a, a],
                [a, b],
                [-a, b],
                [-a, a],
                [-b, a],
                [-b, -a],
                [-a, -a],
            ],
            np.float64,
        )
        spin = rng.uniform(-0.4, 0.4)
    else:
        raise ValueError(f"unknown category {category!r}")
    c, s = np.cos(spin), np.sin(spin)
    return pts @ np.array([[c, s], [-s, c]])


_BACKGROUNDS: list[np.ndarray] | None = None


def _backgrounds() -> list[np.ndarray]:
    """scikit-image's bundled photos, muted and at most 320 px a side (uint8 [H, W, 3])."""
    global _BACKGROUNDS
    if _BACKGROUNDS is None:
        import skimage.data
        from PIL import Image

        names = [
            "astronaut",
            "coffee",
            "chelsea",
            "rocket",
            "hubble_deep_field",
            "immunohistochemistry",
            "brick",
            "grass",
            "gravel",
            "camera",
            "coins",
            "moon",
            "cell",
        ]
        photos = []
        for name in names:
            try:
                img = np.asarray(getattr(skimage.data, name)())
            except Exception:  # a photo missing from this scikit-image build: use the others
                continue
            if img.ndim == 2:
                img = np.repeat(img[..., None], 3, axis=2)
            img = Image.fromarray(img[..., :3].astype(np.uint8))
            img.thumbnail((320, 320), Image.BILINEAR)
            rgb = np.asarray(img, np.float32)
            # Half-desaturated and darkened, so the shapes' colours stay nameable on any photo.
            muted = 0.55 * (0.5 * rgb + 0.5 * rgb.mean(axis=2, keepdims=True))
            photos.append(muted.astype(np.uint8))
        if not photos:
            raise RuntimeError("scikit-image ships none of the background photos")
        _BACKGROUNDS = photos
    return _BACKGROUNDS


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    from PIL import Image

    photo = _backgrounds()[int(rng.integers(len(_backgrounds())))]
    ph, pw = photo.shape[:2]
    scale = rng.uniform(0.3, 1.0) * min(pw / width, ph / height)
    cw, ch = max(8, int(width * scale)), max(8, int(height * scale))
    x0, y0 = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
    crop = Image.fromarray(photo[y0 : y0 + ch, x0 : x0 + cw]).resize(
        (width, height), Image.BILINEAR
    )
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    gain, offset = rng.uniform(0.6, 1.0, size=3), rng.uniform(30, 90)
    # One lookup table per channel: tint and lift without a float copy of the image.
    v = np.arange(256)
    lut = np.concatenate([np.clip(v * g + offset, 0, 255) for g in gain]).astype(np.uint8)
    return np.asarray(crop.point(lut.tolist()))


@dataclasses.dataclass
class _Placed:
    category: str
    colour: str
    radius: float
    center: tuple[float, float]
    polygon: np.ndarray  # [K, 2] in COCO pixel coordinates (pixel i spans [i, i + 1))
    full: np.ndarray  # bool [H, W]
    rgb: tuple[int, int, int]
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # rows/columns that can hold it: y0, y1, x0, x1

    def __post_init__(self):
        self.box = _box_of(self.polygon, *self.full.shape)

    def may_touch(self, other: _Placed) -> bool:
        a, b = self.box, other.box
        return a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]


def _raster(
    polygons: Sequence[np.ndarray],
    height: int,
    width: int,
    box: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Union of polygon parts as pycocotools rasterises them -> bool [H, W].

    With `box` (y0, y1, x0, x1, holding every part) only that window is rasterised: the same
    pixels, since shifting by whole pixels commutes with rasterising, at a fraction of the cost.
    """
    from pycocotools import mask as mask_utils

    y0, y1, x0, x1 = (0, height, 0, width) if box is None else box
    shift = np.array([x0, y0], np.float64)
    flat = [(p - shift).reshape(-1).tolist() for p in polygons]
    rles = mask_utils.frPyObjects(flat, y1 - y0, x1 - x0)
    window = mask_utils.decode(mask_utils.merge(rles)).astype(bool)
    if box is None:
        return window
    out = np.zeros((height, width), bool)
    out[y0:y1, x0:x1] = window
    return out


def _box_of(polygon: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """Pixel rows and columns that can hold a polygon -> (y0, y1, x0, x1), clipped to the image."""
    (x0, y0), (x1, y1) = np.floor(polygon.min(0)), np.ceil(polygon.max(0))
    return (
        max(int(y0) - 1, 0),
        min(int(y1) + 1, height),
        max(int(x0) - 1, 0),
        min(int(x1) + 1, width),
    )


def _visible(objects: Sequence[_Placed]) -> list[np.ndarray]:
    above = np.zeros_like(objects[0].full)
    out = []
    for o in reversed(objects):
        out.append(o.full & ~above)
        above |= o.full
    return out[::-1]


def _layout_ok(objects: Sequence[_Placed]) -> bool:
    from scipy import ndimage

    for o, vis in zip(objects, _visible(objects), strict=True):
        area = o.full.sum()
        seen = vis.sum()
        if seen == area:
            continue
        if seen < _MIN_VISIBLE * area:
            return False
        if area - seen < _MIN_OCCLUSION * area:
            return False  # a sliver of overlap would make "behind" a matter of a few pixels
        y0, y1, x0, x1 = o.box
        crop = vis[y0:y1, x0:x1]
        if (ndimage.binary_fill_holes(crop) != crop).any():
            return False  # a hole cannot be a COCO polygon; the REFER API only reads polygons
    return True


def _scene_spec(rng: np.random.Generator, group: str) -> list[tuple[str, str, str, bool]]:
    """Objects to place -> [(category, colour, size bin, is_focus)]."""
    focus = [c.name for c in CATEGORIES if c.group == group]
    other = [c.name for c in CATEGORIES if c.group != group]
    colours = list(COLOURS)
    main = str(rng.choice(focus))
    n_main = 2 if rng.random() < 0.65 else 3
    colour = [str(c) for c in rng.choice(colours, size=n_main)]
    size = [_size_bin(rng) for _ in range(n_main)]
    if rng.random() < 0.4:
        # Two of a kind in one colour: told apart by size (mostly), place or a relation.
        colour[1] = colour[0]
        if rng.random() < 0.75:
            size[1] = "small" if size[0] == "large" else "large"
    spec = [(main, colour[i], size[i], True) for i in range(n_main)]
    if rng.random() < 0.5:
        second = str(rng.choice([c for c in focus if c != main]))
        for _ in range(1 if rng.random() < 0.7 else 2):
            spec.append((second, str(rng.choice(colours)), _size_bin(rng), True))
    n = max(int(rng.integers(3, 7)), len(spec) + (1 if rng.random() < 0.8 else 0))
    while len(spec) < n:
        spec.append((str(rng.choice(other)), str(rng.choice(colours)), _size_bin(rng), False))
    order = rng.permutation(len(spec))
    return [spec[i] for i in order]


def _size_bin(rng: np.random.Generator) -> str:
    return "small" if rng.random() < 0.5 else "large"


def _place(rng, spec, width: int, height: int) -> tuple[list[_Placed], list[bool]] | None:
    side = min(width, height)
    placed: list[_Placed] = []
    focus: list[bool] = []
    for category, colour, size_bin, is_focus in spec:
        lo, hi = (0.09, 0.115) if size_bin == "small" else (0.155, 0.2)
        radius = rng.uniform(lo, hi) * side
        shape = _unit_shape(rng, category) * radius
        allow_overlap = rng.random() < 0.4
        jitter = rng.integers(-18, 19, size=3)
        rgb = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255))
        for _ in range(60):
            cx = rng.uniform(radius + 2, width - radius - 2)
            cy = rng.uniform(radius + 2, height - radius - 2)
            poly = shape + np.array([cx, cy])
            cand = _Placed(
                category,
                colour,
                radius,
                (cx, cy),
                poly,
                _raster([poly], height, width, _box_of(poly, height, width)),
                rgb,
            )
            overlaps = any(cand.may_touch(p) and (cand.full & p.full).any() for p in placed)
            if overlaps and not allow_overlap:
                continue
            if overlaps and not _layout_ok(placed + [cand]):
                continue
            placed.append(cand)
            focus.append(is_focus)
            break
    if len(placed) < 3 or sum(focus) < 2:
        return None
    return placed, focus


def _polygons_of(mask: np.ndarray) -> list[np.ndarray]:
    """Outer boundaries of a hole-free mask as COCO polygons ([K, 2] x, y) -> parts."""
    # The private module path avoids skimage.measure's package import, which pulls in
    # scipy.signal and costs seconds in every generation worker.
    from skimage.measure._find_contours import find_contours

    parts = []
    for contour in find_contours(np.pad(mask, 1).astype(np.float32), 0.5):
        contour = _drop_collinear(contour[:-1])
        if len(contour) < 3:
            continue
        # find_contours gives (row, col) of pixel centres; COCO puts pixel centres at +0.5.
        xy = contour[:, ::-1] - 1 + 0.5
        if _raster([xy], *mask.shape).sum() < 4:
            continue  # slivers of a pixel or two: annotators would not draw them
        parts.append(xy)
    return parts


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """Vertices of a closed contour where its direction changes ([K, 2] -> [K', 2])."""
    step = np.roll(points, -1, axis=0) - points
    prev = np.roll(step, 1, axis=0)
    cross = step[:, 0] * prev[:, 1] - step[:, 1] * prev[:, 0]
    return points[np.abs(cross) > 1e-9]


def _render(rng, bg: np.ndarray, objects: Sequence[_Placed]) -> bytes:
    from PIL import Image, ImageDraw

    height, width = bg.shape[:2]
    k = 3  # supersampling: antialiased edges without a separate alpha pass
    canvas = Image.fromarray(bg).resize((width * k, height * k), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for o in objects:
        # Sub-pixel m of pixel i sits at (k*i + m + 0.5) / k in COCO coordinates.
        xy = [(float(x * k - 0.5), float(y * k - 0.5)) for x, y in o.polygon]
        dark = tuple(int(c * 0.45) for c in o.rgb)
        draw.polygon(xy, fill=o.rgb, outline=dark, width=k)
    img = canvas.reduce(k)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(85, 96)))
    return buf.getvalue()


def make_image(seed: int, index: int, split: str, sentences_per_object: int = 2) -> dict:
    """One generated image and its objects and expressions, a pure function of (seed, index)."""
    rng = np.random.default_rng([seed, index, 0xC0C0])
    group = {"testA": "round", "testB": "angular"}.get(split)
    if group is None:
        group = "round" if rng.random() < 0.5 else "angular"
    for _ in range(50):
        width, height = int(rng.integers(160, 225)), int(rng.integers(128, 193))
        layout = _place(rng, _scene_spec(rng, group), width, height)
        if layout is not None:
            break
    else:
        raise RuntimeError(f"image {index}: no layout found in 50 tries (seed {seed})")
    placed, focus = layout
    visible = _visible(placed)
    annotations = []
    for o, vis in zip(placed, visible, strict=True):
        occluded = vis.sum() < o.full.sum()
        parts = _polygons_of(vis) if occluded else [o.polygon]
        mask = _raster(parts, height, width, o.box)
        y0, y1, x0, x1 = o.box
        ys, xs = np.nonzero(mask[y0:y1, x0:x1])
        ys, xs = ys + y0, xs + x0
        annotations.append(
            {
                "segmentation": [np.round(p, 2).reshape(-1).tolist() for p in parts],
                "area": float(mask.sum()),
                "bbox": [
                    float(xs.min()),
                    float(ys.min()),
                    float(xs.max() - xs.min() + 1),
                    float(ys.max() - ys.min() + 1),
                ],
                "iscrowd": 0,
                "category_id": _CATEGORY[o.category].id,
            }
        )
    scene = []
    for i, o in enumerate(placed):
        covers = frozenset(
            j
            for j in range(i + 1, len(placed))
            if o.may_touch(placed[j]) and (o.full & placed[j].full).any()
        )
        scene.append(SceneObject(o.category, o.colour, o.radius, o.center, covers))
    for a, o, s in zip(annotations, placed, scene, strict=True):
        a["synthetic"] = {
            "colour": o.colour,
            "radius": round(float(o.radius), 3),
            "center": [round(float(o.center[0]), 3), round(float(o.center[1]), 3)],
            "occluded_by": sorted(s.occluded_by),  # object indices; made ann ids on assembly
        }
    refs = {}
    anchors = anchor_queries(scene)
    for variant in VARIANTS:
        refs[variant] = []
        for i in range(len(placed)):
            if not focus[i]:
                continue
            sents = choose_expressions(rng, i, scene, variant, sentences_per_object, anchors)
            if sents:
                refs[variant].append((i, sents))
    jpeg = _render(rng, _background(rng, width, height), placed)
    return {
        "index": index,
        "split": split,
        "width": width,
        "height": height,
        "jpeg": jpeg,
        "annotations": annotations,
        "refs": refs,
    }


def split_of_images(num_images: int, seed: int, eval_fraction: float) -> list[str]:
    """Split name of each image index: val/testA/testB get `eval_fraction` each, train the rest."""
    n_eval = max(1, round(num_images * eval_fraction)) if num_images >= 4 else 0
    if num_images < 4:
        raise ValueError(f"num_images={num_images}: need at least 4 (one image per split)")
    order = np.random.default_rng([seed, 0x5917]).permutation(num_images)
    split = ["train"] * num_images
    for k, name in enumerate(("val", "testA", "testB")):
        for i in order[k * n_eval : (k + 1) * n_eval]:
            split[int(i)] = name
    return split


def _raw_form(rng: np.random.Generator, sent: str) -> str:
    raw = sent[0].upper() + sent[1:] if rng.random() < 0.3 else sent
    return raw + "." if rng.random() < 0.2 else raw


def _make_image_star(args):
    return make_image(*args)


def generate(
    out_dir: str | Path,
    seed: int = 0,
    num_images: int = 5000,
    eval_fraction: float = 0.08,
    sentences_per_object: int = 2,
    workers: int | None = None,
) -> dict:
    """Write both variants in the REFER layout under `out_dir`; returns counts per split/variant.

    Deterministic from `seed` (and independent of `workers`). The default, 5,000 images, gives
    3,800 train and 400 each of val/testA/testB images (docs/miniature.md's sizing).
    """
    out_dir = Path(out_dir)
    splits = split_of_images(num_images, seed, eval_fraction)
    image_dir = out_dir / IMAGE_SUBDIR
    image_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(seed, i, splits[i], sentences_per_object) for i in range(num_images)]
    workers = min(os.cpu_count() or 1, 4) if workers is None else workers
    if workers > 1 and num_images >= 200:
        ctx = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
        with ctx.Pool(workers) as pool:
            results = pool.imap(_make_image_star, jobs, chunksize=16)
            return _assemble(out_dir, image_dir, seed, results)
    return _assemble(out_dir, image_dir, seed, map(_make_image_star, jobs))


def _assemble(out_dir: Path, image_dir: Path, seed: int, results) -> dict:
    images, annotations = [], []
    refs = {v: [] for v in VARIANTS}
    sent_id = {v: 0 for v in VARIANTS}
    families = {v: Counter() for v in VARIANTS}
    ann_id = 0
    for r in results:
        image_id = r["index"] + 1
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        (image_dir / file_name).write_bytes(r["jpeg"])
        images.append(
            {"id": image_id, "file_name": file_name, "height": r["height"], "width": r["width"]}
        )
        ids = list(range(ann_id + 1, ann_id + 1 + len(r["annotations"])))
        ann_id += len(ids)
        for a, aid in zip(r["annotations"], ids, strict=True):
            a = dict(a, id=aid, image_id=image_id)
            a["synthetic"] = dict(
                a["synthetic"], occluded_by=[ids[j] for j in a["synthetic"]["occluded_by"]]
            )
            annotations.append(a)
        rng = np.random.default_rng([seed, r["index"], 0xBEEF])
        for variant in VARIANTS:
            for obj, sents in r["refs"][variant]:
                sentences = []
                for family, sent in sents:
                    sentences.append(
                        {
                            "tokens": sent.split(),
                            "raw": _raw_form(rng, sent),
                            "sent_id": sent_id[variant],
                            "sent": sent,
                        }
                    )
                    sent_id[variant] += 1
                    families[variant][family] += 1
                a = ids[obj]
                refs[variant].append(
                    {
                        "ref_id": len(refs[variant]),
                        "ann_id": a,
                        "image_id": image_id,
                        "split": r["split"],
                        "sentences": sentences,
                        "category_id": r["annotations"][obj]["category_id"],
                        "sent_ids": [s["sent_id"] for s in sentences],
                        "file_name": f"COCO_train2014_{image_id:012d}_{a}.jpg",
                    }
                )
    instances = {
        "info": {"description": f"rkd_jax synthetic RefCOCO-style scenes, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c.id, "name": c.name, "supercategory": c.group} for c in CATEGORIES],
    }
    text = json.dumps(instances, separators=(",", ":"))
    summary = {"images": len(images), "annotations": len(annotations), "variants": {}}
    for variant in VARIANTS:
        d = out_dir / variant
        d.mkdir(parents=True, exist_ok=True)
        (d / "instances.json").write_text(text)
        with open(d / "refs(unc).p", "wb") as f:
            # Protocol 2 is what the original (Python 2) REFER API can read too.
            pickle.dump(refs[variant], f, protocol=2)
        per_split = {}
        for s in SPLITS:
            rs = [r for r in refs[variant] if r["split"] == s]
            per_split[s] = {
                "images": len({r["image_id"] for r in rs}),
                "objects": len(rs),
                "sentences": sum(len(r["sentences"]) for r in rs),
            }
        total = sum(families[variant].values())
        summary["variants"][variant] = {
            "splits": per_split,
            "families": {f: round(n / total, 3) for f, n in families[variant].most_common()},
        }
    return summary


def _main(argv: Sequence[str] | None) -> int:
    p = cli.ArgumentParser(
        prog="python -m rkd_jax.data.synthetic", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", required=True, help="output root (REFER layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=5000)
    p.add_argument("--sentences-per-object", type=int, default=2)
    p.add_argument("--workers", type=int, default=None, help="generation processes")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out directory that already holds files (they are replaced)",
    )
    args = p.parse_args(argv)
    for flag, value in (
        ("--num-images", args.num_images),
        ("--sentences-per-object", args.sentences_per_object),
        ("--workers", 1 if args.workers is None else args.workers),
    ):
        if value < 1:
            raise cli.UserError(f"{flag} {value}: expected a positive integer")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise cli.UserError(f"--out {out}: is a file; expected a directory (the REFER root)")
    if out.is_dir() and not args.overwrite:
        held = sorted(p.name for p in out.iterdir())
        if held:
            raise cli.UserError(
                f"--out {out}: already holds {', '.join(held[:3])}{' ...' if len(held) > 3 else ''}"
                "; its instances.json, refs pickles and images would be replaced: pass "
                "--overwrite, or choose an empty or new directory"
            )
    start = time.perf_counter()
    summary = generate(
        out,
        seed=args.seed,
        num_images=args.num_images,
        sentences_per_object=args.sentences_per_object,
        workers=args.workers,
    )
    print(json.dumps(summary, indent=1))
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the dataset into --out; bad input: one `error:` line on stderr, exit code 2."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
