"""Configs by name or by file: `distill`, `distill:paper`, `configs/distill.py:paper`.

The repository's top-level configs/ directory is the one source of the configs; a wheel ships it
inside the package as `rkd_jax.configs` (pyproject.toml's package-dir), so a name works wherever
rkd_jax is installed and a file path works as it always has. A spec is a file path when its part
before the `:` contains a `/`, ends in `.py` or is an existing file; otherwise it is the name of
one of the shipped configs (distill, student, teacher).

`python -m rkd_jax.main --config=...` resolves its flag through `resolve_config_spec`;
`load_config_file` loads a spec outside absl flags (report, demo, sweep, benchmarks).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT = "distill"


def configs_dir() -> Path:
    """The directory of the shipped configs: rkd_jax/configs in an installed wheel, the
    repository's configs/ beside rkd_jax/ in a source checkout or editable install."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "configs", package.parent / "configs"):
        if (candidate / f"{DEFAULT}.py").is_file():
            return candidate
    raise FileNotFoundError(
        f"the configs shipped with rkd_jax: neither {package / 'configs'} nor "
        f"{package.parent / 'configs'} holds {DEFAULT}.py (a broken install? reinstall rkd_jax)"
    )


def config_names() -> tuple[str, ...]:
    """The names `--config=NAME[:variant]` accepts: the shipped config files' stems."""
    return tuple(sorted(p.stem for p in configs_dir().glob("*.py") if not p.stem.startswith("_")))


def _is_file_spec(path: str) -> bool:
    return "/" in path or os.sep in path or path.endswith(".py") or Path(path).is_file()


def resolve_config_spec(spec: str) -> str:
    """'distill:paper' -> '<configs dir>/distill.py:paper'; a file spec comes back unchanged.

    An unknown name raises one ValueError naming it and the valid names.
    """
    path, sep, arg = spec.partition(":")
    if _is_file_spec(path):
        return spec
    names = config_names()
    if path not in names:
        raise ValueError(
            f"config {path!r}: not a config name and not a file; valid names: "
            f"{', '.join(names)} (each takes :VARIANT, e.g. {DEFAULT}:paper), or a config file "
            "path such as configs/distill.py"
        )
    return f"{configs_dir() / f'{path}.py'}{sep}{arg}"


def load_config_file(spec: str):
    """'distill:paper' or 'configs/distill.py:paper' -> the ConfigDict get_config('paper')
    returns."""
    path, _, arg = resolve_config_spec(spec).partition(":")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"config file {file}: not found (expected e.g. configs/distill.py, or a config name: "
            f"{', '.join(config_names())})"
        )
    module_spec = importlib.util.spec_from_file_location(f"rkd_config_{file.stem}", file)
    if module_spec is None:
        raise ValueError(
            f"config file {file}: not a Python file (expected e.g. configs/distill.py)"
        )
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {file}: defines no get_config(arg)")
    return module.get_config(arg)


def phase_configs(config, role: str):
    """(model config, schedule) of the model a phase trains: role 'teacher' or 'student'."""
    if role == "teacher":
        return config.teacher, config.teacher_train
    return config.student, config.train


def last_override_wins(argv: list[str]) -> list[str]:
    """`argv` with only the last `--config.FIELD` override of each field.

    ml_collections parses a tuple field's override as a multi-valued flag: given twice
    (`--config.train.lr_decay_epochs=(1,)` from a script, then `=(16,)` from its caller), the
    field becomes the concatenation (1, 16) instead of (16,). Every other field takes the last
    value; so does a tuple field here. Both `--config.F=V` and `--config.F V` count; nothing
    after a bare `--` is touched.
    """
    items: list[tuple[str | None, list[str]]] = []  # (field or None, its tokens)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            items.append((None, argv[i:]))
            break
        if arg.startswith("--config.") and "=" in arg:
            items.append((arg.split("=", 1)[0], [arg]))
        elif arg.startswith("--config.") and i + 1 < len(argv):
            items.append((arg, argv[i : i + 2]))
            i += 1
        else:
            items.append((None, [arg]))
        i += 1
    last = {field: k for k, (field, _) in enumerate(items) if field is not None}
    return [
        token
        for k, (field, tokens) in enumerate(items)
        if field is None or last[field] == k
        for token in tokens
    ]
