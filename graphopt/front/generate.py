"""Greedy decoding with a KV-cache decoder: the reference loop of ``graphopt generate``.

A decoder here is a model with an ``input_ids`` input (int64 ``[1, seq]``), cache inputs
``past_key_values.<k>`` (float ``[1, heads, past, head_dim]``) and, for each, an output ``present.<k>``
(``[1, heads, past + seq, head_dim]``), and a ``logits`` output ``[1, seq, vocab]``: the layout of
Hugging Face's decoder exports and of ``gen:gpt2``.

The loop: one prefill call with the whole prompt and an empty cache (``past = 0``), then one call per
new token with ``seq = 1`` and the previous call's ``present`` as ``past``; the next token is the
argmax of the last position's logits. A decoder compiled with its sequence dim fixed at 1 (a decode
bundle: every matmul has one static row, graphopt's fast path) reads the prompt one token per call
instead. Time to first token is the prefill call(s) plus the argmax; the per-token latency is each
later call plus its argmax. The same loop drives a compiled bundle and ONNX
Runtime (``step`` is any callable ``feeds -> {output: array}``).

A compiled decoder runs through ``device_step``: the caches it returns stay TVM tensors and go back in
as the next call's ``past`` without a copy to numpy and back (at past 600 on gen:gpt2 those copies
took half of a decode step); only the logits come to numpy. Its first call, on numpy inputs, is
checked as every bundle call is (names, dtypes, shapes, bounds).

``compile_plan`` picks what ``generate`` compiles an ONNX decoder into when no bounds are given: a
bundle whose sequence dim is symbolic and bounded by the prompt (the prompt in one call) and whose
cache dim is bounded by the request. Such a bundle's matmuls take a one-row path in each decode step
(backends/schedules/gemv.py), as fast as a decode bundle's static one-row matmuls.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from graphopt.core.errors import GraphoptError, UsageError

PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
_ORT_TYPES = {"float": "float32", "double": "float64"}  # ORT's type names that are not numpy's
Step = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a decoder's tokens, cache and logits are (``cache``: (past input, present output) pairs)."""

    ids: str
    logits: str
    cache: tuple[tuple[str, str], ...]
    cache_dims: dict  # past input -> (heads, head_dim, dtype)
    seq_dim: str | int | None  # the name of input_ids' dim 1 (symbolic) or its value
    past_dim: str | int | None
    vocab: int | None


def decoder_layout(inputs: Sequence[tuple], outputs: Sequence[str], where: str) -> Layout:
    """The layout of a model with ``inputs`` ``[(name, shape, dtype)]`` and ``outputs`` names; a model
    that is not such a decoder is refused with one line naming what is missing."""
    by_name = {n: (tuple(s), str(d)) for n, s, d in inputs}
    outs = set(outputs)
    if "input_ids" not in by_name:
        raise GraphoptError(f"{where}: not a decoder with a KV cache: it has no input 'input_ids' "
                            f"(inputs: {', '.join(by_name)})")
    ids_shape, ids_dtype = by_name["input_ids"]
    if len(ids_shape) != 2 or ids_dtype != "int64":
        raise GraphoptError(f"{where}: input 'input_ids' is {ids_dtype} of rank {len(ids_shape)}, expected int64 [1, seq]")
    if "logits" not in outs:
        raise GraphoptError(f"{where}: not a decoder with a KV cache: it has no output 'logits'")
    cache, dims, past_dim = [], {}, None
    for name, (shape, dtype) in by_name.items():
        if name == "input_ids":
            continue
        if not name.startswith(PAST_PREFIX):
            raise GraphoptError(f"{where}: input '{name}' is neither input_ids nor a {PAST_PREFIX}* cache; "
                                "graphopt generate feeds only those")
        present = PRESENT_PREFIX + name[len(PAST_PREFIX):]
        if present not in outs:
            raise GraphoptError(f"{where}: cache input '{name}' has no output '{present}' to carry it")
        if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            raise GraphoptError(f"{where}: cache input '{name}' has shape {list(shape)}, expected [1, heads, past, head_dim]")
        cache.append((name, present))
        dims[name] = (shape[1], shape[3], dtype)
        past_dim = shape[2]
    if not cache:
        raise GraphoptError(f"{where}: not a decoder with a KV cache: no {PAST_PREFIX}* inputs")
    return Layout("input_ids", "logits", tuple(cache), dims, ids_shape[1], past_dim, None)


@dataclasses.dataclass
class Trace:
    """One greedy decoding run: the new tokens, the seconds of the prefill and of each later step."""

    tokens: list[int]
    first_s: float
    steps_s: list[float]
    logits: list[np.ndarray] = dataclasses.field(default_factory=list)  # last position's, per call (if kept)

    def summary(self) -> dict:
        steps = sorted(self.steps_s)
        return {"tokens": self.tokens, "ttft_ms": self.first_s * 1e3,
                "token_ms_min": steps[0] * 1e3 if steps else None,
                "token_ms_median": statistics.median(steps) * 1e3 if steps else None,
                "tokens_per_s": len(steps) / sum(steps) if steps else None}


def check_request(layout: Layout, prompt: Sequence[int], max_new_tokens: int, bounds: Mapping[str, int],
                  where: str) -> None:
    """Refuse (one line) a prompt or a length the decoder cannot serve, before any call."""
    if not prompt:
        raise UsageError("--prompt-ids: give at least one token id")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise UsageError(f"--max-new-tokens {max_new_tokens}: must be a positive integer")
    if layout.vocab is not None:
        bad = [t for t in prompt if not 0 <= t < layout.vocab]
        if bad:
            raise UsageError(f"--prompt-ids: token id {bad[0]} is outside the vocabulary [0, {layout.vocab})")
    n = len(prompt)
    if layout.seq_dim == 1:  # a decode bundle: the prompt goes in one token per call
        needs = ((layout.past_dim, n + max_new_tokens - 2,
                  f"the prompt ({n} tokens) plus {max_new_tokens} new tokens needs a cache of {n + max_new_tokens - 2}"),)
    else:
        needs = ((layout.seq_dim, n, f"the prompt has {n} tokens"),
                 (layout.past_dim, n + max_new_tokens - 2,
                  f"the prompt ({n} tokens) plus {max_new_tokens} new tokens needs a cache of {n + max_new_tokens - 2}"))
    for dim, value, why in needs:
        if isinstance(dim, int):
            raise UsageError(f"{where}: input dim fixed at {dim}: generate needs a symbolic cache dim and a "
                             "symbolic or 1-token sequence dim (compile with --max seq=N --max past=N, or "
                             "--input-shape input_ids:1,1 --max past=N)")
        bound = bounds.get(dim) if dim is not None else None
        if bound is not None and value > bound:
            raise UsageError(f"{where}: {why}, the bundle serves {dim} up to {bound} "
                             f"(compile with --max {dim}={value} or more)")


def greedy(step: Step, layout: Layout, prompt: Sequence[int], max_new_tokens: int, *,
           keep_logits: bool = False) -> Trace:
    """Greedy decoding (see the module docstring). A decoder whose sequence dim is fixed at 1 takes the
    prompt one token per call: its time to first token covers those calls."""
    chunks = [[t] for t in prompt] if layout.seq_dim == 1 else [list(prompt)]
    cache = {name: np.zeros((1, heads, 0, head_dim), dtype)
             for name, (heads, head_dim, dtype) in layout.cache_dims.items()}
    tokens, times, kept = [], [], []
    t0 = time.perf_counter()
    for i in range(len(chunks) - 1 + max_new_tokens):
        ids = chunks[i] if i < len(chunks) else [tokens[-1]]
        out = step({layout.ids: np.asarray([ids], np.int64), **cache})
        cache = {past: out[present] for past, present in layout.cache}
        if i < len(chunks) - 1:
            continue  # still reading the prompt
        last = _host(out[layout.logits])[0, -1]
        tokens.append(int(np.argmax(last)))
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        if keep_logits:
            kept.append(np.array(last))
    return Trace(tokens, times[0], times[1:], kept)


def _host(value) -> np.ndarray:
    """A step's output as a numpy array (a TVM tensor is copied out)."""
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def device_step(runner, to_device: Callable[[np.ndarray], object]) -> Step:
    """A ``step`` running a compiled decoder's ``runner`` (a loaded bundle's or a compiled module's)
    whose outputs stay TVM tensors: ``greedy`` hands the caches back as the next call's inputs on the
    device. ``to_device`` makes a device tensor of a numpy array. A call on numpy inputs only is
    checked first as every bundle call is (the first call of a decoding; later calls take the
    library's own outputs as caches, and ``greedy``'s token ids).

    Each call is counted by ``runner.note_call`` as the runner's own calls are: it frees the runtime's
    pooled buffers not in use now and then (the pool keeps a freed buffer for a later one of the same
    size, and the caches grow by a row a step, so no size comes back: gen:gpt2 int8, 500 tokens, 9.7 GB
    resident without it, 1.1 GB with it)."""
    names, outputs = runner.input_names, runner.output_names
    params = list(getattr(runner, "_params", ()))

    def step(feeds: dict) -> dict:
        runner.note_call()
        if all(isinstance(v, np.ndarray) for v in feeds.values()):
            try:
                runner.check_inputs((), feeds)
            except ValueError as e:  # the loader's InputError: one line naming the input
                raise GraphoptError(str(e)) from None
        args = [to_device(np.ascontiguousarray(feeds[n])) if isinstance(feeds[n], np.ndarray) else feeds[n]
                for n in names]
        result = runner.vm["main"](*args, *params)
        return dict(zip(outputs, [result] if hasattr(result, "numpy") else list(result)))

    return step


def compile_plan(layout: Layout, prompt: Sequence[int], max_new_tokens: int,
                 dim_bounds: Mapping[str, int] | None, where: str) -> tuple[list[str] | None, dict[str, int]]:
    """``(input_shapes, dim_bounds)`` to compile an ONNX decoder with for this request: the given
    bounds (a decode bundle, ``input_ids:1,1``, unless they bound the sequence dim), else the
    sequence dim bounded by the prompt and the cache dim by prompt + new tokens (a decode bundle
    when the model leaves its sequence dim unnamed)."""
    if not isinstance(layout.past_dim, str):
        raise UsageError(f"{where}: name the cache dim of the past inputs (dim_param) to generate with it")
    if dim_bounds:
        bounds = dict(dim_bounds)
    else:
        bounds = {layout.past_dim: len(prompt) + max_new_tokens - 1}
        if isinstance(layout.seq_dim, str) and layout.seq_dim != layout.past_dim:
            bounds[layout.seq_dim] = max(1, len(prompt))
    return (None if layout.seq_dim in bounds else ["input_ids:1,1"]), bounds


def ort_decoder(onnx_path: str, threads: int | None = None) -> tuple[Step, Layout]:
    """A ``step`` running ``onnx_path`` in ONNX Runtime (CPU), and the model's layout."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    inputs = [(i.name, [d if isinstance(d, (int, str)) else None for d in i.shape],
               _ORT_TYPES.get(i.type[len("tensor("):-1], i.type[len("tensor("):-1]))
              for i in sess.get_inputs()]
    layout = decoder_layout(inputs, names, onnx_path)
    vocab = next((o.shape[-1] for o in sess.get_outputs() if o.name == layout.logits), None)
    layout = dataclasses.replace(layout, vocab=vocab if isinstance(vocab, int) else None)
    return (lambda feeds: dict(zip(names, sess.run(None, feeds)))), layout


def parse_ids(text: str) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]``; anything else is a UsageError naming the option."""
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise UsageError(f"--prompt-ids {text!r}: expected comma-separated integer token ids, e.g. 464,3290,318") from None
    if not ids:
        raise UsageError("--prompt-ids: give at least one token id")
    return ids
