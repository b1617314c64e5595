"""rkd_jax.platform: the entry point's restart with glibc's malloc on huge pages; XLA flag probes."""

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from rkd_jax import platform

SCRIPT = """
import os, sys
print("start", flush=True)
from rkd_jax import platform
platform.reexec_with_hugepage_malloc()
print("tunables", os.environ.get("GLIBC_TUNABLES", ""), "argv", " ".join(sys.argv[1:]))
"""


def _run(env_update: dict) -> list[str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RKD_JAX_KEEP_MALLOC")
    }
    env.update(env_update)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, "--config=x.py", "two words"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    return proc.stdout.splitlines()


needs_glibc = pytest.mark.skipif(
    sys.platform != "linux" or (platform._glibc_version() or (0, 0)) < (2, 35),
    reason="glibc.malloc.hugetlb needs Linux with glibc >= 2.35",
)


@needs_glibc
def test_restarts_once_with_the_tunable_and_the_same_arguments():
    out = _run({})
    assert out == ["start", "start", "tunables glibc.malloc.hugetlb=1 argv --config=x.py two words"]


@needs_glibc
def test_keeps_other_tunables_and_respects_the_opt_outs():
    out = _run({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert out[-1].startswith("tunables glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1 ")
    assert out.count("start") == 2
    assert _run({"RKD_JAX_KEEP_MALLOC": "1"}) == ["start", "tunables  argv --config=x.py two words"]
    already = _run({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert already == ["start", "tunables glibc.malloc.hugetlb=0 argv --config=x.py two words"]


def test_glibc_version_is_read_from_the_c_library():
    version = platform._glibc_version()
    if sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
        assert version is not None and version >= (2, 17)
    else:
        assert version is None


def test_cpu_backend_is_decided_from_the_environment_without_jax():
    assert platform.cpu_backend_expected({"JAX_PLATFORMS": "cpu"})
    assert not platform.cpu_backend_expected({"JAX_PLATFORMS": "cuda"})
    assert not platform.cpu_backend_expected({"JAX_PLATFORMS": "cuda,cpu"})
    # No JAX_PLATFORMS: an installed accelerator plugin means jax will not run on the CPU.
    import importlib.util

    has_plugin = any(
        importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin")
    )
    assert platform.cpu_backend_expected({}) == (not has_plugin)


@needs_glibc
def test_no_restart_when_jax_runs_on_an_accelerator():
    out = _run({"JAX_PLATFORMS": "cuda"})
    assert out == ["start", "tunables  argv --config=x.py two words"]


def test_importing_library_modules_starts_no_process():
    script = (
        "import subprocess\n"
        "def boom(*a, **k):\n"
        "    raise AssertionError('a subprocess was started at import')\n"
        "subprocess.Popen = boom\n"
        "import rkd_jax.report, rkd_jax.train, rkd_jax.evaluate, rkd_jax.inference.predictor\n"
        "import rkd_jax.export, rkd_jax.table, rkd_jax.sweep, rkd_jax.data.pipeline\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_xla_flag_probe_asks_jaxlib_once_per_version_and_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("RKD_JAX_CACHE", str(tmp_path))
    asked = []

    def probe(flag):
        asked.append(flag)
        return flag.endswith("=false")

    monkeypatch.setattr(platform, "_flag_accepted", probe)
    for _ in range(2):
        assert platform.xla_flag_accepted("--xla_a=false")
        assert not platform.xla_flag_accepted("--xla_b=true")
    assert asked == ["--xla_a=false", "--xla_b=true"]  # the second round read the cache
    known = json.loads((tmp_path / "xla_flag_probe.json").read_text())
    version = importlib.metadata.version("jaxlib")
    assert known == {f"{version}:--xla_a=false": True, f"{version}:--xla_b=true": False}


def test_xla_flag_probe_runs_jaxlib_in_a_subprocess():
    # An unknown XLA flag aborts the process that reads it: the probe's subprocess, not this one.
    assert not platform._flag_accepted("--xla_rkd_jax_no_such_flag=1")
    assert platform._flag_accepted("--xla_backend_optimization_level=0")


def test_add_xla_flag_appends_accepted_flags_and_keeps_the_users_value(tmp_path, monkeypatch):
    monkeypatch.setenv("RKD_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(platform, "_flag_accepted", lambda flag: not flag.startswith("--xla_no"))
    monkeypatch.setenv("XLA_FLAGS", "--xla_mine=7 --xla_ab=1")
    assert platform.add_xla_flag("--xla_a=false")  # --xla_ab is another flag
    assert not platform.add_xla_flag("--xla_no_such=1")  # rejected by jaxlib: left out
    assert not platform.add_xla_flag("--xla_mine=0")  # set by the user: their value stays
    assert platform.add_xla_flag("--xla_a=false")  # already there: not appended twice
    assert os.environ["XLA_FLAGS"] == "--xla_mine=7 --xla_ab=1 --xla_a=false"
