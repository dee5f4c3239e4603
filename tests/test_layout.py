"""The package layout shows the stages, and imports run one way (../shared/architecture.md).

* the floor (graphopt.core) imports nothing of graphopt's but itself: no compression, no front door,
  no backend, no pass;
* compression (graphopt.compression) knows no target and no front door;
* the front doors (graphopt.front) reach the backends only through graphopt.front.api.

Every import statement is read from the source (top level and inside functions alike), so a lazy import
inside a function cannot hide a backward edge.
"""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ROOT = REPO / "graphopt"


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            if node.module == "graphopt":  # from graphopt import x: x is the sub-module
                found += [(node.lineno, f"graphopt.{alias.name}") for alias in node.names]
    return found


def _violations(package: str, forbidden: tuple[str, ...], allowed_files: tuple[str, ...] = (),
                root: pathlib.Path = ROOT) -> list[str]:
    bad = []
    for path in sorted((root / package).rglob("*.py")):
        if path.name in allowed_files:
            continue
        for line, name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    return bad


def test_the_three_stages_are_packages():
    for package in ("core", "compression", "front"):
        assert (ROOT / package / "__init__.py").is_file()
    loose = sorted(p.name for p in ROOT.glob("*.py") if p.name != "__init__.py")
    assert loose == [], f"modules outside the stage packages: {loose}"


def test_floor_imports_no_upper_stage():
    forbidden = ("graphopt.compression", "graphopt.front", "graphopt.backends", "graphopt.passes", "tvm")
    assert _violations("core", forbidden) == []


def test_compression_knows_no_target_and_no_front_door():
    forbidden = ("graphopt.front", "graphopt.backends", "tvm")
    assert _violations("compression", forbidden) == []


def test_front_doors_reach_backends_only_through_the_api():
    assert _violations("front", ("graphopt.backends", "tvm"), allowed_files=("api.py",)) == []


@pytest.mark.parametrize("package", ["backends", "passes", "models"])
def test_lower_stages_never_reach_up_to_a_front_door(package):
    assert _violations(package, ("graphopt.front",), root=REPO) == []


def test_backends_know_no_compression_driver():
    assert _violations("backends", ("graphopt.compression",), root=REPO) == []


def test_checker_sees_lazy_imports(tmp_path):
    # the checker must find an import hidden inside a function (the way the old layout reached backends)
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from graphopt.backends.compile import compile_model\n")
    assert _imports(path) == [(2, "graphopt.backends.compile")]
