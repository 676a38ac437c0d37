"""The rules of docs/architecture.md, read from the code: which layer may import which, what the
run config may know, and how long a function may grow."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "sparsediff"

# docs/architecture.md: each unit (a package, or a top-level module) sits on a layer and may
# import units on lower layers only, plus the pairs listed in SIDEWAYS.
LAYERS = {
    **dict.fromkeys(
        ["io", "sections", "locks", "runtime", "imaging", "weights", "folders", "__init__"], 0
    ),
    **dict.fromkeys(["sparsity", "data", "diffusion", "metrics"], 1),
    **dict.fromkeys(["models", "config"], 2),
    "training": 3,
    "pipelines": 4,
    "workflows": 5,
    "study": 6,
    "cli": 7,
}
SIDEWAYS = {
    ("folders", "io"),
    ("folders", "locks"),
    ("imaging", "io"),
    ("weights", "io"),
    ("models", "data"),  # data's constants (e.g. the sketch representations)
    ("config", "sparsity"),  # the sparse section is the engine's SparseSettings
    ("workflows", "__init__"),  # the package version, recorded with every run
    ("cli", "__init__"),
}


def _unit(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return parts[0]


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported unit, line) of every sparsediff import in ``path``, lazy ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:  # relative imports stay inside their own package
            continue
        for name in names:
            if name == "sparsediff":
                out.append(("__init__", node.lineno))
            elif name.startswith("sparsediff."):
                out.append((name.split(".")[1], node.lineno))
    return out


FILES = sorted(SRC.rglob("*.py"))


def test_every_unit_has_a_layer():
    assert {_unit(p) for p in FILES} <= set(LAYERS), "add the new unit to LAYERS and the doc"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path):
    unit = _unit(path)
    wrong = [
        f"line {line}: {unit} imports {target}"
        for target, line in _imports(path)
        if target != unit and (unit, target) not in SIDEWAYS and LAYERS[target] >= LAYERS[unit]
    ]
    assert not wrong, wrong


def test_the_run_config_knows_no_pipeline_model_or_dataset():
    imported = {
        node.module
        for node in ast.walk(ast.parse((SRC / "config.py").read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sparsediff")
    }
    assert imported <= {"sparsediff.io", "sparsediff.sections", "sparsediff.sparsity.settings"}


def test_the_engine_knows_nothing_of_diffusion():
    for path in (SRC / "sparsity").rglob("*.py"):
        assert {t for t, _ in _imports(path)} <= {"sparsity"}, path


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_function_is_over_80_lines(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    long = [
        f"{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long, long


def test_the_rules_catch_a_wrong_import(tmp_path):
    # the checker itself: an upward import is found
    bad = SRC / "data" / "images.py"
    text = bad.read_text(encoding="utf-8") + "\nfrom sparsediff.pipelines import Pipeline\n"
    copy = tmp_path / "images.py"
    copy.write_text(text, encoding="utf-8")
    found = [t for t, _ in _imports(copy)]
    assert "pipelines" in found and LAYERS["pipelines"] > LAYERS["data"]
