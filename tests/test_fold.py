"""BatchNorm folding: the folded model's inference outputs equal the unfolded model's.

Tolerance: float32, rtol 1e-5 and atol 1e-5 x (largest magnitude of the output), on logits,
every vl_attention map and the decoder features D.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from rkd_jax.models import build
from rkd_jax.models.fold import fold_batch_norm, fold_conv_bn
from rkd_jax.models.resnet import ResNet

SIZE, TOKENS = 64, 12


def _random_variables(abstract, seed=1):
    """Random variables of the given shapes, with non-trivial running statistics and
    BatchNorm affine parameters (init would give mean 0, var 1, scale 1, bias 0)."""
    rng = np.random.default_rng(seed)

    def fill(path, x):
        names = jax.tree_util.keystr(path)
        if names.endswith("['var']"):
            return jnp.asarray(rng.uniform(0.3, 3.0, x.shape), x.dtype)
        if names.endswith("['scale']"):
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
        if jnp.issubdtype(x.dtype, jnp.integer):
            return jnp.zeros(x.shape, x.dtype)
        # Kernels at ~He scale so activations neither vanish nor blow up through the depth.
        fan_in = int(np.prod(x.shape[:-1])) if len(x.shape) > 1 else 1
        std = 0.5 if len(x.shape) == 1 else np.sqrt(1.0 / fan_in)
        return jnp.asarray(rng.normal(0.0, std, x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _inputs(batch=2):
    images = jax.random.uniform(jax.random.key(7), (batch, SIZE, SIZE, 3))
    tokens = jax.random.randint(jax.random.key(8), (batch, TOKENS), 1000, 2000)
    mask = jnp.ones((batch, TOKENS), jnp.int32).at[:, 8:].set(0)
    return images, tokens, mask


def _close(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=what)


def _model_cfg(name):
    c = load_config("distill", "tiny")
    if name == "tiny_teacher":
        return c.teacher
    if name == "tiny_student":
        return c.student
    if name == "bottleneck_small":  # the teacher's block kind (ResNet-50/101), narrow
        c.teacher.backbone = "resnet50"
        c.teacher.backbone_stage_sizes = (1, 2, 1, 1)
        return c.teacher
    c.student.backbone = name  # efficientnet_b0 (SE, SiLU) | efficientnet_lite0 (ReLU6)
    return c.student


@pytest.mark.parametrize("name", ["tiny_teacher", "bottleneck_small", "efficientnet_b0"])
def test_folded_segmenter_equals_unfolded(name):
    cfg = _model_cfg(name)
    model = build.build_model(cfg)
    variables = _random_variables(build.abstract_variables(model, SIZE, TOKENS))
    folded, folded_vars = fold_batch_norm(model, variables)

    assert folded.fold_bn and not model.fold_bn
    assert set(folded_vars) == {"params"}, "no batch_stats collection may be left"
    abstract = build.abstract_variables(folded, SIZE, TOKENS)
    assert jax.tree.structure(folded_vars) == jax.tree.structure(abstract)
    assert jax.tree.map(jnp.shape, folded_vars) == jax.tree.map(jnp.shape, abstract)
    # Only the convs a BatchNorm followed change; the text encoder and fusion are untouched.
    for part in ("text_encoder", "fusion_v3"):
        assert jax.tree.all(
            jax.tree.map(
                lambda a, b: bool(jnp.array_equal(a, b)),
                variables["params"][part],
                folded_vars["params"][part],
            )
        )

    args = _inputs()
    want = jax.jit(lambda v, *a: model.apply(v, *a, train=False))(variables, *args)
    got = jax.jit(lambda v, *a: folded.apply(v, *a, train=False))(folded_vars, *args)
    _close(got["logits"], want["logits"], "logits")
    _close(got["decoder"], want["decoder"], "decoder")
    assert len(got["vl_attention"]) == 3
    for i, (g, w) in enumerate(zip(got["vl_attention"], want["vl_attention"])):
        _close(g, w, f"vl_attention[{i}]")

    with pytest.raises(ValueError, match="inference-only"):
        folded.apply(folded_vars, *args, train=True)
    with pytest.raises(ValueError, match="already folded"):
        fold_batch_norm(folded, folded_vars)


def test_fold_conv_bn_by_hand():
    # 1x1 conv, 1 input channel, 2 outputs: y_c = w_c x, then BN per channel.
    kernel = jnp.array([[[[2.0, -1.0]]]])
    params = {"scale": jnp.array([3.0, 0.5]), "bias": jnp.array([1.0, -2.0])}
    stats = {"mean": jnp.array([4.0, 1.0]), "var": jnp.array([0.25, 4.0])}
    k, b = fold_conv_bn(kernel, params, stats, eps=0.0)
    # g = scale / sqrt(var) = [6, 0.25]; kernel' = [12, -0.25]; bias' = beta - mean g = [-23, -2.25]
    np.testing.assert_allclose(np.asarray(k).ravel(), [12.0, -0.25])
    np.testing.assert_allclose(np.asarray(b), [-23.0, -2.25])
    with pytest.raises(ValueError, match="3 output channels"):
        fold_conv_bn(jnp.ones((1, 1, 1, 3)), params, stats, eps=1e-5)


def test_folded_backbone_from_config_and_bad_input():
    backbone = ResNet(stage_sizes=(1, 1, 1, 1), block="bottleneck", width=8)
    x = jax.random.uniform(jax.random.key(3), (1, 32, 32, 3))
    variables = _random_variables(jax.eval_shape(backbone.init, jax.random.key(0), x))
    folded, folded_vars = fold_batch_norm(backbone, variables)
    want = backbone.apply(variables, x)
    got = folded.apply(folded_vars, x)
    for i, (g, w) in enumerate(zip(got, want)):
        _close(g, w, f"V{i + 1}")
    assert "bias" in folded_vars["params"]["layer1_0"]["downsample_conv"]
    assert "downsample_bn" not in folded_vars["params"]["layer1_0"]

    # A model config builds the Segmenter itself.
    cfg = _model_cfg("tiny_student")
    model = build.build_model(cfg)
    variables = _random_variables(build.abstract_variables(model, SIZE, TOKENS))
    folded, _ = fold_batch_norm(cfg, variables)
    assert folded.fold_bn and folded.backbone == cfg.backbone

    with pytest.raises(ValueError, match="'params'"):
        fold_batch_norm(model, {"batch_stats": variables["batch_stats"]})
    with pytest.raises(TypeError, match="cannot fold a Dense"):
        import flax.linen as nn

        fold_batch_norm(nn.Dense(3), {"params": {}})
