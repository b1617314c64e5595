"""The generated RefCOCO-style dataset: REFER layout, determinism, splits, grammar, learnability."""

import json
import os
import pickle

import numpy as np
import pytest

from rkd_jax.data import refer, synthetic

NUM_IMAGES = 40


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    summary = synthetic.generate(root, seed=3, num_images=NUM_IMAGES, eval_fraction=0.15, workers=1)
    return root, summary


def _load(root, variant):
    with open(root / variant / "instances.json") as f:
        instances = json.load(f)
    with open(root / variant / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)  # our own file, written by the test fixture
    return instances, refs


def test_refer_layout_and_fields(generated):
    root, _ = generated
    image_dir = root / "images" / "mscoco" / "images" / "train2014"
    assert len(list(image_dir.glob("COCO_train2014_*.jpg"))) == NUM_IMAGES
    for variant in ("refcoco", "refcoco+"):
        instances, refs = _load(root, variant)
        assert {"images", "annotations", "categories"} <= set(instances)
        assert {"id", "file_name", "height", "width"} <= set(instances["images"][0])
        for ann in instances["annotations"]:
            assert {"id", "image_id", "category_id", "segmentation", "area", "bbox"} <= set(ann)
            # The original REFER API only handles polygon lists (it indexes segmentation[0]).
            assert isinstance(ann["segmentation"], list) and ann["segmentation"]
            assert all(isinstance(p, list) and len(p) >= 6 for p in ann["segmentation"])
        keys = {
            "ref_id",
            "ann_id",
            "image_id",
            "split",
            "sentences",
            "category_id",
            "sent_ids",
            "file_name",
        }
        for ref in refs:
            assert keys <= set(ref)
            for s in ref["sentences"]:
                assert set(s) == {"tokens", "raw", "sent_id", "sent"}
                assert s["tokens"] == s["sent"].split()
            assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
            # REFER-derived loaders find the image by dropping the file name's last field.
            image_file = "_".join(ref["file_name"].split("_")[:-1]) + ".jpg"
            assert (image_dir / image_file).is_file()


def test_original_refer_mask_recipe_agrees(generated):
    """The original getMask sums the decoded parts; our parts never overlap, so it agrees."""
    from pycocotools import mask as mask_utils

    root, _ = generated
    instances, refs = _load(root, "refcoco")
    ours = refer.Refer(root, "refcoco", "unc")
    anns = {a["id"]: a for a in instances["annotations"]}
    images = {im["id"]: im for im in instances["images"]}
    for ref in refs:
        ann, im = anns[ref["ann_id"]], images[ref["image_id"]]
        rle = mask_utils.frPyObjects(ann["segmentation"], im["height"], im["width"])
        summed = np.sum(mask_utils.decode(rle), axis=2).astype(np.uint8)
        np.testing.assert_array_equal(summed, ours.mask(ref["ann_id"]))
    assert ours.mask(refs[0]["ann_id"]).sum() > 50


def test_deterministic_from_the_seed(tmp_path):
    def files(root):
        out = {}
        for dirpath, _, names in os.walk(root):
            for n in names:
                p = os.path.join(dirpath, n)
                with open(p, "rb") as f:
                    out[os.path.relpath(p, root)] = f.read()
        return out

    synthetic.generate(tmp_path / "a", seed=7, num_images=6, workers=1)
    synthetic.generate(tmp_path / "b", seed=7, num_images=6, workers=1)
    synthetic.generate(tmp_path / "c", seed=8, num_images=6, workers=1)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_splits_disjoint_and_test_groups(generated):
    root, summary = generated
    round_ids = {c.id for c in synthetic.CATEGORIES if c.group == "round"}
    for variant in ("refcoco", "refcoco+"):
        r = refer.Refer(root, variant, "unc")
        images = {s: {x["image_id"] for x in r.refs(s)} for s in synthetic.SPLITS}
        for i, a in enumerate(synthetic.SPLITS):
            assert images[a], (variant, a)
            for b in synthetic.SPLITS[i + 1 :]:
                assert not images[a] & images[b], (variant, a, b)
        # As RefCOCO's testA (people) / testB (objects): two disjoint groups of categories.
        assert {x["category_id"] for x in r.refs("testA")} <= round_ids
        assert not {x["category_id"] for x in r.refs("testB")} & round_ids
        train_categories = {x["category_id"] for x in r.refs("train")}
        assert train_categories & round_ids and train_categories - round_ids
        for s in synthetic.SPLITS:
            assert summary["variants"][variant]["splits"][s] == r.counts(s)


def test_same_category_distractors(generated):
    root, _ = generated
    r = refer.Refer(root, "refcoco", "unc")
    by_image = {}
    for s in synthetic.SPLITS:
        for x in r.refs(s):
            by_image.setdefault(x["image_id"], []).append(x)
    for image_id, refs in by_image.items():
        cats = [a["category_id"] for a in r.image_annotations(image_id)]
        assert 3 <= len(cats) <= 6
        # Some referred object shares its category with another object of the image.
        assert any(cats.count(x["category_id"]) >= 2 for x in refs), image_id


def test_refcoco_plus_has_no_location_words(generated):
    root, summary = generated
    found = {}
    for variant in ("refcoco", "refcoco+"):
        r = refer.Refer(root, variant, "unc")
        words = {
            w
            for s in synthetic.SPLITS
            for x in r.refs(s)
            for t in x["sentences"]
            for w in t.split()
        }
        found[variant] = words & synthetic.LOCATION_WORDS
    assert found["refcoco+"] == set()
    assert {"left", "right", "closest", "behind"} & found["refcoco"]  # the check can fail
    assert "location" not in summary["variants"]["refcoco+"]["families"]
    fams = summary["variants"]["refcoco"]["families"]
    assert {"location", "colour_shape", "relation", "size"} <= set(fams)


def test_grammar_round_trip():
    q = synthetic.parse_expression("the big red circle closest to the blue star")
    assert q.shape == "circle" and q.colour == "red" and q.size == "big"
    assert q.rel[0] == "closest" and q.rel[1] == synthetic.Query(shape="star", colour="blue")
    q = synthetic.parse_expression("a moon partly hidden by the white box")
    assert q.shape == "crescent" and q.rel == ("behind", synthetic.Query("square", "white"))
    scene = [
        synthetic.SceneObject("circle", "red", 10, (20, 50)),
        synthetic.SceneObject("circle", "red", 20, (80, 50)),
        synthetic.SceneObject("star", "blue", 12, (95, 20), occluded_by=frozenset({1})),
    ]
    assert synthetic.resolve(synthetic.parse_expression("the left circle"), scene) == 0
    assert synthetic.resolve(synthetic.parse_expression("bigger ball"), scene) == 1
    assert synthetic.resolve(synthetic.parse_expression("circle next to the star"), scene) == 1
    assert (
        synthetic.resolve(synthetic.parse_expression("the star behind the big circle"), scene) == 2
    )
    assert synthetic.resolve(synthetic.parse_expression("the red circle"), scene) is None


def test_language_blind_far_below_the_grammar_oracle(generated):
    """Only the expression picks the target: 'largest object' and 'random object' fail."""
    root, _ = generated
    rng = np.random.default_rng(0)
    for variant in ("refcoco", "refcoco+"):
        r = refer.Refer(root, variant, "unc")
        scores = {"oracle": [], "largest": [], "random": []}
        for s in synthetic.SPLITS:
            for x in r.refs(s):
                gt = r.mask(x["ann_id"]).astype(bool)
                anns = r.image_annotations(x["image_id"])

                def iou(ann_id, gt=gt, r=r):
                    if ann_id is None:
                        return 0.0
                    m = r.mask(ann_id).astype(bool)
                    return (m & gt).sum() / (m | gt).sum()

                largest = max(anns, key=lambda a: a["area"])["id"]
                for sentence in x["sentences"]:
                    scores["oracle"].append(iou(synthetic.oracle_predict(sentence, anns)))
                    scores["largest"].append(iou(largest))
                    scores["random"].append(iou(anns[rng.integers(len(anns))]["id"]))
        miou = {k: float(np.mean(v)) for k, v in scores.items()}
        assert len(scores["oracle"]) > 150
        assert miou["oracle"] > 0.99, (variant, miou)
        assert miou["largest"] < 0.45 and miou["random"] < 0.45, (variant, miou)


def test_cli(tmp_path, capsys):
    assert synthetic.main(["--out", str(tmp_path / "cli"), "--num-images", "5", "--seed", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    r = refer.Refer(tmp_path / "cli", "refcoco+", "unc")
    assert sum(r.counts(s)["images"] for s in synthetic.SPLITS) <= 5
    with pytest.raises(ValueError, match="num_images=3"):
        synthetic.generate(tmp_path / "x", num_images=3)
