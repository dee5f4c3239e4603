"""Tuning: records are shared across models, compile applies them, outputs still match ORT."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.core.errors import UsageError


def _conv_model(path, extra_matmul: bool):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.2
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"])]
    inits = [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel())]
    out_shape = [1, 8, 10, 10]
    if extra_matmul:
        m = rng.standard_normal((10, 6)).astype(np.float32)
        inits.append(helper.make_tensor("m", TensorProto.FLOAT, m.shape, m.ravel()))
        nodes.append(helper.make_node("MatMul", ["r", "m"], ["y"]))
        out_shape = [1, 8, 10, 6]
    else:
        nodes.append(helper.make_node("Identity", ["r"], ["y"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 10, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def test_second_model_reuses_records_and_compiled_output_matches(tmp_path):
    db = tmp_path / "db"
    a = _conv_model(tmp_path / "a.onnx", extra_matmul=False)
    b = _conv_model(tmp_path / "b.onnx", extra_matmul=True)
    first = graphopt.front.api.tune(a, trials=4, max_trials_per_task=4, tuning_db=db, progress=None)
    assert first.trials_run > 0 and first.reused == 0
    assert all(t.best_ms is not None for t in first.tasks), first.tasks  # candidates built and measured
    second = graphopt.front.api.tune(b, trials=8, max_trials_per_task=4, tuning_db=db, progress=None)
    reused = [t.name for t in second.tasks if t.reused]
    assert any("conv2d" in name for name in reused), second.tasks
    assert any(s.reused and s.rule == "conv2d" for s in second.schedules), second.schedules  # graphopt's search too
    assert second.trials_run <= 4 * (len(second.tasks) - len(reused))
    compiled = graphopt.compile(b, tuning_db=db)
    x = np.random.default_rng(1).standard_normal((1, 4, 10, 10)).astype(np.float32)
    want = ort.InferenceSession(b, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(compiled(x)["y"], want, rtol=1e-3, atol=1e-4)


def test_bad_rpc_spec_and_missing_database(tmp_path):
    a = _conv_model(tmp_path / "a.onnx", extra_matmul=False)
    with pytest.raises(UsageError, match="HOST:PORT:KEY"):
        graphopt.front.api.tune(a, trials=1, tuning_db=tmp_path / "db", rpc="nohostport", progress=None)
    with pytest.raises(graphopt.GraphoptError, match="no tuning database"):
        graphopt.compile(a, tuning_db=tmp_path / "missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def _wait_for_servers(port: int, key: str, count: int, timeout: float = 60) -> None:
    from tvm import rpc

    deadline = time.time() + timeout
    while time.time() < deadline:
        queue = rpc.connect_tracker("127.0.0.1", port).summary().get("queue_info", {})
        if queue.get(key, {}).get("free", 0) >= count:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{count} RPC servers with key {key!r} did not register")


@pytest.mark.slow
def test_tuning_through_an_rpc_tracker_on_loopback(tmp_path):
    port = _free_port()
    env = {**os.environ, "TVM_NUM_THREADS": "1"}
    tracker = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                                "--port", str(port), "--port-end", str(port + 1)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers = []
    try:
        _wait_for_port(port)
        for _ in range(2):
            sport = _free_port()
            servers.append(subprocess.Popen(
                [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(sport),
                 "--port-end", str(sport + 1), "--tracker", f"127.0.0.1:{port}", "--key", "loopback"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for_servers(port, "loopback", 2)
        a = _conv_model(tmp_path / "a.onnx", extra_matmul=False)
        report = graphopt.front.api.tune(a, trials=4, max_trials_per_task=4, tuning_db=tmp_path / "db",
                                   rpc=f"127.0.0.1:{port}:loopback", progress=None)
        assert report.trials_run > 0
        assert all(t.best_ms is not None for t in report.tasks)
    finally:
        for p in [*servers, tracker]:
            p.terminate()
            p.wait(timeout=10)


def test_only_the_targets_tensor_intrinsics_are_registered():
    """Tuning for x86 registers x86's intrinsics (VNNI) and not CUDA's (30 s of imports on 2 cores)."""
    import tvm

    from graphopt.backends.tuning.intrinsics import module_for

    assert module_for(tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})) == "x86"
    assert module_for(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})) == "arm_cpu"
    assert module_for(tvm.target.Target({"kind": "cuda", "arch": "sm_80"})) == "cuda"
    code = (
        "import sys, tvm\n"
        "from graphopt.backends.tuning.intrinsics import register_for\n"
        "register_for(tvm.target.Target({'kind': 'llvm', 'mcpu': 'znver4'}))\n"
        "import tvm.s_tir.tensor_intrin\n"  # what MetaSchedule's TuneContext does
        "from tvm.s_tir import TensorIntrin\n"
        "assert TensorIntrin.get('dot_16x4_vnni') is not None\n"
        "print(sorted(m for m in sys.modules if m.startswith('tvm.s_tir.tensor_intrin.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own printed list
    assert "tvm.s_tir.tensor_intrin.x86" in loaded
    assert "tvm.s_tir.tensor_intrin.cuda" not in loaded
