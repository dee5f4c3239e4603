"""A user's own metric: ``module:function`` or ``path/to/file.py:function``, called as ``function(run)``.

``run(feeds) -> {output name: array}`` runs the model under test; the function returns a score in
[0, 1], higher is better. A function that raises, or returns anything but a finite number in [0, 1],
is a GraphoptError naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable
from typing import Any

from graphopt.core.errors import GraphoptError, UsageError
from graphopt.compression.evaluate.base import Metric, Run


def load_function(spec: str) -> Callable[[Run], float]:
    """The callable named by ``module:function`` (the current directory is searched first) or
    ``file.py:function``."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise UsageError(f"--metric {spec}: expected a metric name or MODULE:FUNCTION")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise UsageError(f"--metric {spec}: no such file {module_name}")
            loader_spec = importlib.util.spec_from_file_location("graphopt_user_metric_" + os.path.basename(module_name)[:-3],
                                                                 module_name)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            added = os.getcwd() not in sys.path
            if added:
                sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(module_name)
            finally:
                if added:
                    sys.path.remove(os.getcwd())
    except UsageError:
        raise
    except ImportError as e:
        raise UsageError(f"--metric {spec}: cannot import {module_name} ({e})") from None
    except Exception as e:  # noqa: BLE001 - the user's module failed while loading
        raise GraphoptError(f"--metric {spec}: importing {module_name} raised {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UsageError(f"--metric {spec}: {module_name} has no function {attr}")
    return fn


class CustomMetric(Metric):
    """A user's callable ``fn(run) -> float`` with its failures turned into GraphoptErrors."""

    def __init__(self, fn: Callable[[Run], float], name: str | None = None) -> None:
        self.fn = fn
        self.name = name or f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"

    def measure(self, run: Run, *, progress: bool = False) -> dict[str, Any]:
        try:
            value = self.fn(run)
        except GraphoptError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the user's metric is reported as theirs
            raise GraphoptError(f"metric {self.name} raised {type(e).__name__}: {e}") from None
        try:
            score = float(value)
        except (TypeError, ValueError):
            raise GraphoptError(f"metric {self.name} returned {type(value).__name__} {value!r}, "
                                "expected a number in [0, 1]") from None
        if not math.isfinite(score) or not 0.0 <= score <= 1.0:
            raise GraphoptError(f"metric {self.name} returned {score}, expected a number in [0, 1]")
        return {"score": score}
