"""Helpers to check a schedule rule end to end: one ONNX graph, compiled with and without schedules.

``build(onnx_model, shapes, scheduled=True)`` imports with TVM's ONNX frontend (weights as
constants), runs the same Relax passes as the compile pipeline (LegalizeOps → FuseOps → FuseTIR),
applies the default schedules, and returns a :class:`Built` to run or time. Used by the tests and
for developing rules on standalone workloads.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Built:
    vm: object
    report: dict  # {fused function: rule}
    names: list  # input names in order

    def __call__(self, feeds: dict) -> list[np.ndarray]:
        import tvm

        res = self.vm["main"](*[tvm.runtime.tensor(feeds[n]) for n in self.names])
        return [r.numpy() for r in ([res] if hasattr(res, "numpy") else list(res))]

    def time_ms(self, feeds: dict, number: int = 5, repeat: int = 3) -> float:
        import tvm

        args = [tvm.runtime.tensor(feeds[n]) for n in self.names]
        te = self.vm.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat)
        return min(te(*args).results) * 1e3


def host_target():
    """The x86 preset when it is available, else plain llvm for this host."""
    try:
        from graphopt.backends.targets import get_target

        return get_target("x86")
    except Exception:  # noqa: BLE001
        import tvm

        return tvm.target.Target({"kind": "llvm"})


def fused(onnx_model, shapes: dict, target=None):
    """The model as TVM's importer, legalization and fusion leave it: the PrimFuncs the rules schedule."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from graphopt.backends.schedules.features import as_target

    tvm_target = as_target(target if target is not None else host_target())
    mod = from_onnx(onnx_model, shapes, keep_params_in_input=False)
    seq = tvm.transform.Sequential([
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
        relax.transform.FuseOps(), relax.transform.FuseTIR(), relax.transform.DeadCodeElimination(),
    ])
    with tvm_target:
        return seq(mod)


def build(onnx_model, shapes: dict, *, scheduled: bool = True, target=None, choice: dict | None = None) -> Built:
    """Compile ``onnx_model`` with the default schedules (``choice``: decisions for every function, as a
    tuning record gives them) and wrap it for running against ORT."""
    import tvm
    from tvm import relax

    from graphopt.backends.schedules import apply_default_schedules
    from graphopt.backends.schedules.features import as_target

    target = target if target is not None else host_target()
    mod = fused(onnx_model, shapes, target)
    report: dict = {}
    if scheduled:
        mod = apply_default_schedules(mod, target, report=report,
                                      choices=None if choice is None else (lambda f, c: choice))
    ex = tvm.compile(mod, target=as_target(target))
    return Built(relax.VirtualMachine(ex, tvm.cpu()), report, list(shapes))


def ort_run(onnx_model, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(onnx_model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def single_node_model(op: str, inputs: dict, initializers: dict, out_shape=None, opset: int = 17, **attrs):
    """A one-node ONNX model: ``inputs`` {name: shape} are graph inputs, ``initializers`` {name: array}."""
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node(op, [*inputs, *initializers], ["y"], **attrs)
    graph = helper.make_graph(
        [node], f"{op.lower()}_case",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in initializers.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
