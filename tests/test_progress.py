"""Progress bars: drawn on a terminal (a pseudo-terminal here), absent from pipes and log files, the
same for every long command (calibration, evaluation, conformance, tuning)."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.front import cli
from graphopt.core.progress import Bar, shown, wrap


class Terminal(io.StringIO):
    """Put in place of sys.stderr: a stream that says it is a terminal; ``text()`` is what was drawn."""

    def __init__(self, monkeypatch) -> None:
        super().__init__()
        monkeypatch.setattr(sys, "stderr", self)

    def isatty(self) -> bool:
        return True

    def text(self) -> str:
        return self.getvalue()


def test_bar_draws_count_rate_and_time_left_on_a_terminal(monkeypatch):
    term = Terminal(monkeypatch)
    assert shown() and not shown(enabled=False)
    with Bar(4, desc="calibrating", unit="sample") as bar:
        assert bar.active
        for _ in range(4):
            time.sleep(0.12)  # tqdm redraws at most every 0.1 s
            bar.update()
        bar.note("2 failed")
    seen = term.text()
    assert "calibrating" in seen and "4/4" in seen and "sample" in seen and "2 failed" in seen
    assert "<" in seen  # tqdm's "elapsed<left" estimate


def test_no_bar_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not shown()
    with Bar(3, desc="x") as bar:
        assert not bar.active
        bar.update(3)
        bar.note("nothing")
        bar.set_total(5)
        bar.write("a line the command prints on purpose")
    assert list(wrap(range(5), total=5, desc="y")) == [0, 1, 2, 3, 4]
    assert sys.stderr.getvalue() == ""
    assert capsys.readouterr().out == "a line the command prints on purpose\n"


def test_disabled_bar_stays_off_on_a_terminal(monkeypatch):
    term = Terminal(monkeypatch)
    assert list(wrap("abc", total=3, desc="quiet", enabled=False)) == ["a", "b", "c"]
    assert "quiet" not in term.text()


def _conv_relu(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((8, 4, 3, 3)) * 0.3).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("terminal", [False, True])
def test_calibration_bar_only_on_a_terminal(tmp_path, monkeypatch, capsys, terminal):
    model = _conv_relu(tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).standard_normal((6, 1, 4, 8, 8)).astype(np.float32))
    term = Terminal(monkeypatch) if terminal else None
    code = cli.main(["optimize", str(model), "--quantize", "int8", "--calibration", str(tmp_path / "calib.npz"),
                     "-o", str(tmp_path / "q.onnx")])
    assert code == 0
    err = term.text() if terminal else capsys.readouterr().err
    assert ("/6 [" in err) == terminal, err  # "n/6 [elapsed<left, rate]"
    assert ("\r" in err) == terminal


def test_tune_draws_a_search_bar_with_its_lines_above_it(tmp_path, monkeypatch, capsys):
    import graphopt

    model = _conv_relu(tmp_path / "m.onnx")
    term = Terminal(monkeypatch)
    graphopt.front.api.tune(model, trials=0, search_candidates=2, tuning_db=tmp_path / "db")
    seen = term.text()
    assert "schedule search" in seen and "function" in seen, seen
    assert "schedule search:" in capsys.readouterr().out  # the command's own lines still go to stdout
