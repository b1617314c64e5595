"""Reader for RefCOCO / RefCOCO+ / RefCOCOg in the REFER layout (lichengunc/refer).

    <root>/<dataset>/instances.json          COCO images, annotations (polygons or RLE), categories
    <root>/<dataset>/refs(<split_by>).p      pickled list of refs
    <root>/images/mscoco/images/train2014/   the COCO train2014 images

The refs file is a pickle, so it is read with an unpickler that only builds plain containers and
scalars: a file that names any class or function (which is how a pickle runs code) is rejected
before anything runs. Masks are the union of an object's polygon parts (never their sum, which
counts overlapping parts twice), or its RLE.

    python -m rkd_jax.data.refer --root DIR --dataset refcoco --split-by unc
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

VALID = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
}
IMAGE_SUBDIR = Path("images") / "mscoco" / "images" / "train2014"
_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")


class UnsafePickleError(pickle.UnpicklingError):
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
    """One dataset (refcoco, refcoco+, refcocog) with one split_by, read from a REFER root."""

    def __init__(self, root: str | Path, dataset: str, split_by: str):
        check_dataset(dataset, split_by)
        self.root = Path(root)
        self.dataset = dataset
        self.split_by = split_by
        self.splits = VALID[(dataset, split_by)]
        self.image_dir = self.root / IMAGE_SUBDIR
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
        self._images = {int(im["id"]): im for im in instances["images"]}
        self._anns = {int(a["id"]): a for a in instances["annotations"]}
        self._categories = {int(c["id"]): c["name"] for c in instances["categories"]}
        self._image_anns: dict[int, list[int]] = {}
        for a in instances["annotations"]:
            self._image_anns.setdefault(int(a["image_id"]), []).append(int(a["id"]))
        raw_refs = load_plain_pickle(refs_file)
        if not isinstance(raw_refs, list):
            raise ValueError(f"{refs_file}: expected a list of refs, got {type(raw_refs).__name__}")
        self._refs: list[dict] = []
        for i, r in enumerate(raw_refs):
            if not isinstance(r, dict) or any(k not in r for k in _REF_KEYS):
                raise ValueError(
                    f"{refs_file}: ref #{i} is not a dict with keys {', '.join(_REF_KEYS)}"
                )
            ann_id, image_id = int(r["ann_id"]), int(r["image_id"])
            if ann_id not in self._anns:
                raise ValueError(
                    f"{refs_file}: ref {r['ref_id']} names ann_id {ann_id}, which "
                    f"{instances_file} does not have"
                )
            if image_id not in self._images:
                raise ValueError(
                    f"{refs_file}: ref {r['ref_id']} names image_id {image_id}, "
                    f"which {instances_file} does not have"
                )
            sentences = [s["sent"] if isinstance(s, dict) else str(s) for s in r["sentences"]]
            sent_ids = [int(s["sent_id"]) for s in r["sentences"] if isinstance(s, dict)]
            self._refs.append(
                {
                    "ref_id": int(r["ref_id"]),
                    "ann_id": ann_id,
                    "image_id": image_id,
                    "category_id": int(r.get("category_id", self._anns[ann_id]["category_id"])),
                    "sentences": sentences,
                    "sent_ids": sent_ids,
                    "split": str(r["split"]),
                }
            )

    def refs(self, split: str) -> list[dict]:
        """Referred objects of `split`: dicts with ref_id, ann_id, image_id, category_id,
        sentences (list[str], REFER's cleaned `sent`), sent_ids and split, in file order."""
        check_dataset(self.dataset, self.split_by, split)
        return [r for r in self._refs if r["split"] == split]

    def image_path(self, image_id: int) -> Path:
        """Path of the image file (not checked for existence here)."""
        return self.image_dir / self._image(image_id)["file_name"]

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


def segmentation_to_mask(segmentation, height: int, width: int, where: str = "") -> np.ndarray:
    """COCO segmentation (polygon parts, RLE with str/bytes counts, or uncompressed RLE) ->
    uint8 [H, W] in {0, 1}; polygon parts are merged as a union."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, dict):
        counts = segmentation.get("counts")
        if isinstance(counts, list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            size = [int(v) for v in segmentation["size"]]
            if size != [height, width]:
                raise ValueError(
                    f"{where}: RLE size {size} differs from image size {[height, width]}"
                )
            rle = {"size": size, "counts": counts.encode() if isinstance(counts, str) else counts}
        return mask_utils.decode(rle).astype(np.uint8)
    if not isinstance(segmentation, list):
        raise ValueError(
            f"{where}: segmentation must be polygons or RLE, got {type(segmentation).__name__}"
        )
    parts = [[float(v) for v in p] for p in segmentation if len(p) >= 6]
    if not parts:
        return np.zeros((height, width), np.uint8)
    rles = mask_utils.frPyObjects(parts, height, width)
    return mask_utils.decode(mask_utils.merge(rles, intersect=False)).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _cached(root: str, dataset: str, split_by: str) -> Refer:
    return Refer(root, dataset, split_by)


def load_refer(root: str | Path, dataset: str, split_by: str) -> Refer:
    """Read `<root>/<dataset>` split by `split_by` (cached per process)."""
    check_dataset(dataset, split_by)
    return _cached(str(Path(root).resolve()), dataset, split_by)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Per-split counts of a REFER dataset")
    p.add_argument("--root", required=True, help="REFER root (holds <dataset>/ and images/)")
    p.add_argument("--dataset", default="refcoco", choices=sorted({d for d, _ in VALID}))
    p.add_argument("--split-by", default="unc", choices=sorted({s for _, s in VALID}))
    args = p.parse_args(argv)
    try:
        refer = Refer(args.root, args.dataset, args.split_by)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.dataset} ({args.split_by}) in {args.root}")
    print(f"{'split':<8} {'images':>8} {'objects':>8} {'sentences':>10}")
    total = {"images": 0, "objects": 0, "sentences": 0}
    for split in refer.splits:
        c = refer.counts(split)
        for k in total:
            total[k] += c[k]
        print(f"{split:<8} {c['images']:>8} {c['objects']:>8} {c['sentences']:>10}")
    print(f"{'total':<8} {total['images']:>8} {total['objects']:>8} {total['sentences']:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
