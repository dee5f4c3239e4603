"""Models given to ``graphopt serve`` as ONNX are compiled at start-up into a cache of bundles.

The key is the sha256 of the model's bytes (external data files included), the target, the options
(opt level, input shapes, batch) and the graphopt/TVM versions: a second start with the same model and
options loads the bundle instead of compiling. Entries are ordinary bundles, written atomically, so
two servers starting at once cannot leave a half-written one; an entry that fails its checks is
compiled again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import onnx
import onnx_ir as ir

from graphopt.front import api
from graphopt.core.errors import GraphoptError, UsageError

BATCH_DIM = "graphopt_batch"


def default_cache_dir() -> Path:
    root = os.environ.get("GRAPHOPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "graphopt")
    return Path(root) / "serve"


def model_sha256(path: Path) -> str:
    """sha256 over the model file and every external data file it names, in order."""
    h = hashlib.sha256()
    files = [path]
    try:
        proto = onnx.load(str(path), load_external_data=False)
        tensors = [*proto.graph.initializer, *(a.t for n in proto.graph.node for a in n.attribute if a.HasField("t"))]
        locations = {e.value for t in tensors for e in t.external_data if e.key == "location"}
        files += [path.parent / loc for loc in sorted(locations)]
    except Exception:  # noqa: BLE001 - not loadable: compiling it reports the problem with its name
        pass
    for f in files:
        h.update(str(f.relative_to(path.parent) if f != path else "").encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def cache_key(path: Path, *, target: str, opt_level: int, input_shapes, max_batch: int) -> str:
    import graphopt
    from graphopt.front import api

    parts = {"model": model_sha256(path), "target": target, "opt_level": opt_level,
             "input_shapes": sorted(input_shapes or []), "max_batch": max_batch,
             "graphopt": graphopt.__version__, "tvm": api.runtime_version()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def batched_model(source, input_shapes, max_batch: int):
    """The model with axis 0 of every data input made the batch, fixed at ``max_batch``; and its shapes."""
    from graphopt.core.shapes import parse_fixed_input_shapes

    model = api.load(source)
    given = parse_fixed_input_shapes(input_shapes or api.input_shapes_for(str(source)) or [],
                                     purpose="graphopt serve")
    shapes = []
    for v in model.graph.inputs:
        if v.const_value is not None:
            continue
        dims = given.get(v.name) or (list(v.shape) if v.shape is not None else None)
        if not dims or any(not isinstance(d, int) for d in list(dims)[1:]):
            raise UsageError(f"--max-batch: input '{v.name}' has shape {dims}: give its other dims with "
                             f"--input-shape {v.name}:{max_batch},D1,...")
        v.shape = ir.Shape([BATCH_DIM, *list(dims)[1:]])
        shapes.append(f"{v.name}:" + ",".join(map(str, [max_batch, *list(dims)[1:]])))
    return model, shapes


def compiled_bundle(source: str, *, target: str = "x86", opt_level: int = 2, input_shapes=(),
                    max_batch: int = 0, cache_dir: str | os.PathLike | None = None,
                    log=print):
    """The loaded bundle for ``source`` (an ONNX file or a bundled model name), compiled if not cached."""
    path = api.resolve_model_path(source)
    if not path.is_file():
        raise UsageError(f"{source}: no such model file or bundle directory")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--cache-dir {root}: cannot create it ({e.strerror})") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise UsageError(f"--cache-dir {root}: not writable")
    entry = root / cache_key(path, target=target, opt_level=opt_level, input_shapes=input_shapes,
                             max_batch=max_batch)
    if (entry / "manifest.json").is_file():
        try:
            module = api.load_bundle(entry)
            log(f"{source}: compiled bundle from the cache {entry}")
            return module
        except GraphoptError as e:
            log(f"{source}: cached bundle {entry} refused ({e}); compiling again")
    log(f"{source}: compiling for {target} (cached in {entry})")
    if max_batch:
        model, shapes = batched_model(str(source), input_shapes, max_batch)
        api.compile(model, target=target, output=entry, opt_level=opt_level, input_shapes=shapes)
    else:
        api.compile(str(source), target=target, output=entry, opt_level=opt_level, input_shapes=list(input_shapes) or None)
    return api.load_bundle(entry)


def batch_sizes(max_batch: int) -> list[int]:
    """The batches compiled for ``--max-batch``: powers of two below it, and itself."""
    return sorted({*(1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch), max_batch})


def compiled_buckets(source: str, *, max_batch: int, **kw) -> dict:
    """{batch: loaded bundle} for every size of ``batch_sizes(max_batch)``, each compiled once into the cache."""
    return {b: compiled_bundle(source, max_batch=b, **kw) for b in batch_sizes(max_batch)}
