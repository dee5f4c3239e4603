"""graphopt: an ahead-of-time graph optimizer and compiler for ONNX models.

    import graphopt
    model = graphopt.load("model.onnx", input_shapes=["x:1,3,224,224"])
    result = graphopt.optimize(model, opt_level=3)
    graphopt.save(result.model, "model.opt.onnx")
"""

__version__ = "0.1.0"

from graphopt.front.api import compile, inspect, list_passes, load, load_bundle, optimize, save  # noqa: E402
from graphopt.core.errors import (  # noqa: E402
    GraphoptError,
    ModelLoadError,
    PassError,
    ShapeError,
    UnsupportedError,
    UsageError,
    VerificationError,
)
from graphopt.core.pipeline import PassContext, PassRegistry  # noqa: E402
from graphopt.passes import default_registry  # noqa: E402

__all__ = [
    "GraphoptError",
    "ModelLoadError",
    "PassContext",
    "PassError",
    "PassRegistry",
    "ShapeError",
    "UnsupportedError",
    "UsageError",
    "VerificationError",
    "compile",
    "default_registry",
    "inspect",
    "list_passes",
    "load",
    "load_bundle",
    "optimize",
    "save",
]
