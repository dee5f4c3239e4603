"""The one exception type for problems a user can cause.

Anything raised as :class:`GraphoptError` (or a subclass) is a user-facing problem: bad file,
bad option, unsupported op. The CLI prints its message on one line and exits with code 2.
Any other exception is a bug in graphopt and exits with code 1.
"""

from __future__ import annotations


class GraphoptError(Exception):
    """A problem with the user's input: the message names the file, node, op, shape or option."""


class ModelLoadError(GraphoptError):
    """The file is missing, is not ONNX, or fails onnx.checker."""


class VerificationError(GraphoptError):
    """The graph breaks an invariant; the message names the node and value."""

    def __init__(self, message: str, *, node: str | None = None, value: str | None = None):
        super().__init__(message)
        self.node = node
        self.value = value


class ShapeError(GraphoptError):
    """An --input-shape names no input, has the wrong rank, or a shape cannot be resolved."""


class PassError(GraphoptError):
    """A pass failed or left the graph broken; the message names the pass."""

    def __init__(self, message: str, *, pass_name: str | None = None):
        super().__init__(message)
        self.pass_name = pass_name


class UnsupportedError(GraphoptError):
    """An op, dtype or feature that graphopt does not support (yet); the message lists them."""


class UsageError(GraphoptError):
    """A bad option or combination of options."""
