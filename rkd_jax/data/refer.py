"""Reader for RefCOCO / RefCOCO+ / RefCOCOg in the REFER layout (lichengunc/refer).

    <root>/<dataset>/instances.json          COCO images, annotations (polygons or RLE), categories
    <root>/<dataset>/refs(<split_by>).p      pickled list of refs
    <root>/images/mscoco/images/train2014/   the COCO train2014 images (or any `image_dir`)

The refs file is a pickle, so it is read with an unpickler that only builds plain containers and
scalars: a file that names any class or function (which is how a pickle runs code) is rejected
before anything runs. Masks are the union of an object's polygon parts (never their sum, which
counts overlapping parts twice), or its RLE.

Every ref is checked as it is read: a known split, at least one sentence, an image record with
file_name, height and width, and an annotation whose polygons have finite coordinates inside
the image (within COORD_TOLERANCE pixels), at least 3 points, and a non-empty mask (RLE: the
image's size). A ref that fails raises one ValueError naming the file, the ref and the
annotation; with `skip_invalid=True` it is left out instead and counted (`Refer.skipped`), and
the counts are logged. Nothing unchecked reaches pycocotools, whose rasteriser runs out of
memory or crashes on a NaN or huge coordinate.

    python -m rkd_jax.data.refer --root DIR --dataset refcoco --split-by unc
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import pickle
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rkd_jax import cli

log = logging.getLogger(__name__)

VALID = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
}
IMAGE_SUBDIR = Path("images") / "mscoco" / "images" / "train2014"
_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")
# COCO polygons may sit a little outside their image (a vertex on the far edge, rounding); a
# vertex further out than this is a broken annotation, not a rounding effect.
COORD_TOLERANCE = 2.0
SKIP_HINT = "set data.skip_invalid_annotations (--skip-invalid-annotations) to leave such refs out"


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A refs pickle asked for a class or function: it could run code, so it is not loaded."""


class _PlainUnpickler(pickle.Unpickler):
    """Builds only what needs no global lookup: dict, list, tuple, str, bytes, numbers, bools."""

    def find_class(self, module, name):
        raise UnsafePickleError(
            f"refuses to load {module}.{name}: a refs file holds only lists, dicts, strings and "
            "numbers"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refuses persistent id {pid!r}")


def load_plain_pickle(path: str | Path):
    """Unpickle `path` admitting only builtin containers and scalars (UnsafePickleError else)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        # Python 2 pickles (the original refs files) store text as byte strings: decode as UTF-8.
        return _PlainUnpickler(io.BytesIO(data), encoding="utf-8").load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except Exception as e:  # truncated or not a pickle at all
        raise ValueError(f"{path}: not a readable refs pickle ({type(e).__name__}: {e})") from None


def check_dataset(dataset: str, split_by: str, split: str | None = None) -> None:
    """ValueError listing the valid combinations unless (dataset, split_by[, split]) is one."""
    valid = ", ".join(f"{d}/{s}: {'|'.join(sp)}" for (d, s), sp in VALID.items())
    if (dataset, split_by) not in VALID:
        raise ValueError(f"unknown dataset/split_by '{dataset}/{split_by}'; valid: {valid}")
    if split is not None and split not in VALID[(dataset, split_by)]:
        raise ValueError(f"unknown split '{split}' for {dataset}/{split_by}; valid: {valid}")


class Refer:
    """One dataset (refcoco, refcoco+, refcocog) with one split_by, read from a REFER root.

    Every ref is validated as it is read (see the module docstring); `skip_invalid=True` leaves
    the refs that fail out, counted by reason in `skipped` and listed in `skipped_refs`
    (ref_id, reason) instead of raising. `image_dir` holds the COCO train2014 images when they
    are kept apart from the annotations (default: `<root>/images/mscoco/images/train2014`).
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str,
        split_by: str,
        skip_invalid: bool = False,
        image_dir: str | Path | None = None,
    ):
        check_dataset(dataset, split_by)
        self.root = Path(root)
        self.dataset = dataset
        self.split_by = split_by
        self.splits = VALID[(dataset, split_by)]
        self.image_dir = Path(image_dir) if image_dir else self.root / IMAGE_SUBDIR
        if image_dir and not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"{self.image_dir}: image directory does not exist (data.image_dir: expected the "
                "COCO train2014 images)"
            )
        instances_file = self.root / dataset / "instances.json"
        refs_file = self.root / dataset / f"refs({split_by}).p"
        self.instances_file, self.refs_file = instances_file, refs_file
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: REFER root directory does not exist")
        if not instances_file.is_file():
            raise FileNotFoundError(
                f"{instances_file}: missing; expected the COCO-format instances.json "
                f"(images, annotations, categories) of {dataset}"
            )
        if not refs_file.is_file():
            raise FileNotFoundError(
                f"{refs_file}: missing; expected the pickled refs list of {dataset} "
                f"split by {split_by}"
            )
        try:
            instances = json.loads(instances_file.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{instances_file}: not readable JSON ({e})") from None
        for key in ("images", "annotations", "categories"):
            if not isinstance(instances, dict) or not isinstance(instances.get(key), list):
                raise ValueError(f"{instances_file}: expected a list under '{key}'")
        self._images = self._index(instances["images"], "images", ("id",))
        self._anns = self._index(instances["annotations"], "annotations", ("id", "image_id"))
        self._categories = {
            k: str(c["name"])
            for k, c in self._index(instances["categories"], "categories", ("id", "name")).items()
        }
        self._image_anns: dict[int, list[int]] = {}
        for ann_id, a in self._anns.items():
            self._image_anns.setdefault(_as_int(a["image_id"]), []).append(ann_id)
        raw_refs = load_plain_pickle(refs_file)
        if not isinstance(raw_refs, list):
            raise ValueError(f"{refs_file}: expected a list of refs, got {type(raw_refs).__name__}")
        self.skipped: Counter = Counter()
        self.skipped_refs: list[tuple[int, str]] = []
        self._refs: list[dict] = []
        for i, r in enumerate(raw_refs):
            if not isinstance(r, dict) or any(k not in r for k in _REF_KEYS):
                raise ValueError(
                    f"{refs_file}: ref #{i} is not a dict with keys {', '.join(_REF_KEYS)}"
                )
            ref, problem = self._read_ref(r)
            if problem is None:
                self._refs.append(ref)
                continue
            reason, detail = problem
            if not skip_invalid:
                raise ValueError(f"{refs_file}: ref {r['ref_id']!r}: {detail}; {SKIP_HINT}")
            self.skipped[reason] += 1
            self.skipped_refs.append((r["ref_id"], detail))
        if self.skipped:
            log.warning(
                "%s: left out %d invalid refs (%s); first: ref %s: %s",
                refs_file,
                len(self.skipped_refs),
                ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())),
                *self.skipped_refs[0],
            )

    def _index(self, records: list, key: str, fields: tuple[str, ...]) -> dict[int, dict]:
        """{id: record} of one instances.json list; ValueError naming a record without `fields`."""
        out = {}
        for i, rec in enumerate(records):
            missing = [f for f in fields if not isinstance(rec, dict) or f not in rec]
            if missing:
                raise ValueError(
                    f"{self.instances_file}: {key}[{i}] has no {', '.join(map(repr, missing))}"
                )
            try:
                out[_as_int(rec["id"])] = rec
            except ValueError:
                raise ValueError(
                    f"{self.instances_file}: {key}[{i}] has id {rec['id']!r}, expected an integer"
                ) from None
        return out

    def _read_ref(self, r: dict) -> tuple[dict | None, tuple[str, str] | None]:
        """(the ref as `refs` returns it, None) or (None, (reason class, what is wrong))."""
        try:
            ann_id, image_id, ref_id = (_as_int(r[k]) for k in ("ann_id", "image_id", "ref_id"))
        except ValueError as e:
            return None, ("malformed ref", str(e))
        split = r["split"]
        if split not in self.splits:
            return None, (
                "unknown split",
                f"split {split!r} is not one of {'|'.join(self.splits)} ({self.dataset}/"
                + f"{self.split_by})",
            )
        if ann_id not in self._anns:
            return None, (
                "unknown annotation",
                f"names ann_id {ann_id}, which {self.instances_file} does not have",
            )
        if image_id not in self._images:
            return None, (
                "unknown image",
                f"names image_id {image_id}, which {self.instances_file} does not have",
            )
        sentences, sent_ids, problem = _read_sentences(r["sentences"])
        if problem:
            return None, ("no sentences" if not r["sentences"] else "malformed sentence", problem)
        image = self._images[image_id]
        problem = _image_problem(image)
        if problem:
            return None, ("malformed image", f"image {image_id} of {self.instances_file} {problem}")
        ann = self._anns[ann_id]
        where = f"annotation {ann_id} of {self.instances_file}"
        if _as_int(ann["image_id"]) != image_id:
            return None, (
                "malformed annotation",
                f"{where} belongs to image {ann['image_id']}, the ref to image {image_id}",
            )
        height, width = int(image["height"]), int(image["width"])
        problem = _annotation_problem(ann, height, width)
        if problem:
            return None, (problem[0], f"{where}: {problem[1]}")
        try:
            category_id = _as_int(r.get("category_id", ann.get("category_id")))
        except ValueError:
            return None, ("malformed ref", f"{where}: no integer category_id")
        if category_id not in self._categories:
            return None, (
                "malformed annotation",
                f"category_id {category_id} is not in {self.instances_file}'s categories",
            )
        return {
            "ref_id": ref_id,
            "ann_id": ann_id,
            "image_id": image_id,
            "category_id": category_id,
            "sentences": sentences,
            "sent_ids": sent_ids,
            "split": str(split),
        }, None

    def refs(self, split: str) -> list[dict]:
        """Referred objects of `split`: dicts with ref_id, ann_id, image_id, category_id,
        sentences (list[str], REFER's cleaned `sent`), sent_ids and split, in file order."""
        check_dataset(self.dataset, self.split_by, split)
        return [r for r in self._refs if r["split"] == split]

    def image_path(self, image_id: int) -> Path:
        """Path of the image file (not checked for existence here)."""
        return self.image_dir / str(self._image(image_id)["file_name"])

    def image_size(self, image_id: int) -> tuple[int, int]:
        """(height, width) as recorded in instances.json."""
        im = self._image(image_id)
        return int(im["height"]), int(im["width"])

    def read_image_bytes(self, image_id: int) -> bytes:
        """The encoded image file; FileNotFoundError naming the expected path if it is missing."""
        path = self.image_path(image_id)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing image {image_id}; expected the COCO train2014 images under "
                f"{self.image_dir}"
            )
        return path.read_bytes()

    def annotation(self, ann_id: int) -> dict:
        """The instances.json annotation (COCO fields, plus any extra fields the file has)."""
        try:
            return self._anns[int(ann_id)]
        except KeyError:
            raise KeyError(f"{self.instances_file}: no annotation {ann_id}") from None

    def image_annotations(self, image_id: int) -> list[dict]:
        """All annotations of one image (referred or not), in file order."""
        return [self._anns[a] for a in self._image_anns.get(int(image_id), [])]

    def category_name(self, category_id: int) -> str:
        return self._categories[int(category_id)]

    def box(self, ann_id: int) -> np.ndarray:
        """COCO box [x, y, w, h] float32 of an annotation."""
        return np.asarray(self.annotation(ann_id)["bbox"], np.float32)

    def mask(self, ann_id: int) -> np.ndarray:
        """Object mask uint8 [H, W] in {0, 1}: union of the polygon parts, or the decoded RLE."""
        ann = self.annotation(ann_id)
        height, width = self.image_size(ann["image_id"])
        return segmentation_to_mask(
            ann["segmentation"], height, width, f"{self.instances_file}: annotation {ann_id}"
        )

    def counts(self, split: str) -> dict:
        """dict(images=, objects=, sentences=) of one split."""
        refs = self.refs(split)
        return {
            "images": len({r["image_id"] for r in refs}),
            "objects": len(refs),
            "sentences": sum(len(r["sentences"]) for r in refs),
        }

    def _image(self, image_id: int) -> dict:
        try:
            return self._images[int(image_id)]
        except KeyError:
            raise KeyError(f"{self.instances_file}: no image {image_id}") from None


def _as_int(value) -> int:
    """An integer id (int, integral float or digit string); ValueError naming the value."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{value!r} is not an integer id")
    try:
        out = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{value!r} is not an integer id") from None
    if isinstance(value, float) and out != value:
        raise ValueError(f"{value!r} is not an integer id")
    return out


def _read_sentences(entries) -> tuple[list[str], list[int], str | None]:
    """(sentences, sent_ids, problem): REFER's cleaned `sent` of each entry (or the plain
    string), at least one."""
    if not isinstance(entries, list) or not entries:
        return [], [], "has no sentences (expected at least one)"
    sentences, sent_ids = [], []
    for j, s in enumerate(entries):
        if isinstance(s, str):
            sentences.append(s)
            continue
        if not isinstance(s, dict) or not isinstance(s.get("sent"), str):
            return [], [], f"sentence #{j} has no 'sent' string"
        sentences.append(s["sent"])
        if "sent_id" in s:
            try:
                sent_ids.append(_as_int(s["sent_id"]))
            except ValueError as e:
                return [], [], f"sentence #{j}: sent_id {e}"
    return sentences, sent_ids, None


def _image_problem(image: dict) -> str | None:
    if not isinstance(image.get("file_name"), str) or not image["file_name"]:
        return "has no 'file_name'"
    for key in ("height", "width"):
        v = image.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 1 or v != int(v):
            return f"has {key} {v!r}, expected a positive integer"
    return None


def _annotation_problem(ann: dict, height: int, width: int) -> tuple[str, str] | None:
    """(reason class, what is wrong) of an annotation's segmentation and box, or None."""
    if "segmentation" not in ann:
        return "malformed annotation", "has no 'segmentation'"
    box = ann.get("bbox")
    if (
        not isinstance(box, list)
        or len(box) != 4
        or not all(_is_number(v) and math.isfinite(v) for v in box)
    ):
        return "malformed annotation", f"bbox {box!r} is not 4 finite numbers [x, y, w, h]"
    problem = segmentation_problem(ann["segmentation"], height, width)
    if problem:
        return problem
    if _area(ann["segmentation"], height, width) == 0:
        return "empty mask", "its mask is empty (covers no pixel of the image)"
    return None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def segmentation_problem(segmentation, height: int, width: int) -> tuple[str, str] | None:
    """(reason class, what is wrong) when a COCO segmentation cannot be rasterised safely.

    Polygons: lists of numbers in x, y pairs, finite, within COORD_TOLERANCE pixels of the
    image, at least one part with 3 or more points (shorter parts are ignored, as COCO's API
    does). RLE: size [height, width]; uncompressed counts non-negative and summing to H x W.
    """
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if size != [height, width]:
            return (
                "malformed annotation",
                f"RLE size {size!r} differs from the image's {[height, width]}",
            )
        if isinstance(counts, (str, bytes)):
            # pycocotools' decoder writes counts without a bound: check they fill the image.
            counts = _compressed_counts(counts.encode() if isinstance(counts, str) else counts)
            if counts is None:
                return "malformed annotation", "RLE counts string is not COCO's compressed RLE"
        elif not isinstance(counts, list):
            return "malformed annotation", "RLE has no 'counts' (a string or a list)"
        if not all(_is_number(c) and math.isfinite(c) and c >= 0 and c == int(c) for c in counts):
            return "malformed annotation", "RLE counts are not non-negative integers"
        if sum(int(c) for c in counts) != height * width:
            return "malformed annotation", (
                f"RLE counts sum to {sum(int(c) for c in counts)}, expected H x W = "
                f"{height * width}"
            )
        return None
    if not isinstance(segmentation, list):
        return "malformed annotation", (
            f"segmentation must be polygons or RLE, got {type(segmentation).__name__}"
        )
    if not segmentation:
        return "fewer than 3 points", "segmentation has no polygon"
    longest = 0
    for k, part in enumerate(segmentation):
        if not isinstance(part, list) or not all(_is_number(v) for v in part):
            return "malformed annotation", f"polygon part {k} is not a list of numbers"
        if len(part) % 2:
            return "malformed annotation", f"polygon part {k} has an odd number of coordinates"
        for j, v in enumerate(part):
            if not math.isfinite(v):
                return "non-finite coordinate", f"polygon part {k} has coordinate {j} = {v}"
            limit = width if j % 2 == 0 else height
            if not -COORD_TOLERANCE <= v <= limit + COORD_TOLERANCE:
                axis = "x" if j % 2 == 0 else "y"
                return "coordinate outside the image", (
                    f"polygon part {k} has {axis} = {v} outside the image's 0..{limit} "
                    f"(tolerance {COORD_TOLERANCE:g} px)"
                )
        longest = max(longest, len(part) // 2)
    if longest < 3:
        return "fewer than 3 points", (
            f"no polygon part has 3 or more points (longest: {longest}), so it encloses no area"
        )
    return None


def _compressed_counts(text: bytes) -> list[int] | None:
    """The run lengths of COCO's compressed RLE string (its rleFrString), or None if malformed."""
    counts: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            if p >= len(text) or not 48 <= text[p] < 48 + 64:
                return None
            c = text[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _area(segmentation, height: int, width: int) -> int:
    from pycocotools import mask as mask_utils

    return int(mask_utils.area(_rle(segmentation, height, width)))


def _rle(segmentation, height: int, width: int):
    """pycocotools RLE of a segmentation already checked by `segmentation_problem`."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, dict):
        counts = segmentation["counts"]
        if isinstance(counts, list):
            return mask_utils.frPyObjects(
                {"size": [height, width], "counts": [int(c) for c in counts]}, height, width
            )
        return {
            "size": [height, width],
            "counts": counts.encode() if isinstance(counts, str) else counts,
        }
    parts = [[float(v) for v in p] for p in segmentation if len(p) >= 6]
    return mask_utils.merge(mask_utils.frPyObjects(parts, height, width), intersect=False)


def segmentation_to_mask(segmentation, height: int, width: int, where: str = "") -> np.ndarray:
    """COCO segmentation (polygon parts, RLE with str/bytes counts, or uncompressed RLE) ->
    uint8 [H, W] in {0, 1}; polygon parts are merged as a union. ValueError (naming `where`)
    for one `segmentation_problem` rejects: nothing unchecked reaches pycocotools."""
    from pycocotools import mask as mask_utils

    problem = segmentation_problem(segmentation, height, width)
    if problem:
        raise ValueError(f"{where}: {problem[1]}")
    return mask_utils.decode(_rle(segmentation, height, width)).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _cached(root: str, dataset: str, split_by: str, skip_invalid: bool, image_dir: str) -> Refer:
    return Refer(root, dataset, split_by, skip_invalid, image_dir or None)


def load_refer(
    root: str | Path,
    dataset: str,
    split_by: str,
    skip_invalid: bool = False,
    image_dir: str | Path = "",
) -> Refer:
    """Read `<root>/<dataset>` split by `split_by` (cached per process); images from
    `image_dir` ('' = `<root>/images/mscoco/images/train2014`)."""
    check_dataset(dataset, split_by)
    images = str(Path(image_dir).resolve()) if image_dir else ""
    return _cached(str(Path(root).resolve()), dataset, split_by, bool(skip_invalid), images)


def _main(argv: Sequence[str] | None) -> int:
    p = cli.ArgumentParser(
        prog="python -m rkd_jax.data.refer", description="Per-split counts of a REFER dataset"
    )
    p.add_argument("--root", required=True, help="REFER root (holds <dataset>/ and images/)")
    p.add_argument("--dataset", default="refcoco", choices=sorted({d for d, _ in VALID}))
    p.add_argument("--split-by", default="unc", choices=sorted({s for _, s in VALID}))
    p.add_argument(
        "--skip-invalid-annotations",
        action="store_true",
        help="leave out (and count) refs with a broken annotation instead of failing",
    )
    args = p.parse_args(argv)
    refer = Refer(args.root, args.dataset, args.split_by, args.skip_invalid_annotations)
    print(f"{args.dataset} ({args.split_by}) in {args.root}")
    print(f"{'split':<8} {'images':>8} {'objects':>8} {'sentences':>10}")
    total = {"images": 0, "objects": 0, "sentences": 0}
    for split in refer.splits:
        c = refer.counts(split)
        for k in total:
            total[k] += c[k]
        print(f"{split:<8} {c['images']:>8} {c['objects']:>8} {c['sentences']:>10}")
    print(f"{'total':<8} {total['images']:>8} {total['objects']:>8} {total['sentences']:>10}")
    if refer.skipped:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(refer.skipped.items()))
        print(f"left out {len(refer.skipped_refs)} invalid refs: {reasons}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Print the per-split counts; bad input: one `error:` line on stderr, exit code 2."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
