"""plot_pass_report writes a valid PNG from a real optimize report."""

from __future__ import annotations

import struct

import onnx_ir as ir
import onnx_ir.passes.common as common
import pytest
from onnx import TensorProto, helper

from graphopt.front import api
from graphopt.core.errors import UsageError
from graphopt.core.pipeline import PassRegistry
from graphopt.front.report import plot_pass_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    assert data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def _report() -> dict:

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["t"]), helper.make_node("Relu", ["t"], ["y"])],
        "g", [x], [y],
    )
    model = ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    reg = PassRegistry()
    reg.register("identity", common.IdentityEliminationPass)
    reg.register("unused", common.RemoveUnusedNodesPass)
    res = api.optimize(model, passes=["identity", "unused"], registry=reg)
    return res.report()


def test_png_written(tmp_path):
    report = _report()
    assert [p["name"] for p in report["passes"]] == ["identity", "unused"]
    out = tmp_path / "r.png"
    assert plot_pass_report(report, out) == out
    w, h = _png_size(out.read_bytes())
    assert w >= 400 and h >= 400
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".graphopt-")]


def test_empty_report_and_bad_input(tmp_path):
    out = tmp_path / "empty.png"
    plot_pass_report({"initial": {"nodes": 5, "parameter_bytes": 0}, "passes": []}, out)
    _png_size(out.read_bytes())
    with pytest.raises(UsageError):
        plot_pass_report({"passes": []}, tmp_path / "bad.png")
    with pytest.raises(UsageError):
        plot_pass_report({"initial": {"nodes": 1, "parameter_bytes": 1}, "passes": []}, tmp_path / "no" / "x.png")
    assert not (tmp_path / "bad.png").exists()


def test_cli_plot(tmp_path, capsys):
    from graphopt.front import cli
    from graphopt.core import io

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["t"]), helper.make_node("Relu", ["t"], ["y"])],
                          "g", [x], [y])
    src = io.save(ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])),
                  tmp_path / "m.onnx")
    png = tmp_path / "plot.png"
    assert cli.main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "-O1", "--plot", str(png), "-q"]) == 0
    _png_size(png.read_bytes())
