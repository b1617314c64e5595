"""REFER reader: counts and masks against hand-built files, the restricted unpickler, bad input."""

import io
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from rkd_jax.data import refer

# Image 1 is 30 x 20 (w x h); image 2 is 16 x 16.
RECT_A = [2, 2, 12, 2, 12, 10, 2, 10]  # pixels x 2..11, y 2..9
RECT_B = [8, 6, 20, 6, 20, 16, 8, 16]  # pixels x 8..19, y 6..15: overlaps A on 4 x 4 pixels


def _union_of_rects() -> np.ndarray:
    m = np.zeros((20, 30), np.uint8)
    m[2:10, 2:12] = 1
    m[6:16, 8:20] = 1
    return m


def _block(h, w, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def write_tiny_root(root, sentences=None, corrupt_image=None, skip_image=None):
    """A REFER root with 2 images, 5 annotations (overlapping polygon parts, compressed and
    uncompressed RLE) and 5 refs over train/val/testA/testB, for refcoco (unc)."""
    from pycocotools import mask as mask_utils

    root = os.fspath(root)
    image_dir = os.path.join(root, "images", "mscoco", "images", "train2014")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "refcoco"), exist_ok=True)
    images = [
        {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 20, "width": 30},
        {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": 16, "width": 16},
    ]
    rng = np.random.default_rng(0)
    for im in images:
        path = os.path.join(image_dir, im["file_name"])
        if im["id"] == skip_image:
            continue
        pixels = rng.integers(0, 255, (im["height"], im["width"], 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG")
        data = buf.getvalue()
        if im["id"] == corrupt_image:
            data = data[: len(data) // 3]  # truncated: the decoder fails
        with open(path, "wb") as f:
            f.write(data)
    rle = mask_utils.encode(np.asfortranarray(_block(20, 30, 3, 9, 22, 28)))
    annotations = [
        {
            "id": 11,
            "image_id": 1,
            "category_id": 1,
            "segmentation": [RECT_A, RECT_B],
            "area": 184.0,
            "bbox": [2.0, 2.0, 18.0, 14.0],
            "iscrowd": 0,
        },
        {
            "id": 12,
            "image_id": 1,
            "category_id": 2,
            "iscrowd": 0,
            "area": 36.0,
            "segmentation": {"size": [20, 30], "counts": rle["counts"].decode()},
            "bbox": [22.0, 3.0, 6.0, 6.0],
        },
        {
            "id": 13,
            "image_id": 1,
            "category_id": 2,
            "iscrowd": 0,
            "area": 4.0,
            "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]],
            "bbox": [0.0, 0.0, 2.0, 2.0],
        },
        # Uncompressed RLE, column-major: pixels 20..39 in Fortran order = column 1, rows 4..15
        # and column 2, rows 0..7.
        {
            "id": 21,
            "image_id": 2,
            "category_id": 1,
            "iscrowd": 1,
            "area": 20.0,
            "segmentation": {"size": [16, 16], "counts": [20, 20, 216]},
            "bbox": [1.0, 0.0, 2.0, 16.0],
        },
        {
            "id": 22,
            "image_id": 2,
            "category_id": 2,
            "iscrowd": 0,
            "area": 24.0,
            "segmentation": [[4, 4, 10, 4, 10, 8, 4, 8]],
            "bbox": [4.0, 4.0, 6.0, 4.0],
        },
    ]
    categories = [
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 2, "name": "cup", "supercategory": "kitchen"},
    ]
    with open(os.path.join(root, "refcoco", "instances.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    sentences = sentences or {}
    plan = [  # ref_id, ann_id, image_id, split, sentences
        (0, 11, 1, "train", sentences.get(0, ["man on the left", "left guy"])),
        (1, 12, 1, "val", sentences.get(1, ["cup"])),
        (2, 21, 2, "testA", sentences.get(2, ["thin person", "the person", "tall person"])),
        (3, 22, 2, "testB", sentences.get(3, ["the cup"])),
        (4, 13, 1, "train", sentences.get(4, ["small cup"])),
    ]
    refs, sent_id = [], 0
    for ref_id, ann_id, image_id, split, sents in plan:
        entries = []
        for s in sents:
            entries.append({"tokens": s.split(), "raw": s, "sent_id": sent_id, "sent": s})
            sent_id += 1
        ann = next(a for a in annotations if a["id"] == ann_id)
        refs.append(
            {
                "ref_id": ref_id,
                "ann_id": ann_id,
                "image_id": image_id,
                "split": split,
                "sentences": entries,
                "category_id": ann["category_id"],
                "sent_ids": [e["sent_id"] for e in entries],
                "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
            }
        )
    with open(os.path.join(root, "refcoco", "refs(unc).p"), "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return root


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_root(tmp_path / "refer")


def test_counts_per_split(tiny):
    r = refer.Refer(tiny, "refcoco", "unc")
    assert r.counts("train") == {"images": 1, "objects": 2, "sentences": 3}
    assert r.counts("val") == {"images": 1, "objects": 1, "sentences": 1}
    assert r.counts("testA") == {"images": 1, "objects": 1, "sentences": 3}
    assert r.counts("testB") == {"images": 1, "objects": 1, "sentences": 1}
    ref = r.refs("testA")[0]
    assert ref["sentences"] == ["thin person", "the person", "tall person"]
    assert (ref["ref_id"], ref["ann_id"], ref["image_id"], ref["category_id"]) == (2, 21, 2, 1)
    assert r.image_size(1) == (20, 30)
    assert r.image_path(2).name == "COCO_train2014_000000000002.jpg"
    assert r.image_path(2).is_file()


def test_overlapping_polygon_parts_are_a_union(tiny):
    r = refer.Refer(tiny, "refcoco", "unc")
    m = r.mask(11)
    assert m.dtype == np.uint8 and m.shape == (20, 30)
    np.testing.assert_array_equal(m, _union_of_rects())
    assert m.sum() == 80 + 120 - 16
    # What summing the decoded parts (LAVT's REFER copy) gives instead: 2 on the overlap.
    from pycocotools import mask as mask_utils

    summed = mask_utils.decode(mask_utils.frPyObjects([RECT_A, RECT_B], 20, 30)).sum(axis=2)
    assert summed.max() == 2 and not np.array_equal(summed, m)


def test_rle_masks(tiny):
    r = refer.Refer(tiny, "refcoco", "unc")
    np.testing.assert_array_equal(r.mask(12), _block(20, 30, 3, 9, 22, 28))
    expected = np.zeros(16 * 16, np.uint8)
    expected[20:40] = 1
    np.testing.assert_array_equal(r.mask(21), expected.reshape(16, 16, order="F"))
    np.testing.assert_array_equal(r.mask(22), _block(16, 16, 4, 8, 4, 10))


class _Hostile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_hostile_pickle_is_rejected_and_nothing_runs(tiny, tmp_path):
    marker = tmp_path / "pwned"
    refs_file = os.path.join(tiny, "refcoco", "refs(unc).p")
    with open(refs_file, "wb") as f:
        pickle.dump([{"ref_id": 0, "payload": _Hostile(marker)}], f)
    with pytest.raises(refer.UnsafePickleError, match=r"refs\(unc\)\.p.*(posix|os)\.system"):
        refer.Refer(tiny, "refcoco", "unc")
    assert not marker.exists()
    # The plain loader refuses any class, however harmless.
    with open(refs_file, "wb") as f:
        pickle.dump([{"ref_id": 0, "when": np.float64(1.0)}], f)
    with pytest.raises(refer.UnsafePickleError, match="numpy"):
        refer.load_plain_pickle(refs_file)


def test_missing_files_name_the_path(tiny):
    os.remove(os.path.join(tiny, "refcoco", "refs(unc).p"))
    with pytest.raises(FileNotFoundError, match=r"refcoco/refs\(unc\)\.p: missing.*pickled refs"):
        refer.Refer(tiny, "refcoco", "unc")
    os.remove(os.path.join(tiny, "refcoco", "instances.json"))
    with pytest.raises(FileNotFoundError, match=r"refcoco/instances\.json: missing.*COCO-format"):
        refer.Refer(tiny, "refcoco", "unc")


def test_missing_image_names_the_path(tmp_path):
    root = write_tiny_root(tmp_path / "r", skip_image=2)
    r = refer.Refer(root, "refcoco", "unc")
    with pytest.raises(FileNotFoundError, match=r"COCO_train2014_000000000002\.jpg: missing"):
        r.read_image_bytes(2)
    assert len(r.read_image_bytes(1)) > 100


def test_invalid_combinations_list_the_valid_ones(tiny):
    with pytest.raises(ValueError, match=r"refcocog/unc.*refcoco/unc: train\|val\|testA\|testB"):
        refer.Refer(tiny, "refcocog", "unc")
    r = refer.Refer(tiny, "refcoco", "unc")
    with pytest.raises(ValueError, match=r"unknown split 'test' for refcoco/unc; valid: .*umd"):
        r.refs("test")
    assert refer.VALID[("refcocog", "google")] == ("train", "val")


def test_cli_prints_counts(tiny, capsys):
    assert refer.main(["--root", str(tiny), "--dataset", "refcoco", "--split-by", "unc"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert rows["train"] == ["1", "2", "3"]
    assert rows["testA"] == ["1", "1", "3"]
    assert rows["total"] == ["4", "5", "8"]
    assert refer.main(["--root", str(tiny) + "-nope", "--dataset", "refcoco"]) == 2
