"""Export of the tiny trained student: ONNX (onnxruntime) and jax.export parity with the Flax
predict function on real inputs, a reload without rkd_jax, the sidecar, int8 and bad input.

Tolerances (float32 on CPU): probabilities within 1e-4 absolute and margins within 1e-3 of the
Flax predict function for ONNX (observed ~4e-7 / ~2e-6), 1e-5 / 1e-4 for jax.export (the same
computation with the weights folded in as constants: observed <= 4e-7); masks (prob >= threshold)
IoU >= 0.99 per example.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rkd_jax import evaluate as eval_lib
from rkd_jax import export
from rkd_jax.export import onnx as onnx_lib

pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
pytest.importorskip("jax2onnx", reason="the export extra (jax2onnx) is not installed")

PROB_ATOL = {"onnx": 1e-4, "jax": 1e-5}
MARGIN_ATOL = {"onnx": 1e-3, "jax": 1e-4}
PHOTOS = (("chelsea", "the cat"), ("coffee", "the cup on the saucer"), ("astronaut", "the man"))


@pytest.fixture(scope="module")
def student(tiny_run):
    return export.load_student(tiny_run)


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    info = {
        "onnx": export.export(tiny_run, out / "student.onnx", "onnx"),
        "jax": export.export(tiny_run, out / "student.jax", "jax"),
    }
    return out, info


@pytest.fixture(scope="module")
def real_inputs(student):
    """Three skimage photos squashed like the pipeline + 8 embedded val examples, one batch."""
    from PIL import Image
    from skimage import data

    from rkd_jax.data import pipeline

    _, _, meta, config = student
    size, max_tokens = meta["image_size"], meta["max_tokens"]
    tokenize, _, _ = export.tokenizer_for(meta["model"])
    images = [
        np.asarray(
            Image.fromarray(getattr(data, name)())
            .convert("RGB")
            .resize((size, size), Image.BILINEAR),
            np.float32,
        )
        / 255.0
        for name, _ in PHOTOS
    ]
    ids, mask = tokenize([s for _, s in PHOTOS], max_tokens)
    batches = pipeline.make_eval_iterator(config.data, tokenize, config.data.val_split, 8)
    batch = next(batches)
    batches.close()
    keep = batch["valid"]
    return (
        np.concatenate([np.stack(images), batch["image"][keep]]).astype(np.float32),
        np.concatenate([ids, batch["tokens"][keep]]).astype(np.int32),
        np.concatenate([mask, batch["token_mask"][keep]]).astype(np.int32),
    )


@pytest.fixture(scope="module")
def flax_reference(student, real_inputs):
    """The Flax predict function of rkd_jax.evaluate on the real inputs."""
    model, variables, _, config = student
    predict = eval_lib.make_predict_fn(model, float(config.run.threshold))
    out = predict(variables, *(jnp.asarray(x) for x in real_inputs))
    return np.asarray(out["prob"]), np.asarray(out["margin"])


def check_parity(fmt, prob, margin, ref_prob, ref_margin):
    assert prob.shape == ref_prob.shape and margin.shape == ref_margin.shape
    assert np.max(np.abs(prob - ref_prob)) <= PROB_ATOL[fmt]
    assert np.max(np.abs(margin - ref_margin)) <= MARGIN_ATOL[fmt]
    for i in range(len(prob)):
        assert export.margin_iou(prob[i] - 0.5, ref_prob[i] - 0.5) >= 0.99, i
    # Not a constant model: the comparison above must have had something to compare.
    assert np.std(ref_margin) > 1e-3


def test_onnx_parity_with_flax_on_real_inputs(exported, real_inputs, flax_reference):
    import onnxruntime as ort

    out, _ = exported
    sess = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image", "tokens", "token_mask"]
    assert [o.name for o in sess.get_outputs()] == ["prob", "margin"]
    feed = dict(zip(("image", "tokens", "token_mask"), real_inputs))
    prob, margin = sess.run(["prob", "margin"], feed)  # batch 11: the batch is dynamic
    check_parity("onnx", prob, margin, *flax_reference)
    one = {k: v[:1] for k, v in feed.items()}
    # Dense layers are MatMul nodes on initializer weights (what the int8 quantiser handles).
    import onnx

    graph = onnx.load(str(out / "student.onnx")).graph
    weights = {i.name for i in graph.initializer}
    on_weights = [n.op_type for n in graph.node if len(n.input) > 1 and n.input[1] in weights]
    assert "Einsum" not in on_weights and on_weights.count("MatMul") >= 10
    prob1, _ = sess.run(["prob", "margin"], one)
    np.testing.assert_allclose(prob1, prob[:1], atol=1e-5)


def test_jax_export_reloads_without_rkd_jax(exported, real_inputs, flax_reference, tmp_path):
    out, _ = exported
    np.savez(tmp_path / "inputs.npz", *real_inputs)
    script = textwrap.dedent(f"""
        import sys
        import jax
        import numpy as np

        exp = jax.export.deserialize(bytearray(open({str(out / "student.jax")!r}, "rb").read()))
        x = np.load({str(tmp_path / "inputs.npz")!r})
        prob, margin = exp.call(x["arr_0"], x["arr_1"], x["arr_2"])
        np.savez({str(tmp_path / "outputs.npz")!r}, prob=np.asarray(prob),
                 margin=np.asarray(margin))
        assert not any(m.startswith("rkd_jax") for m in sys.modules), "rkd_jax was imported"
        assert not any(m.startswith("flax") for m in sys.modules), "flax was imported"
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform" not in f
    )
    res = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    got = np.load(tmp_path / "outputs.npz")
    check_parity("jax", got["prob"], got["margin"], *flax_reference)


def test_parity_recorded_at_export(exported):
    _, info = exported
    for fmt in ("onnx", "jax"):
        par = info[fmt]["parity_at_export"]
        assert par["max_abs_prob_diff"] <= PROB_ATOL[fmt]
        assert par["mask_iou"] >= 0.99


def test_sidecar_has_what_a_user_needs(exported, student):
    from rkd_jax.data.tokenizer import tokenize

    out, _ = exported
    _, _, meta, _ = student
    side = json.loads((out / "student.onnx.json").read_text())
    assert side["format"] == "onnx" and side["role"] == "student" and side["batch"] == "dynamic"
    s, n = meta["image_size"], meta["max_tokens"]
    assert side["image"]["image_size"] == s and side["text"]["max_tokens"] == n
    assert side["image"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert side["image"]["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert "INSIDE" in side["image"]["normalisation"]
    assert side["threshold"] == 0.5
    assert [(i["name"], i["shape"], i["dtype"]) for i in side["inputs"]] == [
        ("image", ["B", s, s, 3], "float32"),
        ("tokens", ["B", n], "int32"),
        ("token_mask", ["B", n], "int32"),
    ]
    assert [(o["name"], o["shape"]) for o in side["outputs"]] == [
        ("prob", ["B", s, s]),
        ("margin", ["B", s // 4, s // 4]),
    ]
    assert json.loads((out / "student.jax.json").read_text())["format"] == "jax"
    # vocab.txt beside the model and the sidecar's recipe reproduce rkd_jax's tokens, also
    # when the expression is cut to max_tokens.
    from tokenizers import BertWordPieceTokenizer

    t = side["text"]
    tok = BertWordPieceTokenizer(str(out / t["vocab"]), lowercase=t["lower_case"])
    tok.enable_truncation(max_length=n)
    tok.enable_padding(length=n, pad_id=t["pad_id"])
    texts = ["The dog behind the bench", "the small red ball left of the big blue cube " * 3]
    encoded = tok.encode_batch(texts)
    ref_ids, ref_mask = tokenize(export.tokenizer_for(meta["model"])[1], texts, n)
    assert encoded[0].ids[:7] == [101, 1996, 3899, 2369, 1996, 6847, 102]
    assert [e.ids for e in encoded] == ref_ids.tolist()
    assert [e.attention_mask for e in encoded] == ref_mask.tolist()
    assert encoded[1].ids[-1] == t["sep_id"] and t["cls_id"] == 101


def test_teacher_checkpoint_is_refused(tiny_run, tmp_path, capsys):
    with pytest.raises(export.ExportError, match="teacher.*--allow-teacher"):
        export.export(tiny_run / "teacher", tmp_path / "t.jax", "jax")
    code = export.main(
        [
            "--checkpoint",
            str(tiny_run / "teacher"),
            "--format",
            "jax",
            "--out",
            str(tmp_path / "t.jax"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and "teacher" in err[0]
    assert not (tmp_path / "t.jax").exists()


def test_unsupported_operator_names_it_and_the_option():
    def min_pool(x):
        return jax.lax.reduce_window(x, jnp.inf, jax.lax.min, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    spec = [jax.ShapeDtypeStruct((1, 4, 4, 3), jnp.float32)]
    with pytest.raises(export.ExportError, match="'reduce_window_min'.*--format jax"):
        export.export_onnx(min_pool, spec)
    # The same function exports with jax.export.
    assert export.export_jax(min_pool, spec)


def test_nhwc_max_pool_replay_matches_lax():
    """The max pool rewrite (3-D window over [N*C, H, W]) equals the NHWC reduce_window."""
    x = np.random.default_rng(0).normal(size=(2, 7, 6, 3)).astype(np.float32)

    def pool(v):
        return jax.lax.reduce_window(
            v, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
        )

    closed = jax.make_jaxpr(pool)(x)
    replayed = onnx_lib._replay(closed.jaxpr, closed.consts, [x])[0]
    np.testing.assert_array_equal(np.asarray(replayed), np.asarray(pool(x)))


def test_int8_calibrates_on_training_images_only(
    exported, student, real_inputs, monkeypatch, tmp_path
):
    import onnxruntime as ort

    from rkd_jax.data import pipeline

    out, _ = exported
    _, _, meta, config = student
    tokenize, _, _ = export.tokenizer_for(meta["model"])

    def no_eval(*args, **kwargs):
        raise AssertionError("calibration read an evaluation split")

    monkeypatch.setattr(pipeline, "make_eval_iterator", no_eval)
    reader = export.TrainingImages(config, tokenize, num_examples=16, feed_batch=8)
    qpath = tmp_path / "student.int8.onnx"
    info = export.quantize_int8(out / "student.onnx", qpath, reader)
    assert info["calibration_examples"] == 16 and info["calibration_split"] == "train"
    import onnx

    graph = onnx.load(str(qpath)).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    # The text encoder stays float (the default): no product fed only by the tokens reads a
    # dequantised tensor, while the image path's convolutions do.
    dequantised = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    text = set(export.text_only_nodes(onnx.load(str(qpath))))
    products = [n for n in graph.node if n.op_type in ("MatMul", "Conv")]
    assert any(n.name in text for n in products)
    for n in products:
        assert any(i in dequantised for i in n.input) == (n.name not in text), n.name
    sess = ort.InferenceSession(str(qpath), providers=["CPUExecutionProvider"])
    feed = dict(zip(("image", "tokens", "token_mask"), real_inputs))
    _, margin = sess.run(["prob", "margin"], feed)
    ref = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    _, ref_margin = ref.run(["prob", "margin"], feed)
    # int8 is an approximation: close to the float model relative to the margins' spread.
    err = np.abs(margin - ref_margin).mean() / np.abs(ref_margin).mean()
    assert err < 0.2, err
