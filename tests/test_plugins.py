"""Passes from outside graphopt: an installed plugin (entry point ``graphopt.passes``) and
``PassRegistry.register`` from Python."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import graphopt
from graphopt.passes import default_registry
from graphopt.front import cli
from graphopt import models
from graphopt.core.errors import PassError, UsageError
from graphopt.core.pipeline import PassRegistry

PLUGIN_SRC = Path(__file__).parent / "plugin_example"
PLUGIN = "example_rename"


def _pip_install(src: Path, target: Path) -> None:
    base = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
            "--target", str(target)]
    # Offline first: build with the setuptools already installed; older setuptools without the
    # `wheel` package cannot, and then pip builds in an isolated environment from its index.
    for extra in (["--no-build-isolation"], []):
        proc = subprocess.run([*base, *extra, str(src)], capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            return
    pytest.fail(f"pip could not install the example plugin:\n{proc.stderr[-2000:]}")


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("plugin")
    src = work / "src"
    shutil.copytree(PLUGIN_SRC, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = work / "site"
    _pip_install(src, target)  # a copy, so the build leaves nothing in the repository
    assert any(p.name.startswith("graphopt_example_plugin-") for p in target.iterdir())
    return target


@pytest.fixture
def squeezenet(tmp_path) -> Path:
    path = tmp_path / "squeezenet.onnx"
    shutil.copy(models.resolve("light:squeezenet"), path)
    return path


def _run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_plugin_is_absent_until_installed():
    assert PLUGIN not in default_registry()


def test_installed_plugin_is_listed_and_runs(plugin_dir, squeezenet, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(plugin_dir))
    info = default_registry().info(PLUGIN)
    assert info.source == "plugin:graphopt-example-plugin"

    assert cli.main(["passes", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[PLUGIN]["source"] == "plugin:graphopt-example-plugin"

    out = tmp_path / "renamed.onnx"
    assert cli.main(["optimize", str(squeezenet), "--passes", PLUGIN, "-o", str(out), "-q"]) == 0
    before, after = onnx.load(str(squeezenet)), onnx.load(str(out))
    assert [n.name for n in after.graph.node] == [f"n_{n.op_type}_{i}" for i, n in enumerate(before.graph.node)]
    assert [n.op_type for n in after.graph.node] == [n.op_type for n in before.graph.node]
    feeds = models.random_inputs("light:squeezenet", seed=0)
    for a, b in zip(_run(squeezenet, feeds), _run(out, feeds)):
        np.testing.assert_array_equal(a, b)


def test_plugin_found_by_a_fresh_graphopt_process(plugin_dir, squeezenet, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(plugin_dir), os.environ.get("PYTHONPATH")]))}
    exe = shutil.which("graphopt")
    cmd = [exe] if exe else [sys.executable, "-m", "graphopt.front.cli"]
    listed = subprocess.run([*cmd, "passes"], capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert any(line.split()[:2] == [PLUGIN, "plugin:graphopt-example-plugin"] for line in listed.stdout.splitlines())
    out = tmp_path / "o.onnx"
    ran = subprocess.run([*cmd, "optimize", str(squeezenet), "--passes", PLUGIN, "-o", str(out)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert PLUGIN in ran.stdout  # the per-pass table
    assert all(n.name.startswith("n_") for n in onnx.load(str(out)).graph.node)


class _TagOutputs(ir.passes.InPlacePass):
    """Adds a metadata entry naming the model's outputs."""

    def __init__(self, key: str = "outputs") -> None:
        super().__init__()
        self.key = key

    def call(self, model):
        model.metadata_props[self.key] = ",".join(v.name for v in model.graph.outputs)
        return ir.passes.PassResult(model, modified=True)


def test_register_from_python_with_options():
    registry = default_registry(plugins=False)
    registry.register("tag_outputs", _TagOutputs)
    assert registry.info("tag_outputs").source == "user"
    assert registry.info("tag_outputs").description == "Adds a metadata entry naming the model's outputs."
    model = graphopt.load("light:squeezenet")
    result = graphopt.optimize(model, passes=["tag_outputs"], registry=registry,
                               options={"tag_outputs": {"key": "heads"}})
    assert result.modified and [r.name for r in result.records] == ["tag_outputs"]
    assert result.model.metadata_props["heads"] == "softmaxout_1"
    assert "tag_outputs" in [p["name"] for p in graphopt.list_passes(registry)]


def test_register_errors():
    registry = default_registry(plugins=False)
    registry.register("tag_outputs", _TagOutputs)
    with pytest.raises(UsageError, match="already registered"):
        registry.register("tag_outputs", _TagOutputs)
    registry.register("tag_outputs", lambda: _TagOutputs("other"), replace=True)
    with pytest.raises(UsageError, match="letters, digits"):
        registry.register("bad name!", _TagOutputs)
    with pytest.raises(UsageError, match="callable"):
        registry.register("not_callable", 42)
    registry.register("not_a_pass", lambda: object())
    with pytest.raises(PassError, match="not_a_pass"):
        graphopt.optimize(graphopt.load("light:squeezenet"), passes=["not_a_pass"], registry=registry)
    with pytest.raises(UsageError, match="tag_outputs"):
        registry.create("tag_outputs", {"no_such_option": 1})
