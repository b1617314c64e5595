"""Process-level set-up that must happen before JAX initialises its backends.

XLA's CPU backend in jax 0.10 sends convolutions to YNNPACK, which trains 2-12x slower on
the 2-core development machines than XLA's own kernels (docs/miniature.md). The flag
that turns it off is experimental and an unknown XLA flag aborts the process, so we only set
it after a throw-away subprocess has shown that the installed jaxlib accepts it. The probe's
answer is cached per jaxlib version.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

from rkd_jax.files import write_json_atomic

YNN_OFF_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def cache_dir() -> Path:
    """Root of rkd_jax's caches (generated data, probes): $RKD_JAX_CACHE or ~/.cache/rkd_jax."""
    root = os.environ.get("RKD_JAX_CACHE") or os.path.join(Path.home(), ".cache", "rkd_jax")
    return Path(root)


def _flag_accepted(flag: str) -> bool:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    env["JAX_PLATFORMS"] = "cpu"
    code = "import jax, jax.numpy as jnp; jnp.zeros(2).block_until_ready()"
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def _glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, OSError, ValueError):
        return None


def cpu_backend_expected(env=None) -> bool:
    """Whether jax will run on the CPU, decided without importing jax (which would start it).

    JAX_PLATFORMS names the backends when set; otherwise an installed GPU/TPU plugin (the
    `jax[cuda12]` extra installs jax_cuda12_plugin) means jax will pick the accelerator.
    """
    import importlib.util

    env = os.environ if env is None else env
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    for plugin in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu"):
        try:
            if importlib.util.find_spec(plugin) is not None:
                return False
        except (ImportError, ValueError):
            continue
    return True


def reexec_with_hugepage_malloc() -> None:
    """Restart this process with glibc's malloc on transparent huge pages, unless it is already.

    XLA:CPU takes its buffers from malloc; glibc serves big blocks from freshly mapped 4 KiB
    pages and unmaps them on free, so every step faults its temporaries in again. On the
    EfficientNet-Lite0 distillation step that was 112,000 page faults/s with the CPU in the
    kernel, 1.07 s per step; with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35; malloc
    asks for transparent huge pages) 500 faults/s, and the run's results are bit-identical.
    Where the kernel's huge pages are off it changes nothing. Call it first, from an entry point
    only (it replaces the process); `RKD_JAX_KEEP_MALLOC=1` or a GLIBC_TUNABLES that already
    sets glibc.malloc.hugetlb leaves the process as it is.
    """
    if sys.platform != "linux" or os.environ.get("RKD_JAX_KEEP_MALLOC") == "1":
        return
    if not cpu_backend_expected():
        return  # measured on XLA:CPU only; a GPU run keeps its buffers on the device
    tunables = hugepage_tunables(os.environ.get("GLIBC_TUNABLES", ""))
    if tunables is None:
        return
    os.environ["GLIBC_TUNABLES"] = tunables
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def hugepage_tunables(tunables: str) -> str | None:
    """GLIBC_TUNABLES `tunables` with malloc on huge pages added, or None where that does not
    apply: not Linux, glibc older than 2.35, or `tunables` already setting glibc.malloc.hugetlb."""
    if sys.platform != "linux" or "glibc.malloc.hugetlb" in tunables:
        return None
    version = _glibc_version()
    if version is None or version < (2, 35):
        return None
    return ":".join(filter(None, [tunables, HUGEPAGE_TUNABLE]))


def xla_flag_accepted(flag: str) -> bool:
    """Whether the installed jaxlib accepts this XLA flag (an unknown one aborts the process).

    Asked once per jaxlib version and flag, in a throw-away subprocess; the answer is cached in
    <cache_dir>/xla_flag_probe.json. Without jaxlib: False.
    """
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return False
    probe_file = cache_dir() / "xla_flag_probe.json"
    known: dict = {}
    try:
        known = json.loads(probe_file.read_text())
    except (OSError, ValueError):
        known = {}
    key = f"{version}:{flag}"
    if key not in known:
        known[key] = _flag_accepted(flag)
        try:
            probe_file.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(probe_file, known)
        except OSError:
            pass
    return bool(known[key])


def add_xla_flag(flag: str) -> bool:
    """Append `flag` ("--name=value") to XLA_FLAGS unless XLA_FLAGS already sets that name (the
    user's value wins) or the installed jaxlib rejects it (`xla_flag_accepted`). Must run before
    JAX initialises a backend. True when XLA_FLAGS now holds exactly `flag`."""
    flags = os.environ.get("XLA_FLAGS", "")
    if flag.split("=")[0] not in {f.split("=")[0] for f in flags.split()}:
        if not xla_flag_accepted(flag):
            return False
        os.environ["XLA_FLAGS"] = flags = (flags + " " + flag).strip()
    return flag in flags.split()


def configure_cpu_flags() -> list[str]:
    """Turn YNNPACK convolutions off when the installed jaxlib knows the flag.

    Must run before `import jax` initialises a backend (importing jax alone is fine, using it is
    not). Returns the flags that were added, for logging. `RKD_JAX_KEEP_YNN=1` keeps XLA's
    default.
    """
    if os.environ.get("RKD_JAX_KEEP_YNN") == "1":
        return []
    return [YNN_OFF_FLAG] if add_xla_flag(YNN_OFF_FLAG) else []


def configure_cpu_flags_for_cpu_backend() -> list[str]:
    """`configure_cpu_flags` unless JAX_PLATFORMS names another backend (what the commands call
    first; no effect once JAX has started a backend)."""
    if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu"):
        return configure_cpu_flags()
    return []


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions of these distributions (absent ones left out), for logs and results."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for benchmark results."""
    import platform as host_platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return host_platform.processor() or "unknown"
