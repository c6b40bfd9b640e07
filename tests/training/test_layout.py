"""The package boundaries: ``detector/`` (the model) imports only ``kernels/`` of this repository."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
LOCAL = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()} | {p.stem for p in ROOT.glob("*.py")}


def imported_modules(path: pathlib.Path) -> set[str]:
    """Top-level names of every absolute import in ``path`` (relative imports stay inside the package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_detector_imports_only_kernels():
    assert {"detector", "kernels", "datasets", "training"} <= LOCAL
    for path in sorted((ROOT / "detector").glob("*.py")):
        local = imported_modules(path) & LOCAL
        assert local <= {"kernels", "detector"}, f"{path.name} imports {sorted(local - {'kernels', 'detector'})}"


def test_the_check_sees_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom datasets import coco\nfrom . import layers\n")
    assert imported_modules(bad) & LOCAL == {"datasets"}
