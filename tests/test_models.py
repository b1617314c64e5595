"""Segmenter taps and shapes, fusion masking, configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from rkd_jax import pretrained
from rkd_jax.models import build
from rkd_jax.models.bert import BertConfig
from rkd_jax.models.fusion import VLFusion, spatial_coordinates, vl_attention


@pytest.mark.parametrize("name", ["distill", "teacher", "student"])
@pytest.mark.parametrize("variant", ["", "tiny", "lite0", "paper", "paper_b0"])
def test_every_config_loads(name, variant):
    c = load_config(name, variant)
    assert c.mode == name
    for role in ("teacher", "student"):
        m = build.build_model(c[role], bert_config=BertConfig.base())
        assert m.fpn_dim == c[role].fpn_dim
    # distillation needs equal decoder widths (L_C compares C x C matrices)
    assert c.teacher.fpn_dim == c.student.fpn_dim


def test_unknown_variant_and_backbone_name_the_valid_ones():
    with pytest.raises(ValueError, match="paper"):
        load_config("distill", "papre")
    c = load_config("distill", "tiny")
    c.student.backbone = "resnet19"
    with pytest.raises(ValueError, match="resnet18.*resnet34|valid names"):
        build.build_model(c.student, bert_config=BertConfig.base())


@pytest.mark.parametrize("variant", ["paper", "paper_b0"])
def test_paper_shapes_at_384_and_20_tokens(variant):
    c = load_config("distill", variant)
    for role in ("teacher", "student"):
        m = build.build_model(c[role], bert_config=BertConfig.base())
        abstract = build.abstract_variables(m, 384, 20)
        out = jax.eval_shape(lambda v, m=m: m.apply(v, *build.dummy_inputs(384, 20, 2)), abstract)
        assert [a.shape for a in out["vl_attention"]] == [(2, 2304, 20), (2, 576, 20), (2, 144, 20)]
        assert out["decoder"].shape == (2, 9216, 256)
        assert out["logits"].shape == (2, 96, 96, 2)


def test_paper_parameter_counts():
    c = load_config("distill", "paper")
    counts = {}
    for role in ("teacher", "student"):
        m = build.build_model(c[role], bert_config=BertConfig.base())
        counts[role] = build.count_params(build.abstract_variables(m, 384, 20)["params"])
    # ResNet-101 42.50 M + BERT-base without pooler 108.89 M + fusion and FPN
    assert counts["teacher"] == pytest.approx(155.99e6, rel=1e-3)
    # ResNet-18 11.18 M + 4 BERT layers with embeddings 52.19 M + fusion and FPN
    assert counts["student"] == pytest.approx(65.84e6, rel=1e-3)


@pytest.mark.parametrize("norm", ["softmax", "none"])
def test_padding_tokens_get_zero_attention(norm):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 6, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    a = vl_attention(q, k, mask, norm)
    assert a.shape == (2, 6, 5)
    np.testing.assert_array_equal(np.asarray(a[0, :, 3:]), 0.0)
    assert np.all(np.abs(np.asarray(a[0, :, :3])) > 0)
    if norm == "softmax":
        np.testing.assert_allclose(np.asarray(a.sum(-1)), 1.0, rtol=1e-6)
    else:
        expected = np.einsum("bnc,blc->bnl", q, k) / np.sqrt(8)
        np.testing.assert_allclose(np.asarray(a[1]), expected[1], rtol=1e-5)


def test_fusion_ignores_padding_content():
    """Changing the features of padded words changes neither A nor V'."""
    rng = np.random.default_rng(1)
    v = jnp.asarray(rng.normal(size=(1, 4, 4, 6)), jnp.float32)
    t = rng.normal(size=(1, 5, 10)).astype(np.float32)
    mask = jnp.array([[1, 1, 0, 0, 0]])
    mod = VLFusion(dim=8)
    params = mod.init(jax.random.key(0), v, jnp.asarray(t), mask)
    out1, a1 = mod.apply(params, v, jnp.asarray(t), mask)
    t2 = t.copy()
    t2[:, 2:] = 100.0
    out2, a2 = mod.apply(params, v, jnp.asarray(t2), mask)
    np.testing.assert_allclose(np.asarray(out1), np.asarray(out2), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(a1), np.asarray(a2), rtol=1e-6, atol=1e-7)
    assert a1.shape == (1, 16, 5)


def test_init_leaves_out_what_pretrained_weights_replace():
    """The tiny student (offline MiniLM text encoder): the init that skips the replaced text
    encoder gives the converted weights there and, everywhere else, the full random init's
    values bit for bit. (The backbone's weights, with their BatchNorm statistics, are left out
    the same way: the Lite0 rows of tests/test_launch.py train from them.)"""
    from rkd_jax.convert.bert import load_bert

    c = load_config("distill", "tiny").student
    m = build.build_model(c)
    key = build.make_key(0)
    v = pretrained.init_variables(m, c, key, 64, 12)
    full = pretrained.init_variables(m, c, key, 64, 12, pretrained=False)
    _, text = load_bert(pretrained.resolve_text_encoder_dir(c.text_encoder_dir), c.text_num_layers)
    assert jax.tree.structure(v) == jax.tree.structure(full)
    for col in ("params", "batch_stats"):
        for name, tree in full[col].items():
            want = text if (col, name) == ("params", "text_encoder") else tree
            jax.tree.map(
                lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                v[col][name],
                want,
            )
    pairs = zip(
        jax.tree.leaves(v["params"]["text_encoder"]),
        jax.tree.leaves(full["params"]["text_encoder"]),
    )
    assert not any(np.array_equal(a, b) for a, b in pairs)  # the weights did replace the init


def test_tiny_segmenter_forward_and_text_cache_equivalence():
    """Precomputed text features give the same outputs as running the text encoder."""
    c = load_config("distill", "tiny")
    m = build.build_model(c.student)
    v = pretrained.init_variables(m, c.student, build.make_key(0), 64, 12)
    images = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
    tokens = jnp.array([[101, 1996, 3899, 102] + [0] * 8, [101, 2417, 102] + [0] * 9])
    mask = (tokens > 0).astype(jnp.int32)
    # Jitted: one compilation per call instead of one per operation.
    out = jax.jit(m.apply)(v, images, tokens, mask)
    assert out["logits"].shape == (2, 16, 16, 2)
    assert [a.shape for a in out["vl_attention"]] == [(2, 64, 12), (2, 16, 12), (2, 4, 12)]
    assert out["decoder"].shape == (2, 256, c.student.fpn_dim)
    text = jax.jit(lambda v, t, k: m.apply(v, t, k, method=m.encode_text))(v, tokens, mask)
    out2 = jax.jit(m.apply)(v, images, tokens, mask, text_features=text)
    np.testing.assert_allclose(np.asarray(out["logits"]), np.asarray(out2["logits"]), atol=1e-5)


def test_category_head_scores_the_visual_features_before_each_fusion():
    c = load_config("distill", "tiny")
    # Without the head: no scores among the outputs (their structure, traced, not computed).
    without = build.build_model(c.student)
    abstract = build.abstract_variables(without, 64, 12)
    assert "category_logits" not in jax.eval_shape(
        without.apply, abstract, *build.dummy_inputs(64, 12)
    )
    c.student.category_classes = 9
    m = build.build_model(c.student)
    v = pretrained.init_variables(m, c.student, build.make_key(0), 64, 12)
    assert sorted(k for k in v["params"] if k.startswith("category")) == [
        "category_v3",
        "category_v4",
        "category_v5",
    ]
    images = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
    tokens = jnp.array([[101, 1996, 3899, 102] + [0] * 8, [101, 2417, 102] + [0] * 9])
    mask = (tokens > 0).astype(jnp.int32)
    apply = jax.jit(m.apply)
    out = apply(v, images, tokens, mask)
    assert [x.shape for x in out["category_logits"]] == [(2, 8, 8, 9), (2, 4, 4, 9), (2, 2, 2, 9)]
    # V3's scores come before any language enters the network; V4's and V5's after V3's fusion.
    other = apply(v, images, tokens.at[:, 1].set(2417), mask)
    np.testing.assert_array_equal(
        np.asarray(out["category_logits"][0]), np.asarray(other["category_logits"][0])
    )
    assert not np.allclose(np.asarray(out["category_logits"][2]), other["category_logits"][2])
    assert build.architecture(c.student)["category_classes"] == 9


def test_spatial_coordinates_are_hu_et_al_cells():
    c = np.asarray(spatial_coordinates(2, 4))  # 2 rows, 4 columns
    assert c.shape == (8, 8)
    # Row-major: pixel 5 is row 1, column 1 -> x in [-0.5, 0], y in [0, 1].
    np.testing.assert_allclose(c[5], [-0.5, 0.0, 0.0, 1.0, -0.25, 0.5, 0.25, 0.5])
    np.testing.assert_allclose(c[0, :4], [-1, -1, -0.5, 0])
    np.testing.assert_allclose(c[7, :4], [0.5, 0, 1, 1])


def test_coord_map_lets_attention_depend_on_position_and_keeps_padding_rule():
    """Without coordinates, equal features at two positions get equal A; with them, not."""
    rng = np.random.default_rng(2)
    v = jnp.asarray(np.broadcast_to(rng.normal(size=(1, 1, 1, 6)), (1, 3, 3, 6)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(1, 4, 10)), jnp.float32)
    mask = jnp.array([[1, 1, 1, 0]])
    for coord_map in (False, True):
        mod = VLFusion(dim=8, coord_map=coord_map)
        params = mod.init(jax.random.key(0), v, t, mask)
        out, a = mod.apply(params, v, t, mask)
        a = np.asarray(a)
        spread = np.abs(a - a[:, :1]).max()
        assert (spread > 1e-3) == coord_map, (coord_map, spread)
        np.testing.assert_array_equal(a[..., 3], 0.0)  # padded word: zero weight either way
        np.testing.assert_allclose(a[..., :3].sum(-1), 1.0, rtol=1e-5)
        assert out.shape == v.shape


def test_multiply_fusion_scales_v_where_add_shifts_it():
    rng = np.random.default_rng(3)
    v = jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(2, 5, 10)), jnp.float32)
    mask = jnp.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    add, mul = VLFusion(dim=8, mode="add"), VLFusion(dim=8, mode="multiply")
    params = add.init(jax.random.key(0), v, t, mask)  # same parameters for both modes
    out_add, a_add = add.apply(params, v, t, mask)
    out_mul, a_mul = mul.apply(params, v, t, mask)
    np.testing.assert_array_equal(np.asarray(a_add), np.asarray(a_mul))  # A is the same
    delta = out_add - v
    np.testing.assert_allclose(np.asarray(out_mul), np.asarray(v * (1 + delta)), rtol=1e-6)
    # A zero visual feature stays zero under multiply whatever the expression says.
    out0, _ = mul.apply(params, jnp.zeros_like(v), t, mask)
    np.testing.assert_array_equal(np.asarray(out0), 0.0)
    with pytest.raises(ValueError, match="multiply"):
        VLFusion(dim=8, mode="concat").init(jax.random.key(0), v, t, mask)


def test_old_configs_without_the_new_fields_build_the_papers_fusion():
    c = load_config("distill", "tiny")
    old = c.student.copy_and_resolve_references()
    del old["coord_map"]
    del old["fusion_mode"]
    del old["category_classes"]
    m = build.build_model(old, bert_config=BertConfig.base())
    assert (m.coord_map, m.fusion_mode, m.category_classes) == (False, "add", 0)
    assert build.architecture(old)["coord_map"] is False
    assert build.architecture(old)["fusion_mode"] == "add"
