"""The package's layers, read from its source: models/ is a leaf, nothing but main trains."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "rkd_jax"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function: `import a.b` -> a.b;
    `from a import b` -> a and a.b (b may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                package = module_name(path).split(".")
                package = package[: len(package) - node.level + (path.name == "__init__.py")]
                base = ".".join([*package, base] if base else package)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def sources(*folders: Path) -> list[Path]:
    return sorted(p for folder in folders for p in folder.rglob("*.py"))


def test_imported_modules_sees_lazy_and_from_imports(tmp_path):
    file = tmp_path / "m.py"
    file.write_text("import a.b\ndef f():\n    from rkd_jax import train\n")
    assert {"a.b", "rkd_jax", "rkd_jax.train"} <= imported_modules(file)


def test_models_import_nothing_of_rkd_jax_outside_models():
    found = {
        f"{module_name(path)} imports {name}"
        for path in sources(PACKAGE / "models")
        for name in imported_modules(path)
        if name.split(".")[0] == "rkd_jax"
        and name != "rkd_jax"
        and not name.startswith("rkd_jax.models")
    }
    assert not found, sorted(found)


def test_only_main_imports_train():
    found = {
        module_name(path)
        for path in sources(PACKAGE, ROOT / "benchmarks")
        if "rkd_jax.train" in imported_modules(path) and path != PACKAGE / "main.py"
    }
    assert not found, sorted(found)
