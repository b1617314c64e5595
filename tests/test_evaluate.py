"""The evaluation protocol: IoU metrics, the logit resize, both resolutions, the predict fn."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rkd_jax import evaluate
from rkd_jax.evaluate import PRECISION_THRESHOLDS, IoUAccumulator, intersection_union


def box(shape, top, left, bottom, right):
    m = np.zeros(shape, np.uint8)
    m[top:bottom, left:right] = 1
    return m


def test_intersection_union_of_hand_made_masks():
    pred = box((6, 8), 1, 1, 4, 5)  # 3 x 4 = 12 pixels
    target = box((6, 8), 2, 3, 6, 8)  # 4 x 5 = 20 pixels; overlap rows 2-3, cols 3-4
    assert intersection_union(pred, target) == (4, 28)
    assert intersection_union(pred, pred) == (12, 12)
    # Non-binary inputs count as foreground wherever they are non-zero.
    assert intersection_union(pred * 255, target.astype(np.int32) * 7) == (4, 28)
    empty = np.zeros((6, 8), bool)
    assert intersection_union(empty, target) == (0, 20)
    assert intersection_union(pred, empty) == (0, 12)
    assert intersection_union(empty, empty) == (0, 0)


def test_accumulator_on_hand_made_sentences():
    shape = (10, 10)
    empty = np.zeros(shape, np.uint8)
    target = box(shape, 0, 0, 2, 5)  # 10 pixels
    sentences = [
        (box(shape, 0, 0, 2, 4), target),  # I 8, U 10 -> 0.8 (exactly at P@0.8)
        (box(shape, 0, 0, 1, 5), target),  # I 5, U 10 -> 0.5 (exactly at P@0.5)
        (box(shape, 0, 0, 2, 10), target),  # I 10, U 20 -> 0.5
        (empty, target),  # empty prediction: I 0, U 10 -> 0
        (box(shape, 5, 5, 7, 7), empty),  # empty target: I 0, U 4 -> 0
        (empty, empty),  # both empty: U 0, counts as IoU 1
    ]
    acc = IoUAccumulator()
    for pred, tgt in sentences:
        acc.add(*intersection_union(pred, tgt))
    r = acc.result()
    ious = [0.8, 0.5, 0.5, 0.0, 0.0, 1.0]
    assert r["num_sentences"] == 6
    assert r["mIoU"] == pytest.approx(sum(ious) / 6)
    assert r["oIoU"] == pytest.approx((8 + 5 + 10) / (10 + 10 + 20 + 10 + 4 + 0))
    assert r["P@0.5"] == pytest.approx(4 / 6)
    assert r["P@0.6"] == pytest.approx(2 / 6)
    assert r["P@0.7"] == pytest.approx(2 / 6)
    assert r["P@0.8"] == pytest.approx(2 / 6)
    assert r["P@0.9"] == pytest.approx(1 / 6)
    assert set(r) == {"mIoU", "oIoU", "num_sentences"} | {f"P@{t}" for t in PRECISION_THRESHOLDS}


def test_accumulator_empty_cases():
    r = IoUAccumulator().result()
    assert r["num_sentences"] == 0 and math.isnan(r["mIoU"]) and math.isnan(r["oIoU"])
    # Only both-empty sentences: mIoU 1 (each counts as a perfect answer), oIoU undefined.
    acc = IoUAccumulator()
    acc.add(0, 0)
    acc.add(0, 0)
    r = acc.result()
    assert r["mIoU"] == 1.0 and r["P@0.9"] == 1.0 and math.isnan(r["oIoU"])


def test_accumulator_merge_of_sums_equals_one_pass():
    a, b, both = IoUAccumulator(), IoUAccumulator(), IoUAccumulator()
    for i, (inter, union) in enumerate([(3, 4), (0, 7), (5, 5), (0, 0), (2, 9)]):
        (a if i % 2 else b).add(inter, union)
        both.add(inter, union)
    a.sums += b.sums  # what _merge_processes does with the other processes' sums
    assert a.result() == both.result()


def test_metrics_match_independent_numpy_on_random_masks():
    rng = np.random.default_rng(0)
    acc = IoUAccumulator()
    inter, union, ious = [], [], []
    for k in range(60):
        h, w = rng.integers(1, 40, size=2)
        density_p, density_t = rng.choice([0.0, 0.05, 0.3, 0.7, 1.0], size=2)
        pred = rng.random((h, w)) < density_p
        target = rng.random((h, w)) < density_t
        if k % 7 == 0:
            target = pred.copy()  # some perfect answers, so P@0.9 is not trivially 0
        acc.add(*intersection_union(pred, target))
        i = np.logical_and(pred, target).sum()
        u = np.logical_or(pred, target).sum()
        inter.append(i)
        union.append(u)
        ious.append(1.0 if u == 0 else i / u)
    ious = np.array(ious)
    r = acc.result()
    assert r["num_sentences"] == 60
    np.testing.assert_allclose(r["mIoU"], ious.mean(), rtol=1e-12)
    np.testing.assert_allclose(r["oIoU"], np.sum(inter) / np.sum(union), rtol=1e-12)
    for t in PRECISION_THRESHOLDS:
        np.testing.assert_allclose(r[f"P@{t}"], np.mean(ious >= t), rtol=1e-12)
    assert 0 < r["P@0.9"] < 1 and 0 < r["P@0.5"]


@pytest.mark.parametrize(
    "src, dst",
    [
        ((16, 16), (64, 64)),
        ((4, 4), (37, 53)),
        ((24, 24), (384, 500)),
        ((1, 1), (5, 7)),
        ((6, 9), (20, 31)),
        ((24, 24), (96, 96)),
        # An original image smaller than the stride-4 map on one side: downsampling that axis.
        ((24, 24), (10, 7)),
        ((9, 4), (3, 11)),
    ],
)
def test_resize_margin_equals_jax_bilinear_resize(src, dst):
    margin = np.random.default_rng(sum(src + dst)).normal(size=src).astype(np.float32)
    ours = evaluate.resize_margin(margin, *dst)
    ref = np.asarray(jax.image.resize(jnp.asarray(margin), dst, "bilinear", antialias=False))
    assert ours.shape == dst and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_resize_margin_identity_and_bilinear_matrix_rows_sum_to_one():
    margin = np.random.default_rng(1).normal(size=(7, 5)).astype(np.float32)
    np.testing.assert_allclose(evaluate.resize_margin(margin, 7, 5), margin, atol=1e-6)
    for out, inp in [(5, 3), (384, 24), (3, 10)]:
        np.testing.assert_allclose(evaluate.bilinear_matrix(out, inp).sum(axis=1), 1.0, atol=1e-6)


def eval_batch(rng, b, size, valid, orig_sizes=None):
    """An evaluation batch as pipeline.make_eval_iterator yields it."""
    mask = (rng.random((b, size, size)) < 0.3).astype(np.int32)
    if orig_sizes is None:
        orig = [m.astype(np.uint8) if v else None for m, v in zip(mask, valid)]
    else:
        orig = [
            (rng.random(hw) < 0.3).astype(np.uint8) if v else None
            for hw, v in zip(orig_sizes, valid)
        ]
    return {"mask": mask, "orig_mask": orig, "valid": np.asarray(valid)}


def test_original_resolution_equals_network_resolution_at_network_size():
    rng = np.random.default_rng(2)
    size = 32
    batch = eval_batch(rng, 6, size, [True] * 5 + [False])
    margins = rng.normal(size=(6, size // 4, size // 4)).astype(np.float32)
    for threshold in (0.5, 0.3, 0.8):
        net, orig = IoUAccumulator(), IoUAccumulator()
        evaluate.score_batch(margins, batch, threshold, net, orig)
        np.testing.assert_array_equal(net.sums, orig.sums)
        assert net.result()["num_sentences"] == 5  # the padding row is not scored
        assert 0 < net.result()["mIoU"] < 1


def test_original_resolution_scores_logits_resized_to_each_image():
    rng = np.random.default_rng(3)
    sizes = [(40, 70), (33, 21), (16, 16)]
    batch = eval_batch(rng, 4, 16, [True, True, True, False], sizes + [None])
    margins = rng.normal(size=(4, 4, 4)).astype(np.float32)
    net, orig = IoUAccumulator(), IoUAccumulator()
    evaluate.score_batch(margins, batch, 0.6, net, orig)
    want = IoUAccumulator()
    for i, hw in enumerate(sizes):
        big = np.asarray(jax.image.resize(jnp.asarray(margins[i]), hw, "bilinear", antialias=False))
        # Logits are resized, then thresholded at logit(0.6), i.e. probability >= 0.6.
        want.add(*intersection_union(jax.nn.sigmoid(big) >= 0.6, batch["orig_mask"][i]))
    np.testing.assert_allclose(orig.sums, want.sums)


class FakeModel:
    """Stands in for a Segmenter: its logits come from the variables."""

    def apply(self, variables, images, tokens, token_mask, train=False):
        assert train is False
        return {"logits": variables["logits"] + 0.0 * images[:, ::4, ::4, :2]}


def test_make_predict_fn_resizes_logits_before_the_threshold():
    rng = np.random.default_rng(4)
    b, s = 3, 32
    logits = rng.normal(size=(b, s // 4, s // 4, 2)).astype(np.float32)
    images = np.zeros((b, s, s, 3), np.float32)
    tokens = np.zeros((b, 5), np.int32)
    for threshold in (0.5, 0.7):
        predict = evaluate.make_predict_fn(FakeModel(), threshold)
        out = predict({"logits": logits}, images, tokens, tokens)
        margin = logits[..., 1] - logits[..., 0]
        np.testing.assert_allclose(out["margin"], margin, atol=1e-6)
        assert out["prob"].shape == (b, s, s) and out["mask"].dtype == jnp.bool_
        cut = math.log(threshold / (1 - threshold))
        for i in range(b):
            big = evaluate.resize_margin(margin[i], s, s)
            np.testing.assert_allclose(out["prob"][i], 1 / (1 + np.exp(-big)), atol=1e-5)
            agree = np.asarray(out["mask"][i]) == (big >= cut)
            assert agree.all() or np.all(np.abs(big[~agree] - cut) < 1e-4)
        # A fixed batch shape compiles once, however many calls.
        predict({"logits": logits + 1}, images, tokens, tokens)
        assert predict._cache_size() == 1


def test_evaluate_batches_scores_every_valid_row_once():
    rng = np.random.default_rng(5)
    s = 16
    batches = [eval_batch(rng, 4, s, [True] * 4), eval_batch(rng, 4, s, [True, True, False, False])]
    margins = [rng.normal(size=(4, s // 4, s // 4)).astype(np.float32) for _ in batches]
    for b, m in zip(batches, margins):
        b["image"] = np.zeros((4, s, s, 3), np.float32)
        b["tokens"] = b["token_mask"] = np.zeros((4, 3), np.int32)
    calls = []

    def predict(variables, images, tokens, token_mask):
        calls.append(images.shape)
        return {"margin": jnp.asarray(pending.pop(0))}

    pending = list(margins)
    res = evaluate.evaluate_batches(predict, None, iter(batches), lambda b: b, 0.5, total=6)
    want_net, want_orig = IoUAccumulator(), IoUAccumulator()
    for b, m in zip(batches, margins):
        evaluate.score_batch(m, b, 0.5, want_net, want_orig)
    assert calls == [(4, s, s, 3)] * 2
    assert res["network"] == want_net.result() and res["original"] == want_orig.result()
    assert res["network"]["num_sentences"] == 6


def test_protocol_names_every_setting():
    from conftest import tiny_config

    config = tiny_config()
    p = evaluate.protocol(config, "val", 42, {"sentences": 16})
    assert p["split"] == "val" and p["checkpoint_step"] == 42
    assert p["threshold"] == config.run.threshold and p["image_size"] == 64
    assert p["counts"] == {"sentences": 16}
    assert "both empty" in p["empty_union"]
    assert set(p["resolutions"]) == {"network", "original"}
    assert "squash" in p["resize"]


def test_per_family_scores_on_a_hand_built_set():
    """Each sentence's IoU goes to its family; a family's mIoU is the mean over its sentences."""
    shape = (8, 8)
    target = box(shape, 0, 0, 4, 4)  # 16 pixels
    # sentence_id -> family; row r uses sentence_ids[r].
    families = ["colour_only", "location", "location", "relation"]
    preds = [
        box(shape, 0, 0, 4, 4),  # colour_only: IoU 1
        box(shape, 0, 0, 2, 4),  # location: I 8, U 16 -> 0.5
        np.zeros(shape, np.uint8),  # location: 0
        box(shape, 0, 0, 4, 2),  # relation: 0.5
        box(shape, 4, 4, 8, 8),  # location (sentence 1 again): 0
    ]
    sentence_ids = np.array([0, 1, 2, 3, 1], np.int32)
    groups = evaluate.GroupedIoU(families)
    for pred, sid in zip(preds, sentence_ids):
        groups.add(sid, *intersection_union(pred, target))
    r = groups.result()
    assert set(r) == {"colour_only", "location", "relation"}
    assert r["colour_only"]["mIoU"] == 1.0 and r["colour_only"]["num_sentences"] == 1
    assert r["location"]["mIoU"] == pytest.approx(0.5 / 3) and r["location"]["num_sentences"] == 3
    assert r["relation"]["mIoU"] == pytest.approx(0.5)


def test_evaluate_batches_reports_families_that_partition_the_split():
    rng = np.random.default_rng(7)
    s = 16
    batches = [eval_batch(rng, 4, s, [True] * 4), eval_batch(rng, 4, s, [True, True, False, False])]
    for k, b in enumerate(batches):
        b["image"] = np.zeros((4, s, s, 3), np.float32)
        b["tokens"] = b["token_mask"] = np.zeros((4, 3), np.int32)
        b["sentence_id"] = np.array([0, 1, 2, 3], np.int32) if k == 0 else np.array([3, 0, 1, 1])
    margins = [rng.normal(size=(4, s // 4, s // 4)).astype(np.float32) for _ in batches]
    pending = list(margins)
    families = ["size", "size", "relation", "colour_only"]
    res = evaluate.evaluate_batches(
        lambda *a: {"margin": jnp.asarray(pending.pop(0))},
        None,
        iter(batches),
        lambda b: b,
        0.5,
        families=families,
    )
    fam = res["families"]
    # Sentences scored: ids 0,1,2,3 then 3,0 (padding rows excluded).
    assert {k: v["num_sentences"] for k, v in fam.items()} == {
        "size": 3,
        "relation": 1,
        "colour_only": 2,
    }
    n = res["network"]["num_sentences"]
    assert sum(v["num_sentences"] for v in fam.values()) == n == 6
    weighted = sum(v["mIoU"] * v["num_sentences"] for v in fam.values()) / n
    assert weighted == pytest.approx(res["network"]["mIoU"])


def test_embedded_expression_families_are_the_generators():
    from rkd_jax.data import synthetic

    seen = set()
    for i in range(12):
        r = synthetic.make_image(0, i, "val")
        for _, sents in r["refs"]["refcoco"]:
            for family, sent in sents:
                assert synthetic.expression_family(sent) == family, sent
                seen.add(family)
    assert len(seen) >= 4


def test_results_files_carry_split_counts_and_family_scores(tiny_run):
    """The protocol of every results file counts its split; the embedded data's results score
    each expression family, and the families partition the split's sentences."""
    import json

    from conftest import tiny_config

    from rkd_jax.data import pipeline

    config = tiny_config()
    res = json.loads((tiny_run / "results" / "refcoco_val.json").read_text())
    counts = res["protocol"]["counts"]
    assert counts["sentences"] == pipeline.num_eval_examples(config.data, "val")
    assert 0 < counts["objects"] <= counts["sentences"]
    assert counts["unique_sentences"] <= counts["sentences"]
    fam = res["metrics"]["families"]
    assert set(fam) <= {"location", "colour_shape", "relation", "size", "shape_only", "colour_only"}
    scored = res["metrics"]["network"]["num_sentences"]
    assert sum(v["num_sentences"] for v in fam.values()) == scored
