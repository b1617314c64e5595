"""Test set-up: 8 fake CPU devices and the CPU convolution flag, before any JAX op."""

import atexit
import concurrent.futures
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable


# Bytecode. The README's test command installs with `pip install --no-compile`, counting on
# Python to write each module's bytecode when it is first imported; an environment with
# PYTHONDONTWRITEBYTECODE=1 (measured on the 2-core machine where .ci/run ran) stops that, and
# every Python process of the suite (the two workers and every command the tests start) then
# compiles jax, flax and orbax from source again: `import rkd_jax.train` 8.9 s without
# bytecode, 4.6 s with it. The session writes bytecode into its own temporary directory
# (PYTHONPYCACHEPREFIX, inherited by the workers and commands it starts), removed at its end:
# nothing is written into the checkout or the virtualenv. Only where bytecode is off and jax
# has none yet: elsewhere Python keeps its own __pycache__ directories, which a prefix would hide.
def _bytecode_missing() -> bool:
    import importlib.util

    if not sys.dont_write_bytecode or sys.pycache_prefix:
        return False
    spec = importlib.util.find_spec("jax")
    if spec is None or not spec.origin:
        return False
    return not os.path.exists(importlib.util.cache_from_source(spec.origin))


if not os.environ.get("RKD_JAX_TEST_PYCACHE") and _bytecode_missing():
    os.environ["RKD_JAX_TEST_PYCACHE"] = tempfile.mkdtemp(prefix="rkd_jax_test_pycache_")
    atexit.register(shutil.rmtree, os.environ["RKD_JAX_TEST_PYCACHE"], ignore_errors=True)
    os.environ["PYTHONPYCACHEPREFIX"] = os.environ["RKD_JAX_TEST_PYCACHE"]
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.pycache_prefix = os.environ["RKD_JAX_TEST_PYCACHE"]
    sys.dont_write_bytecode = False

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
# LLVM optimisation level 0: the suite compiles far more than it runs (tiny models, a few
# steps each). Measured on the 2-core machine, one tiny training run (python -m rkd_jax.main,
# 2 steps + validation): 19 s of CPU at level 0, 31 s at level 1 (its train step compiles in
# 5.7 s instead of 11.5); the whole suite, quiet: 644 s / 1,253 s of CPU at level 1, 600 s /
# 1,171 s at level 0 (with train.py tracing the state only to resume). Level 0 was slower
# while init compiled the random MiniLM embedding, which pretrained.init_variables now leaves
# out of the jitted init.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# One compilation cache for the test session and the commands it starts (they inherit the
# environment): the many runs of the tiny configs compile the same train, eval and init
# programs; a run that finds its program there loads it instead of compiling it again.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rkd_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from rkd_jax import platform

platform.configure_cpu_flags()
# malloc on transparent huge pages for the test workers and every command they start, as
# rkd_jax's entry points give themselves (platform.reexec_with_hugepage_malloc; they then skip
# their re-exec). Environment only: a process reads it when it starts, so this process keeps
# its malloc. Measured on the AVX2-only 2-core machine, three in-process training tests of
# tests/test_train.py: 97 / 86 s without, 84 / 81 s with (two pairs, quiet).
_tunables = platform.hugepage_tunables(os.environ.get("GLIBC_TUNABLES", ""))
if _tunables is not None:
    os.environ["GLIBC_TUNABLES"] = _tunables
# XLA:CPU's older (non-MLIR) fusion emitters: measured on the 2-core machine, they compile the
# tiny Lite0 student's train step in 12.7 s of CPU instead of 26.3, and a tiny training run
# (python -m rkd_jax.main, teacher then distilled student) in 24.5 s of CPU instead of 51. Only
# the test session uses them: for training they are not a clear win (the miniature distill
# step: 142 vs 150 img/s; benchmarks/step.py --config mini --xla-flags=...). Set only when
# the installed jaxlib knows the flag (an unknown XLA flag aborts the process).
platform.add_xla_flag("--xla_cpu_use_fusion_emitters=false")

# The 8 fake devices share this machine's memory: orbax's replica-parallel save (its default
# off GPU) splits each replicated array into 8 slices, one jitted slice and transfer each,
# which copies nothing in parallel here and cost ~13% of a tiny run's CPU. The test session
# saves each array whole, as one device does.
import jax
import orbax.checkpoint as ocp

ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
)

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Generated data and TFDS caches of the test session stay out of the user's cache; the Python
# commands the session starts that import this file (the background tiny run, test workers)
# share the session's.
_session_cache = os.environ.get("RKD_JAX_TEST_SESSION_CACHE")
if _session_cache is None or _session_cache != os.environ.get("RKD_JAX_CACHE"):
    os.environ["RKD_JAX_CACHE"] = tempfile.mkdtemp(prefix="rkd_jax_test_cache_")
    os.environ["RKD_JAX_TEST_SESSION_CACHE"] = os.environ["RKD_JAX_CACHE"]
    atexit.register(shutil.rmtree, os.environ["RKD_JAX_CACHE"], ignore_errors=True)


def load_config(name: str = "distill", arg: str = "tiny"):
    """configs/<name>.py:<arg>, loaded by its file path as main would load it."""
    from rkd_jax.config_loader import load_config_file

    return load_config_file(f"{ROOT / 'configs' / name}.py:{arg}")


def tiny_config(**run_overrides):
    c = load_config("distill", "tiny")
    c.run.max_steps = 6
    c.run.max_eval_examples = 16
    c.run.update(run_overrides)
    return c


# Background commands. The suite's longest parts are commands that need nothing from the tests
# before them (the tiny run's training, launch.sh's tiny experiment); pytest runs one test at a
# time, so on a 2-core machine one core sat idle while they ran. They start in background
# threads as soon as collection has chosen the tests (only when a chosen test needs them), the
# tests that need them run last (their modules are moved to the end), and each of those waits
# for its command's result. A command's meaning is unchanged: the same command, arguments and
# environment the test ran itself before.


@dataclasses.dataclass
class Job:
    """One background command: `run(base, env)` returns its result; `base` is a new directory of
    the session's temporary tree, `env` the environment when the tests were chosen (tests that
    run meanwhile may change os.environ or the working directory: a job passes both
    explicitly). `wanted(item)`: a chosen test needs it. Jobs of one lane run one after
    another, in the order registered; lanes run side by side."""

    name: str
    lane: str
    wanted: Callable[[pytest.Item], bool]
    run: Callable[[Path, dict], object]
    future: concurrent.futures.Future | None = None


_JOBS: dict[str, Job] = {}
_LANES: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
_PROCS: list[subprocess.Popen] = []
_TMP: list = []  # the session's TempPathFactory, once collection has started


def background(name: str, lane: str, wanted: Callable[[pytest.Item], bool]):
    """Decorator registering `run(base, env) -> result` as the background job `name` (at import
    of the test module that uses it)."""

    def register(run):
        _JOBS[name] = Job(name, lane, wanted, run)
        return run

    return register


def background_result(name: str):
    """The job's result: waits for it if it was started in the background, else runs it now
    (under pytest-xdist: once for all workers, see `_shared_result`)."""
    job = _JOBS[name]
    if job.future is None:
        if XDIST_WORKER:
            return _shared_result(job)
        return job.run(_TMP[0].mktemp(name), dict(os.environ))
    return job.future.result()


# pytest-xdist (the README's test command: `-n 2`): each worker collects every test but runs
# only its share, so a worker starts no background command; the first test that needs one runs
# it, under a lock in the session's shared cache directory (created by the controlling process,
# inherited by the workers), and the other workers read its result there.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
_SHARED: dict[str, object] = {}


def _shared_result(job: Job):
    if job.name in _SHARED:
        return _SHARED[job.name]
    import fcntl
    import pickle

    jobs = Path(os.environ["RKD_JAX_TEST_SESSION_CACHE"]) / "jobs"
    jobs.mkdir(exist_ok=True)
    with open(jobs / f"{job.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = jobs / f"{job.name}.pickle"
        if done.exists():
            result = pickle.loads(done.read_bytes())
        else:
            base = jobs / job.name
            base.mkdir()
            result = job.run(base, dict(os.environ))
            done.write_bytes(pickle.dumps(result))
    _SHARED[job.name] = result
    return result


def popen(args, **kwargs) -> subprocess.Popen:
    """subprocess.Popen in its own process group, ended with the session if still running."""
    proc = subprocess.Popen(args, start_new_session=True, **kwargs)
    _PROCS.append(proc)
    return proc


def run_command(args, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(args, capture_output=True, text=True, check=False, timeout=timeout) in its
    own process group (see `popen`)."""
    with popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise
    return subprocess.CompletedProcess(args, p.returncode, out, err)


def _lane_order(item) -> int:
    """0: needs no background job; else 1 + the latest-registered job it waits for."""
    names = list(_JOBS)
    waits = [names.index(j.name) + 1 for j in _JOBS.values() if j.wanted(item)]
    return max(waits, default=0)


def pytest_collection_modifyitems(config, items):
    """Every test that needs the trained tiny run is one of the suite's `slow` end-to-end checks:
    training it costs ~1.5 min of CPU, more than the whole `-m "not slow"` loop. Modules whose
    tests wait for a background job run last (whole modules, in their order: module fixtures
    are set up once).

    Under pytest-xdist (`-n 2 --dist loadfile --no-loadscope-reorder`: whole modules go to a
    worker, in this order; xdist would otherwise start with the modules of the most tests) the
    order is the other way round, longest first, so that no long module starts last while the
    other worker has nothing left: the launch.sh experiment (~5 min of CPU), the modules in
    XDIST_FIRST, the other modules that run a background command themselves, the rest."""
    for item in items:
        if "tiny_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    module_order: dict = {}
    for item in items:
        key = item.nodeid.split("::")[0]
        module_order[key] = max(module_order.get(key, 0), _lane_order(item))
    if XDIST_WORKER:
        last_job = max(module_order.values(), default=0)
        for key, order in module_order.items():
            name = Path(key).name
            first = name in XDIST_FIRST
            long = XDIST_LONG.index(name) if name in XDIST_LONG else len(XDIST_LONG)
            module_order[key] = (-(last_job - 0.5 if first else order), long)
    items.sort(key=lambda item: module_order[item.nodeid.split("::")[0]])


# Modules without background commands whose CPU time is the suite's largest (measured
# 2026-11-30, per test file: test_train.py ~370 s, the rest under 100 s each).
XDIST_FIRST = ("test_train.py",)
# Within each group of that order (modules that wait for the same background commands, or for
# none), these go first, longest first (measured 2026-12-02 on the AVX2-only 2-core machine,
# seconds per module: 40, 37, 30, 30, 28, 20, 20, 18, 17, 14), so the session ends with short
# modules: with the file order, one worker's last module (test_teacher_targets.py) ran 36 s
# after the other worker had finished.
XDIST_LONG = (
    "test_teacher_targets.py",
    "test_models.py",
    "test_fold.py",
    "test_export.py",
    "test_export_params.py",
    "test_demo_visualize.py",
    "test_efficientnet.py",
    "test_bert.py",
    "test_restore_doc.py",
    "test_resnet.py",
)


def pytest_collection_finish(session):
    _TMP.append(session.config._tmp_path_factory)
    if session.config.option.collectonly or XDIST_WORKER:
        return
    for job in _JOBS.values():
        if any(job.wanted(item) for item in session.items):
            lane = _LANES.get(job.lane)
            if lane is None:
                lane = _LANES[job.lane] = concurrent.futures.ThreadPoolExecutor(1, job.lane)
            job.future = lane.submit(job.run, _TMP[0].mktemp(job.name), dict(os.environ))


def pytest_sessionfinish(session, exitstatus):
    """A stopped session (-x, Ctrl-C) ends the background commands still running."""
    for lane in _LANES.values():
        lane.shutdown(wait=False, cancel_futures=True)
    for proc in _PROCS:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


TINY_RUN = """
import sys
sys.path.insert(0, sys.argv[1])
from conftest import tiny_config  # the session's environment, as in the test process
from rkd_jax import train
train.train_and_evaluate(tiny_config(), sys.argv[2])
"""


def one_device(env: dict) -> dict:
    """`env` with one CPU device instead of the session's 8 fake ones."""
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    return dict(env, XLA_FLAGS=" ".join([*flags, "--xla_force_host_platform_device_count=1"]))


@background("tiny_run", "b", lambda item: "tiny_run" in getattr(item, "fixturenames", ()))
def _train_tiny_run(base: Path, env: dict) -> tuple[Path, subprocess.CompletedProcess]:
    workdir = base / "tiny_run"
    # On one device, as a laptop trains it: a quarter less CPU than on the 8 fake devices (the
    # end-to-end runs in the test process train sharded over 8; the tests that read this run
    # restore its checkpoints onto 8 devices or 1).
    proc = run_command(
        [sys.executable, "-c", TINY_RUN, str(ROOT / "tests"), str(workdir)],
        timeout=1800,
        cwd=ROOT,
        env=one_device(env),
    )
    return workdir, proc


@pytest.fixture(scope="session")
def tiny_run():
    """A distillation run of the tiny config (teacher first, 6 steps each), trained once per
    test session through train_and_evaluate (in a background Python process with this one's
    environment but one CPU device: the same flags and caches): workdir with teacher/ and the
    student."""
    workdir, proc = background_result("tiny_run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir
