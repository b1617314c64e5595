"""Configs by name (`distill:paper`) and by file (`configs/distill.py:paper`): the same configs;
the top-level configs/ directory ships inside the package as rkd_jax.configs, so an installed
(non-editable) rkd_jax runs `python -m rkd_jax.main --config=distill:tiny` from any directory."""

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from absl import flags
from conftest import ROOT, load_config
from ml_collections import config_flags

from rkd_jax import config_loader

# ml_collections reads a config file with the deprecated SourceFileLoader.load_module.
pytestmark = pytest.mark.filterwarnings(r"ignore:the load_module\(\) method is deprecated")

NAMES = ("distill", "student", "teacher")
VARIANTS = ("", "tiny", "lite0", "paper", "paper_b0")


def test_names_are_the_files_of_configs():
    assert config_loader.configs_dir() == ROOT / "configs"  # the checkout: the one source
    assert config_loader.config_names() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_a_name_loads_what_the_file_path_loads(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    for variant in VARIANTS:
        by_name = config_loader.load_config_file(f"{name}:{variant}" if variant else name)
        by_path = config_loader.load_config_file(f"configs/{name}.py:{variant}")
        by_abs_path = config_loader.load_config_file(f"{ROOT / 'configs' / name}.py:{variant}")
        expected = load_config(name, variant).to_dict()
        assert by_name.to_dict() == by_path.to_dict() == by_abs_path.to_dict() == expected


def test_a_file_spec_is_left_as_given():
    for spec in ("configs/distill.py:paper", "x.py", "/abs/distill.py:tiny", "./distill"):
        assert config_loader.resolve_config_spec(spec) == spec
    resolved = config_loader.resolve_config_spec("teacher:paper")
    assert resolved == f"{ROOT / 'configs' / 'teacher.py'}:paper"


@pytest.mark.parametrize("spec", ["distil", "distil:paper", "paper", "", ":tiny"])
def test_a_wrong_name_is_one_error_naming_the_valid_names(spec):
    with pytest.raises(ValueError) as e:
        config_loader.load_config_file(spec)
    message = str(e.value)
    assert "\n" not in message
    assert f"config {spec.partition(':')[0]!r}: not a config name and not a file" in message
    assert "valid names: distill, student, teacher" in message


def test_main_config_flag_takes_a_name_and_a_path(monkeypatch):
    """The parser rkd_jax.main installs on its --config flag, on a flag of its own."""
    from rkd_jax import main

    monkeypatch.chdir(ROOT)
    for spec in ("distill:paper", "configs/distill.py:paper", "student", "configs/student.py"):
        argv = ["prog", f"--config={spec}"]
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=argv)
        values["config"].parser = main._NamedConfigParser(values["config"].parser)
        values(argv)
        name = Path(spec.partition(":")[0]).stem
        assert values.config.to_dict() == load_config(name, spec.partition(":")[2]).to_dict()
    assert main.FLAGS["config"].default_as_str == "'distill'"


def _main(*args, cwd, env_extra=None):
    env = dict(os.environ, RKD_JAX_KEEP_MALLOC="1", JAX_PLATFORMS="cpu", **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "rkd_jax.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_main_outside_the_checkout_names_and_errors(tmp_path):
    """From a directory without configs/: a name (and the default) loads; a wrong name is one
    error line naming the valid names; nothing runs (an unknown field stops it first)."""
    for args in (["--config=distill:tiny"], []):
        res = _main(*args, "--config.nope=1", f"--workdir={tmp_path / 'run'}", cwd=tmp_path)
        assert res.returncode == 2, res.stderr[-3000:]
        expected = "error: --config.nope: the configuration has no field 'nope' (configs/"
        assert res.stderr.strip().splitlines() == [f"{expected}distill.py documents every field)"]
    res = _main("--config=distil:tiny", f"--workdir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: flag --config=distil:tiny: "), lines
    assert "'distil': not a config name and not a file; valid names: distill, student" in lines[0]
    assert not (tmp_path / "run").exists()


def test_pyproject_ships_every_package_and_configs_as_rkd_jax_configs():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "rkd_jax").rglob("__init__.py")
    }
    assert set(setup["packages"]) == packages | {"rkd_jax.configs"}
    assert setup["package-dir"] == {"rkd_jax.configs": "configs"}
    assert (ROOT / "configs" / "__init__.py").is_file()
    assert not (ROOT / "rkd_jax" / "configs").exists()  # no second copy of the configs


@pytest.mark.slow
def test_the_wheel_runs_a_named_config_outside_the_checkout(tmp_path):
    """Build the wheel from a copy of the sources, install it (no editable link) and run
    `python -m rkd_jax.main --config=distill:tiny` from an empty directory: the config loads
    from the installed package (the unknown-field error comes after loading it)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("rkd_jax", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels, src],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = wheels.glob("rkd_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in ("__init__", *NAMES):
        assert f"rkd_jax/configs/{config}.py" in names
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "rkd_jax").rglob("*.py")}
    assert sources <= names
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", site, wheel],
        check=True,
        capture_output=True,
        timeout=600,
    )
    # The wheel's rkd_jax first on the path; the dependencies from this environment after it.
    deps = os.pathsep.join(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))
    env = {"PYTHONPATH": f"{site}{os.pathsep}{deps}"}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = subprocess.run(
        [sys.executable, "-c", "import rkd_jax; print(rkd_jax.__file__)"],
        cwd=outside,
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(site)
    res = _main("--config=distill:tiny", "--config.nope=1", cwd=outside, env_extra=env)
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: --config.nope: the config")
    res = _main("--config=distil", cwd=outside, env_extra=env)
    assert "valid names: distill, student, teacher" in res.stderr, res.stderr[-3000:]


def test_a_repeated_override_keeps_the_last_value(monkeypatch):
    """ml_collections concatenates a tuple field given twice ((1,) then (16,) -> (1, 16): a
    launch.sh default followed by its caller's override decayed the lr at both epochs);
    rkd_jax.main keeps only the last override of each field, as for every other type."""
    argv = [
        "prog",
        "--config=configs/distill.py:tiny",
        "--config.train.lr_decay_epochs=(1,)",
        "--config.train.epochs",
        "3",
        "--config.train.lr_decay_epochs=(16,)",
        "--config.train.epochs=5",
        "--workdir=x",
    ]

    monkeypatch.chdir(ROOT)

    def parsed(args):
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=args)
        values(args, known_only=True)
        return values.config

    raw = parsed(argv)
    assert tuple(raw.train.lr_decay_epochs) == (1, 16)  # the library's behaviour: the trap
    kept = config_loader.last_override_wins(argv[1:])
    assert kept == [
        "--config=configs/distill.py:tiny",
        "--config.train.lr_decay_epochs=(16,)",
        "--config.train.epochs=5",
        "--workdir=x",
    ]
    fixed = parsed(argv[:1] + kept)
    assert tuple(fixed.train.lr_decay_epochs) == (16,) and fixed.train.epochs == 5
    # Nothing after "--" is touched; an override without a value is left to the parser.
    assert config_loader.last_override_wins(["--config.a=1", "--", "--config.a=2"]) == [
        "--config.a=1",
        "--",
        "--config.a=2",
    ]
    assert config_loader.last_override_wins(["--config.a"]) == ["--config.a"]
