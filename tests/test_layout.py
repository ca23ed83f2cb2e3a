"""The import direction of the layers (capture → segment → guidance → pipelines): segment/ and guidance.py know
no diffusers; the library never imports eval."""

import ast
from pathlib import Path

import goca_scfg

PKG = Path(goca_scfg.__file__).parent


def _imports(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or ""))
    return names


def test_pure_modules_import_no_diffusers():
    for path in [*PKG.glob("segment/*.py"), PKG / "guidance.py", PKG / "ops.py", PKG / "tokens.py", PKG / "config.py"]:
        bad = {n for n in _imports(path) if n.split(".")[0] in {"diffusers", "transformers"} or "pipeline" in n}
        assert not bad, f"{path.name} imports {bad}"


def test_library_never_imports_eval_bench_or_tests():
    for path in PKG.rglob("*.py"):
        bad = {n for n in _imports(path) if n.split(".")[0] in {"eval", "bench", "tests"}}
        assert not bad, f"{path.name} imports {bad}"


def test_no_library_module_imports_testing():
    for path in PKG.rglob("*.py"):
        if path.name == "testing.py":
            continue
        assert not any(n.endswith("testing") for n in _imports(path)), path.name
