"""rkd_jax.load / Predictor: the eval numbers of the same checkpoint, inputs, bad inputs."""

import functools
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, tiny_config

import rkd_jax
from rkd_jax import evaluate
from rkd_jax.checkpoint import CheckpointError
from rkd_jax.inference import predictor as predictor_lib
from rkd_jax.inference.predictor import ExpressionTruncatedWarning, InputError

# pycocotools decoding the reference masks (numpy 2 deprecation, not ours).
REAL_LOAD = predictor_lib.load  # before any test replaces it
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@functools.cache
def cached_predictor(path: str):
    """One Predictor per checkpoint for the whole session (test_demo_visualize shares it)."""
    return REAL_LOAD(path)


def earliest_checkpoint(run: Path) -> Path:
    """checkpoints/<step> of the run's first kept step (the best and last is another one)."""
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    return run / "checkpoints" / str(steps[0])


def scored_sentences(split: str, limit: int) -> list[dict]:
    """The sentences evaluation scored: the first `limit` of the split, in file order (the
    order of the TFDS flat split, which is the REFER refs order, sentence by sentence)."""
    from rkd_jax.data import prepare, refer

    data = tiny_config().data
    root = prepare.ensure_synthetic(int(data.synthetic_seed), int(data.synthetic_num_images))
    r = refer.load_refer(root, data.dataset, data.split_by)
    out = []
    for ref in r.refs(split):
        for text in ref["sentences"]:
            out.append(
                {
                    "image": str(r.image_path(ref["image_id"])),
                    "text": text,
                    "mask": r.mask(ref["ann_id"]),
                }
            )
    return out[:limit]


@pytest.fixture(scope="module")
def student(tiny_run):
    return cached_predictor(str(tiny_run))


@pytest.fixture(scope="module")
def sample(tiny_run):
    return scored_sentences("val", 3)


# The tiny run's eval runs the predict function on batches of run.eval_batch_size, the
# predictor on its own batch: XLA compiles the two shapes into
# different float32 summation orders, and the CPU's kernels (AVX2 or AVX-512) change them again.
# Measured: the margins of two such compilations differ by at most ~4e-6 (the jax.export and
# ONNX parity in docs/export.md: 3.8e-6, 7.6e-6). A pixel whose margin is within MARGIN_NOISE of 0
# may fall on either side of the threshold; every other pixel must agree.
MARGIN_NOISE = 1e-4


class IoUBounds:
    """The lowest and highest metrics that masks `margin >= 0` can give when every pixel with
    |margin| < MARGIN_NOISE may fall on either side: IoUAccumulator of both extremes."""

    def __init__(self):
        self.low, self.high = evaluate.IoUAccumulator(), evaluate.IoUAccumulator()
        self.pixels = self.uncertain = 0

    def add(self, margin: np.ndarray, target: np.ndarray) -> None:
        target = target.astype(bool)
        sure = margin >= MARGIN_NOISE
        maybe = np.abs(margin) < MARGIN_NOISE
        inter, union = np.count_nonzero(sure & target), np.count_nonzero(sure | target)
        # Highest IoU: uncertain pixels on the object count as hits, the others stay out.
        self.high.add(inter + np.count_nonzero(maybe & target), union)
        # Lowest: uncertain pixels on the object missed, the others false positives.
        self.low.add(inter, union + np.count_nonzero(maybe & ~target))
        self.pixels += margin.size
        self.uncertain += np.count_nonzero(maybe)

    def check(self, want: dict, name: str) -> None:
        low, high = self.low.result(), self.high.result()
        assert low.keys() == high.keys() == want.keys()
        assert want["num_sentences"] == low["num_sentences"]
        for key, value in want.items():
            assert low[key] - 1e-12 <= value <= high[key] + 1e-12, (name, key, low, value, high)
        # The bounds mean something only while the uncertain pixels are few.
        assert self.uncertain <= 1e-3 * self.pixels, (name, self.uncertain, self.pixels)


@pytest.mark.parametrize("split", ["val", "testA"])
def test_predictor_reproduces_the_eval_numbers(tiny_run, student, split):
    from rkd_jax.data.pipeline import _resize_mask

    saved = json.loads((tiny_run / "results" / f"refcoco_{split}.json").read_text())
    limit = saved["protocol"]["max_eval_examples"]
    assert saved["checkpoint"].endswith(f"/{student.step}")
    items = scored_sentences(split, limit)
    assert len(items) == saved["metrics"]["original"]["num_sentences"] == limit

    images, texts = [i["image"] for i in items], [i["text"] for i in items]
    masks = student.predict(images, texts)
    margins = student.margins(images, texts)
    s = student.image_size
    net, orig = IoUBounds(), IoUBounds()
    for item, mask, (margin, hw) in zip(items, masks, margins):
        assert mask.dtype == bool and mask.shape == item["mask"].shape == hw
        full = evaluate.resize_margin(margin, *hw)
        np.testing.assert_array_equal(mask, full >= 0.0)  # predict is this margin, thresholded
        orig.add(full, item["mask"])
        net.add(evaluate.resize_margin(margin, s, s), _resize_mask(item["mask"], s))
    for name, bounds in (("original", orig), ("network", net)):
        bounds.check(saved["metrics"][name], name)
    # The comparison means something only if the model predicts some foreground.
    assert 0 < orig.high.result()["oIoU"] and any(m.any() for m in masks)


def test_predict_pairs_images_and_expressions(student, sample):
    path, h_w = sample[0]["image"], sample[0]["mask"].shape
    # The compiled function is shared by every predictor of this architecture (rkd_jax.evaluate
    # and export load the same tiny run with other batch sizes): count what this test adds.
    compiled_before = student._predict_fn._cache_size()
    one = student.predict(path, sample[0]["text"])
    compiled_after_first = student._predict_fn._cache_size()
    assert compiled_after_first <= compiled_before + 1
    assert isinstance(one, np.ndarray) and one.shape == h_w and one.dtype == bool
    several = student.predict(path, [sample[0]["text"], sample[1]["text"], "the star"])
    assert len(several) == 3 and all(m.shape == h_w for m in several)
    np.testing.assert_array_equal(several[0], one)
    paths = [x["image"] for x in sample]
    shared = student.predict(paths, "the star")
    assert [m.shape for m in shared] == [x["mask"].shape for x in sample]
    np.testing.assert_array_equal(shared[0], several[2])
    masks, probs = student.predict(paths, [x["text"] for x in sample], return_probs=True)
    for m, p in zip(masks, probs):
        assert p.dtype == np.float32 and p.shape == m.shape and 0 <= p.min() <= p.max() <= 1
        np.testing.assert_array_equal(m, p >= student.threshold)
    with pytest.raises(InputError, match="3 images but 2 expressions"):
        student.predict(paths, ["a", "b"])
    # Batches have one shape: any number of pairs reuses the one compiled function.
    student.predict(paths * 4, "the star")
    assert student._predict_fn._cache_size() == compiled_after_first


def test_numpy_images_uint8_float_grey_and_rgba(student):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(50, 90, 3), dtype=np.uint8)
    text = "the red circle"
    mask, prob = student.predict(rgb, text, return_probs=True)
    assert mask.shape == (50, 90)
    _, prob_f = student.predict(rgb.astype(np.float32) / 255, text, return_probs=True)
    np.testing.assert_array_equal(prob_f, prob)
    rgba = np.concatenate([rgb, np.full((50, 90, 1), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(student.predict(rgba, text), mask)
    grey = rgb[..., 0]
    np.testing.assert_array_equal(
        student.predict(grey, text), student.predict(np.stack([grey] * 3, axis=2), text)
    )
    with pytest.raises(InputError, match=r"must lie in \[0, 1\]"):
        student.predict(rgb.astype(np.float32), text)
    with pytest.raises(InputError, match="shape"):
        student.predict(np.zeros((4, 4, 2), np.uint8), text)


def test_file_and_expression_errors(student, sample, tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(InputError, match=f"{missing}: image file does not exist"):
        student.predict(str(missing), "the cup")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(InputError, match=f"{broken}: cannot read the image"):
        student.predict([sample[0]["image"], str(broken)], "the cup")
    for empty in ("", "   "):
        with pytest.raises(InputError, match="empty"):
            student.predict(sample[0]["image"], empty)
    with pytest.raises(InputError, match="expression 1 is empty"):
        student.predict(sample[0]["image"], ["the cup", ""])
    with pytest.raises(InputError, match="expected a string"):
        student.predict(sample[0]["image"], [3])


def test_overlong_expression_is_truncated_with_a_warning(student, sample):
    words = "the small red circle on the left of the big blue square next to the star"
    pieces = student.tokenizer.tokenize(words)
    assert len(pieces) + 2 > student.max_tokens
    with pytest.warns(ExpressionTruncatedWarning, match="truncated to 12") as record:
        long_mask = student.predict(sample[0]["image"], words)
    assert words in str(record[0].message)
    kept = student.tokenizer.convert_tokens_to_string(pieces[: student.max_tokens - 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(long_mask, student.predict(sample[0]["image"], kept))


def test_attention_taps(student, sample):
    item = sample[0]
    att = student.attention(item["image"], item["text"])
    n = len(student.tokenizer.tokenize(item["text"])) + 2
    assert att.tokens[0] == "[CLS]" and att.tokens[-1] == "[SEP]" and len(att.tokens) == n
    s = student.image_size
    assert [m.shape for m in att.maps] == [(s // k, s // k, n) for k in (8, 16, 32)]
    for m in att.maps:  # softmax over the real words of every pixel
        np.testing.assert_allclose(m.sum(axis=-1), 1.0, atol=1e-5)
    assert att.decoder.shape == ((s // 4) ** 2, student.model_config.fpn_dim)
    assert att.image_hw == item["mask"].shape
    ((margin, _),) = student.margins(item["image"], item["text"])
    np.testing.assert_allclose(att.margin, margin, atol=1e-4)


def test_load_teacher_and_every_path_form(tiny_run, student):
    from rkd_jax.checkpoint import find_checkpoint

    teacher = cached_predictor(str(tiny_run / "teacher"))
    assert teacher.role == "teacher" and student.role == "student"
    assert teacher.model_config.fusion_dim != student.model_config.fusion_dim
    step_dir = tiny_run / "checkpoints" / str(student.step)
    assert find_checkpoint(tiny_run / "checkpoints") == (step_dir.parent, student.step)
    assert find_checkpoint(step_dir) == (step_dir.parent, student.step)
    first = earliest_checkpoint(tiny_run)
    before = cached_predictor(str(first))
    assert (before.step, before.role) == (int(first.name), "student") and first.name != "0"
    assert before.step < student.step
    # One architecture, one compiled predict function per threshold.
    assert before.model == student.model and before._predict_fn is student._predict_fn
    p = predictor_lib.Predictor(
        student.config,
        student.model_config,
        "student",
        student.variables,
        student.meta,
        batch_size=2,
        threshold=0.7,
    )
    assert (p.batch_size, p.threshold) == (2, 0.7) and p._predict_fn is not student._predict_fn


def test_load_errors(tiny_run, tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        rkd_jax.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        rkd_jax.load(tmp_path / "empty")
    # A checkpoint whose config says teacher but whose variables are the student's.
    step = max(int(p.name) for p in (tiny_run / "checkpoints").iterdir() if p.name.isdigit())
    fake = tmp_path / "run" / "checkpoints" / str(step)
    shutil.copytree(tiny_run / "checkpoints" / str(step), fake)
    meta_file = fake / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta.update(role="teacher", model=meta["config"]["teacher"])
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="another architecture than the teacher") as e:
        rkd_jax.load(tmp_path / "run")
    assert "has shape" in str(e.value) and "\n" not in str(e.value)


def test_import_rkd_jax_stays_light():
    code = "import sys, rkd_jax; print(callable(rkd_jax.load), 'jax' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert out.stdout.split() == ["True", "False"], out.stderr
