"""The import rules of docs/architecture.md, checked on the source: kernels/ imports only torch and triton,
datasets/ imports neither kernels/ nor detector/, detector/ never imports training/ or the scripts."""
import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# this repository's packages and scripts: an import of one of them is checked against RULES' project packages
PROJECT = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()} | {p.stem for p in ROOT.glob("*.py")}
# package -> (allowed third-party modules or None for any, allowed project packages)
RULES = {
    "kernels": ({"torch", "triton", "numpy"}, set()),  # numpy: only to silence the Triton interpreter
    "datasets": (None, set()),
    "detector": (None, {"kernels"}),
    "training": (None, {"kernels", "detector", "datasets"}),
}
# Known exceptions, each with the reason; remove an entry when its reason is gone.
EXCEPTIONS = set()


def _imports(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(RULES))
def test_import_rules(package):
    third_party, project = RULES[package]
    files = sorted((ROOT / package).glob("**/*.py"))
    if not files:
        pytest.skip(f"{package}/ is not in this checkout")
    bad = []
    for f in files:
        rel = f.relative_to(ROOT).as_posix()
        for mod in _imports(f) - set(sys.stdlib_module_names) - {package}:
            allowed = mod in project if mod in PROJECT else (third_party is None or mod in third_party)
            if not allowed and (rel, mod) not in EXCEPTIONS:
                bad.append(f"{rel} imports {mod}")
    assert not bad, "layering broken (docs/architecture.md): " + "; ".join(bad)


def test_the_check_sees_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom datasets import coco\nfrom . import layers\nimport training.loop\n")
    assert _imports(bad) & PROJECT == {"datasets", "training"}
    assert {"kernels", "detector", "datasets", "training", "train", "evaluate", "validate"} <= PROJECT


def test_code_cites_docs_not_shared():
    offenders = [p.relative_to(ROOT).as_posix() for d in ("detector", "datasets", "training", "bench")
                 for p in (ROOT / d).glob("**/*.py") if "../shared" in p.read_text()]
    assert not offenders, f"cite docs/ instead of ../shared in: {offenders}"
