"""The CPU depthwise convolution (shifted taps with a hand-written gradient) against XLA's
grouped convolution: outputs, both gradients, parameters, and the export switch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from rkd_jax.models import layers as depthwise


@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (5, 1), (5, 2)])
@pytest.mark.parametrize("size", [(12, 12), (11, 14)])  # even and odd: TF 'SAME' padding sides
def test_taps_match_grouped_conv_values_and_gradients(k, stride, size):
    rng = np.random.default_rng(k * 10 + stride)
    x = jnp.asarray(rng.standard_normal((3, *size, 40)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, 40)), jnp.float32)
    ct = jnp.asarray(
        rng.standard_normal(depthwise.depthwise_native(x, w, stride).shape), jnp.float32
    )

    def outputs_and_gradients(f):
        # Jitted (as in the models): one compilation instead of one per operation.
        @jax.jit
        def run(x, w):
            y, vjp = jax.vjp(lambda x, w: f(x, w, stride), x, w)
            return y, vjp(ct)

        return run(x, w)

    y_taps, (gx, gw) = outputs_and_gradients(depthwise.depthwise_taps)
    y_ref, (rx, rw) = outputs_and_gradients(depthwise.depthwise_native)
    assert y_taps.shape == y_ref.shape
    np.testing.assert_allclose(y_taps, y_ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(gx, rx, atol=2e-5, rtol=1e-5)
    # d/dw sums 3 * H * W products per tap: a looser absolute tolerance.
    np.testing.assert_allclose(gw, rw, atol=1e-3, rtol=1e-5)


def test_module_has_nn_conv_parameters_and_export_switch():
    """Same parameter tree and values as nn.Conv(feature_group_count=C) under the same key, so
    checkpoints, torch weight import and BatchNorm folding see no difference; inside
    native_depthwise() the traced program is one grouped conv again (what export uses)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 10, 10, 24)), jnp.float32)
    ours = depthwise.DepthwiseConv(24, 3, 2, use_bias=True)
    ref = nn.Conv(24, (3, 3), strides=(2, 2), padding="SAME", feature_group_count=24)
    v_ours = ours.init(jax.random.key(1), x)
    v_ref = ref.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, v_ours) == jax.tree.map(jnp.shape, v_ref)
    np.testing.assert_array_equal(v_ours["params"]["kernel"], v_ref["params"]["kernel"])
    v_ref = {
        "params": {
            "kernel": v_ref["params"]["kernel"],
            "bias": jnp.linspace(-1, 1, 24, dtype=jnp.float32),
        }
    }
    np.testing.assert_allclose(ours.apply(v_ref, x), ref.apply(v_ref, x), atol=2e-5)

    apply = jax.jit(lambda x: ours.apply(v_ref, x))
    assert depthwise.use_taps() == (jax.default_backend() == "cpu")
    if jax.default_backend() == "cpu":
        assert "conv_general_dilated" not in str(jax.make_jaxpr(apply)(x))
    with depthwise.native_depthwise():
        assert not depthwise.use_taps()
        assert "conv_general_dilated" in str(jax.make_jaxpr(lambda x: ours.apply(v_ref, x))(x))
    assert depthwise.use_taps() == (jax.default_backend() == "cpu")
    with pytest.raises(ValueError, match="input has 24 channels, expected 8"):
        depthwise.DepthwiseConv(8, 3).init(jax.random.key(0), x)


@pytest.mark.parametrize("shape", [(4, 6, 6, 24), (3, 5, 7, 10)])
def test_batch_norm_matches_flax(shape):
    """Same variables, outputs, running-statistics update and gradients (input, scale, bias)
    as flax's nn.BatchNorm, in training and in evaluation mode."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.float32)
    ct = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kw = {"momentum": 0.9, "epsilon": 1e-3}
    ours, ref = depthwise.BatchNorm(**kw), nn.BatchNorm(**kw)
    v = ref.init(jax.random.key(0), x, use_running_average=False)
    assert jax.tree.map(
        jnp.shape, ours.init(jax.random.key(0), x, use_running_average=False)
    ) == jax.tree.map(jnp.shape, v)
    v = {
        "params": {
            "scale": jnp.linspace(0.5, 2, shape[-1]),
            "bias": jnp.linspace(-1, 1, shape[-1]),
        },
        "batch_stats": {
            "mean": jnp.linspace(-0.2, 0.2, shape[-1]),
            "var": jnp.linspace(0.5, 1.5, shape[-1]),
        },
    }

    def run(m, train):
        def loss(params, x):
            y, upd = m.apply(
                {"params": params, "batch_stats": v["batch_stats"]},
                x,
                use_running_average=not train,
                mutable=["batch_stats"],
            )
            return jnp.sum(y * ct), (y, upd)

        grad_fn = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))
        (_, (y, upd)), grads = grad_fn(v["params"], x)
        return y, upd, grads

    ours_train = run(ours, True)
    for train in (True, False):
        y, upd, (gp, gx) = ours_train if train else run(ours, train)
        ry, rupd, (rgp, rgx) = run(ref, train)
        np.testing.assert_allclose(y, ry, atol=2e-5, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5), upd, rupd)
        np.testing.assert_allclose(gx, rgx, atol=2e-5, rtol=1e-4)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5), gp, rgp)
    # The running statistics move (training mode) by the flax rule.
    assert not np.allclose(ours_train[1]["batch_stats"]["mean"], v["batch_stats"]["mean"])


def test_batch_norm_train_gradient_through_its_statistics():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 5, 5, 6)), jnp.float32)
    s, b = jnp.linspace(0.5, 2, 6), jnp.linspace(-1, 1, 6)
    a1, a2, ct = (jnp.asarray(rng.standard_normal(k), jnp.float32) for k in (6, 6, x.shape))

    def reference(x, s, b):
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(x), axis=(0, 1, 2)) - jnp.square(mean)
        return (x - mean) * jax.lax.rsqrt(var + 1e-3) * s + b, mean, var

    def loss(f):
        def fn(x, s, b):
            y, mean, var = f(x, s, b)
            return jnp.sum(y * ct) + jnp.sum(mean * a1) + jnp.sum(var * a2)

        return fn

    ours = jax.jit(
        jax.grad(loss(lambda x, s, b: depthwise.batch_norm_train(x, s, b, 1e-3)), (0, 1, 2))
    )
    ref = jax.jit(jax.grad(loss(reference), (0, 1, 2)))
    for g, r in zip(ours(x, s, b), ref(x, s, b)):
        np.testing.assert_allclose(g, r, atol=3e-5, rtol=1e-4)
