"""docs/restore.md: its snippet restores the tiny run with orbax and the model classes only, and
predicts what `rkd_jax.load(...).predict` predicts."""

import re

import numpy as np
import pytest
from conftest import ROOT
from test_predictor import cached_predictor, scored_sentences

from rkd_jax import checkpoint as ckpt_lib

# pycocotools decoding the reference masks (numpy 2 deprecation, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def snippet() -> str:
    text = (ROOT / "docs" / "restore.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert len(blocks) == 1
    return blocks[0]


def test_restore_snippet_predicts_what_the_predictor_predicts(tiny_run):
    predictor = cached_predictor(str(tiny_run))
    items = scored_sentences("val", 16)
    masks = predictor.predict([i["image"] for i in items], [i["text"] for i in items])
    # A sentence whose mask is neither empty nor full, so that agreeing means something.
    k = next(k for k, m in enumerate(masks) if 0.01 < m.mean() < 0.99)
    item, expected = items[k], masks[k]

    code = snippet()
    for literal, value in (
        ('"runs/distill"', str(tiny_run)),
        ('"photo.jpg"', item["image"]),
        ('"the cup on the left"', item["text"]),
    ):
        assert code.count(literal) == 1, literal
        code = code.replace(literal, repr(value))
    # orbax, transformers' tokenizer and the Flax module classes: no rkd_jax helper.
    modules = set(re.findall(r"^\s*(?:from|import) (\S+)", code, re.MULTILINE))
    assert {m for m in modules if m.startswith("rkd_jax")} == {
        "rkd_jax.models.bert",
        "rkd_jax.models.segmenter",
    }
    namespace: dict = {}
    exec(compile(code, "docs/restore.md", "exec"), namespace)  # noqa: S102 (the doc's own code)

    directory, step = ckpt_lib.find_checkpoint(tiny_run)
    assert namespace["ckpt"] == directory / str(step) == directory / str(predictor.step)
    logits = np.asarray(namespace["out"]["logits"][0], np.float32)
    margin, hw = predictor.margins(item["image"], item["text"])[0]
    np.testing.assert_allclose(logits[..., 1] - logits[..., 0], margin, rtol=1e-4, atol=1e-4)
    mask = namespace["mask"]
    assert mask.dtype == bool and mask.shape == expected.shape == hw
    # Two bilinear resizes of one margin (XLA's and numpy's) may part on a pixel at the cut.
    assert np.mean(mask == expected) > 0.999
