"""Transformers at realistic scale with deterministic random weights: ``gen:bert-base``, ``gen:gpt2``,
``gen:gpt2-large`` (no download; built once and cached).

Weights are drawn from a numpy Generator seeded by the model's seed and the tensor's name (so each
tensor is the same whatever order it is drawn in): matrices ~ normal(0, 0.02) like GPT-2's and BERT's
initialization (GPT-2's residual projections scaled by 1/sqrt(2 * layers); its position embeddings
~ normal(0, 0.05), so that greedy decoding does not repeat one token), biases ~ normal(0, 0.01),
LayerNorm gains 1 + normal(0, 0.02) and shifts normal(0, 0.01): activations stay in the range of a
trained model's (unit-variance residual stream, logits of a few units).

* **BERT** (:func:`build_bert`): the sentence encoder of ``models/minilm.py`` (the same graph builder)
  at BERT-base's shapes; inputs ``input_ids``/``attention_mask`` int64 ``[batch, seq]``, output
  ``sentence_embedding`` ``[batch, hidden]``.
* **GPT-2** (:func:`build_gpt2`): a pre-LayerNorm decoder with a KV cache, tied embedding (logits =
  final hidden state times the token embedding transposed), tanh GELU. Inputs ``input_ids`` int64
  ``[1, seq]`` and ``past_key_values.{i}.key|value`` float32 ``[1, heads, past, head_dim]``; outputs
  ``logits`` ``[1, seq, vocab]`` and ``present.{i}.key|value`` ``[1, heads, past + seq, head_dim]``
  (past concatenated with this call's keys/values). Token positions are ``past + 0 .. seq - 1``; the
  causal mask lets query ``i`` see keys ``0 .. past + i``, so one graph serves a prefill (any ``seq``)
  and a decode step (``seq = 1``). ``past`` may be 0 in ONNX Runtime.

Models over :data:`EXTERNAL_BYTES` (``gen:gpt2-large``, 3.1 GB) keep their weights in one external data
file beside the ``.onnx`` (``<name>.onnx.data``, offsets aligned to 4 KiB), written tensor by tensor as
they are drawn: building one never holds more than the largest tensor in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
GENERATOR_VERSION = 3  # part of the cached file's name: bump when the graph or the weights change
EXTERNAL_BYTES = 1 << 30  # weights over this go to an external data file
_ALIGN = 4096
_INLINE_BYTES = 1024  # smaller tensors stay in the proto even in an external-data model


@dataclasses.dataclass(frozen=True)
class Config:
    """A generated transformer's shapes (``kind``: "bert" or "gpt2")."""

    kind: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    positions: int  # position embedding rows: the longest sequence (past + seq) the model serves
    seed: int = 0
    ln_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def parameters(self) -> int:
        h, f, n = self.hidden, self.ffn, self.layers
        per_layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h
        embed = (self.vocab + self.positions) * h + 2 * h + (2 * h if self.kind == "bert" else 0)
        return n * per_layer + embed


CONFIGS: dict[str, Config] = {
    "gen:bert-base": Config("bert", 12, 768, 12, 3072, 30522, 512, seed=1, ln_eps=1e-12),
    "gen:gpt2": Config("gpt2", 12, 768, 12, 3072, 50257, 1024, seed=2),
    "gen:gpt2-large": Config("gpt2", 36, 1280, 20, 5120, 50257, 1024, seed=3),
}


def file_name(spec: str, config: Config | None = None) -> str:
    """``gen-gpt2-<hash>.onnx``: the hash covers the config and :data:`GENERATOR_VERSION`."""
    cfg = config or CONFIGS[spec]
    key = json.dumps([GENERATOR_VERSION, dataclasses.asdict(cfg)], sort_keys=True).encode()
    return f"{spec.replace(':', '-')}-{hashlib.sha256(key).hexdigest()[:12]}.onnx"


class _Weights:
    """Draws named tensors and turns them into initializers: in the proto, or appended to ``data``."""

    def __init__(self, seed: int, data: Path | None):
        self.seed, self.data = seed, data
        self.inits: list[TensorProto] = []
        self._file = open(data, "wb") if data is not None else None  # noqa: SIM115 - closed by close()
        self._offset = 0

    def _rng(self, name: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(name.encode())])

    def normal(self, name: str, shape, std: float, mean: float = 0.0) -> str:
        a = self._rng(name).standard_normal(shape, dtype=np.float32)
        a *= np.float32(std)
        if mean:
            a += np.float32(mean)
        return self.add(name, a)

    def add(self, name: str, a: np.ndarray) -> str:
        a = np.ascontiguousarray(a)
        if self._file is None or a.nbytes <= _INLINE_BYTES:
            self.inits.append(numpy_helper.from_array(a, name))
            return name
        pad = -self._offset % _ALIGN
        self._file.write(b"\0" * pad)
        self._offset += pad
        self._file.write(a.data)
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(a.dtype), dims=a.shape,
                        data_location=TensorProto.EXTERNAL)
        for k, v in (("location", self.data.name), ("offset", str(self._offset)), ("length", str(a.nbytes))):
            t.external_data.add(key=k, value=v)
        self._offset += a.nbytes
        self.inits.append(t)
        return name

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


class _Graph:
    def __init__(self, w: _Weights):
        self.w, self.nodes, self._n, self._consts = w, [], 0, set()

    def const(self, name: str, value) -> str:
        """A small constant, added once under ``name``."""
        if name not in self._consts:
            self._consts.add(name)
            self.w.add(name, np.asarray(value))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        self._n += 1
        out = out or f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"{op_type}_{self._n}", **attrs))
        return out

    def linear(self, x: str, prefix: str, n_in: int, n_out: int, std: float = 0.02) -> str:
        y = self.op("MatMul", x, self.w.normal(f"{prefix}.weight", (n_in, n_out), std))
        return self.op("Add", y, self.w.normal(f"{prefix}.bias", (n_out,), 0.01))

    def layer_norm(self, x: str, prefix: str, n: int, eps: float) -> str:
        return self.op("LayerNormalization", x, self.w.normal(f"{prefix}.weight", (n,), 0.02, mean=1.0),
                       self.w.normal(f"{prefix}.bias", (n,), 0.01), axis=-1, epsilon=eps)


def _gelu_tanh(g: _Graph, x: str, p: str) -> str:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's GELU."""
    cube = g.op("Mul", g.op("Mul", x, x), x)
    inner = g.op("Add", x, g.op("Mul", cube, g.const(f"{p}.c", np.array(0.044715, np.float32))))
    t = g.op("Tanh", g.op("Mul", inner, g.const(f"{p}.k", np.array(np.sqrt(2 / np.pi), np.float32))))
    half_x = g.op("Mul", x, g.const(f"{p}.half", np.array(0.5, np.float32)))
    return g.op("Mul", half_x, g.op("Add", t, g.const(f"{p}.one", np.array(1.0, np.float32))))


def _gpt2_layer(g: _Graph, x: str, mask: str, i: int, cfg: Config) -> str:
    p, h, d = f"h.{i}", cfg.hidden, cfg.head_dim
    split = g.const(f"{p}.split_heads", np.array([0, 0, cfg.heads, d], np.int64))
    a = g.layer_norm(x, f"{p}.ln_1", h, cfg.ln_eps)
    q, k, v = (g.op("Transpose", g.op("Reshape", g.linear(a, f"{p}.attn.{n}", h, h), split), perm=[0, 2, 1, 3])
               for n in ("q", "k", "v"))
    k = g.op("Concat", f"past_key_values.{i}.key", k, axis=2, out=f"present.{i}.key")
    v = g.op("Concat", f"past_key_values.{i}.value", v, axis=2, out=f"present.{i}.value")
    scale = g.const(f"{p}.scale", np.array(1.0 / np.sqrt(d), np.float32))
    scores = g.op("Add", g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), scale), mask)
    ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)
    merge = g.const(f"{p}.merge_heads", np.array([0, 0, h], np.int64))
    ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3]), merge)
    proj_std = 0.02 / np.sqrt(2 * cfg.layers)
    x = g.op("Add", x, g.linear(ctx, f"{p}.attn.c_proj", h, h, proj_std))
    m = g.layer_norm(x, f"{p}.ln_2", h, cfg.ln_eps)
    m = g.linear(_gelu_tanh(g, g.linear(m, f"{p}.mlp.c_fc", h, cfg.ffn), f"{p}.gelu"), f"{p}.mlp.c_proj",
                 cfg.ffn, h, proj_std)
    return g.op("Add", x, m)


def _ones(g: _Graph, x: str) -> str:
    """int64 ones of ``x``'s shape, whatever its values (no shape arithmetic: symbolic dims stay symbolic)."""
    flags = x if x == "input_ids" else g.op("Cast", g.op("IsNaN", x), to=TensorProto.INT64)
    return g.op("Add", g.op("Mul", flags, g.const("zero_i64", np.array(0, np.int64))),
                g.const("one_i64", np.array(1, np.int64)))


def _embed_and_mask(g: _Graph, w: _Weights, wte: str, cfg: Config) -> tuple[str, str]:
    """Token + position embeddings [1, seq, hidden] and the additive causal mask [1, 1, seq, past + seq].

    Positions come from running counts, not from Shape/Range (symbolic dims stay symbolic): the keys
    are ``0 .. past + seq - 1`` (a CumSum over ones shaped like layer 0's past keys and this call's
    tokens), the tokens ``past .. past + seq - 1``; a past of length 0 works (the count of the past is
    taken over the past plus one constant slot).
    """
    one = g.const("one_i64", np.array(1, np.int64))
    q_ones = _ones(g, "input_ids")  # [1, seq]
    first = g.op("Slice", "past_key_values.0.key", g.const("k_start", np.array([0, 0], np.int64)),
                 g.const("k_end", np.array([1, 1], np.int64)), g.const("k_axes", np.array([1, 3], np.int64)))
    p_ones = _ones(g, first)  # [1, 1, past, 1]
    axes03 = g.const("axes03", np.array([0, 3], np.int64))
    k_ones = g.op("Concat", p_ones, g.op("Unsqueeze", q_ones, axes03), axis=2)  # [1, 1, total, 1]
    k_pos = g.op("Transpose", g.op("Sub", g.op("CumSum", k_ones, g.const("axis2", np.array(2, np.int64))), one),
                 perm=[0, 1, 3, 2])  # [1, 1, 1, total]
    slot = g.const("one_slot", np.ones((1, 1, 1, 1), np.int64))
    past = g.op("Sub", g.op("ReduceSum", g.op("Concat", p_ones, slot, axis=2), keepdims=0), one)
    q_pos = g.op("Add", g.op("Sub", g.op("CumSum", q_ones, g.const("axis1", np.array(1, np.int64))), one), past)
    future = g.op("Greater", k_pos, g.op("Unsqueeze", q_pos, axes03))  # [1, 1, seq, total]
    # positions past the table read its last row (ONNX Runtime refuses them; a compiled Gather would read
    # out of bounds): bundles are compiled with past + seq <= cfg.positions
    q_pos = g.op("Min", q_pos, g.const("last_position", np.array(cfg.positions - 1, np.int64)))
    mask = g.op("Where", future, g.const("masked", np.array(-1e9, np.float32)),
                g.const("zero_f32", np.array(0.0, np.float32)))
    x = g.op("Add", g.op("Gather", wte, "input_ids", axis=0),
             g.op("Gather", w.normal("wpe", (cfg.positions, cfg.hidden), 0.05), q_pos, axis=0))
    return x, mask


def build_gpt2(cfg: Config, data: Path | None = None) -> onnx.ModelProto:
    """The GPT-2 decoder with a KV cache (see the module docstring); weights in ``data`` when given."""
    w = _Weights(cfg.seed, data)
    try:
        g = _Graph(w)
        h = cfg.hidden
        wte = w.normal("wte", (cfg.vocab, h), 0.02)
        x, mask = _embed_and_mask(g, w, wte, cfg)
        for i in range(cfg.layers):
            x = _gpt2_layer(g, x, mask, i, cfg)
        x = g.layer_norm(x, "ln_f", h, cfg.ln_eps)
        g.op("MatMul", x, g.op("Transpose", wte, perm=[1, 0]), out="logits")
    finally:
        w.close()
    kv = [1, cfg.heads, "past", cfg.head_dim]
    kv_out = [1, cfg.heads, "past_plus_seq", cfg.head_dim]
    names = [f"{i}.{part}" for i in range(cfg.layers) for part in ("key", "value")]
    graph = helper.make_graph(
        g.nodes, "gen_gpt2",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])]
        + [helper.make_tensor_value_info(f"past_key_values.{n}", TensorProto.FLOAT, kv) for n in names],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", cfg.vocab])]
        + [helper.make_tensor_value_info(f"present.{n}", TensorProto.FLOAT, kv_out) for n in names],
        w.inits)
    return _finish(graph, external=data is not None)


def build_bert(cfg: Config) -> onnx.ModelProto:
    """BERT with ``cfg``'s shapes: the sentence encoder of ``models/minilm.py`` on generated weights."""
    from graphopt.models.minilm import build_onnx

    w, h, f = _Weights(cfg.seed, None), cfg.hidden, cfg.ffn
    weights: dict[str, np.ndarray] = {}

    def draw(name, shape, std, mean=0.0):
        a = w._rng(name).standard_normal(shape, dtype=np.float32) * np.float32(std)
        weights[name] = a + np.float32(mean) if mean else a

    def linear(prefix, n_in, n_out):  # torch layout [out, in], as build_onnx reads it
        draw(f"{prefix}.weight", (n_out, n_in), 0.02)
        draw(f"{prefix}.bias", (n_out,), 0.01)

    def norm(prefix):
        draw(f"{prefix}.weight", (h,), 0.02, mean=1.0)
        draw(f"{prefix}.bias", (h,), 0.01)

    draw("embeddings.word_embeddings.weight", (cfg.vocab, h), 0.02)
    draw("embeddings.position_embeddings.weight", (cfg.positions, h), 0.02)
    draw("embeddings.token_type_embeddings.weight", (2, h), 0.02)
    norm("embeddings.LayerNorm")
    for i in range(cfg.layers):
        p = f"encoder.layer.{i}"
        for n in ("query", "key", "value"):
            linear(f"{p}.attention.self.{n}", h, h)
        linear(f"{p}.attention.output.dense", h, h)
        norm(f"{p}.attention.output.LayerNorm")
        linear(f"{p}.intermediate.dense", h, f)
        linear(f"{p}.output.dense", f, h)
        norm(f"{p}.output.LayerNorm")
    model = build_onnx(weights, {"hidden_size": h, "num_attention_heads": cfg.heads,
                                 "num_hidden_layers": cfg.layers, "layer_norm_eps": cfg.ln_eps})
    model.graph.name = "gen_bert"
    model.producer_name = "graphopt.models.generated"
    return model


def _finish(graph: onnx.GraphProto, *, external: bool) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="graphopt.models.generated")
    model.ir_version = 8
    if not external:
        onnx.checker.check_model(model)
    return model


def build(cfg: Config, path: Path) -> None:
    """Write the model of ``cfg`` to ``path`` (external data beside it when over EXTERNAL_BYTES)."""
    if cfg.kind == "bert":
        onnx.save_model(build_bert(cfg), str(path))
        return
    if cfg.parameters() * 4 <= EXTERNAL_BYTES:
        onnx.save_model(build_gpt2(cfg), str(path))
        return
    data = path.with_name(path.name + ".data")
    model = build_gpt2(cfg, data)
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))


def cached_onnx(spec: str) -> Path:
    """The cached ``.onnx`` of a generated model (built once, under a lock; files written atomically)."""
    from graphopt.core.io import file_lock
    from graphopt.models.cache import cache_dir

    cfg = CONFIGS[spec]
    directory = cache_dir() / "generated"
    path = directory / file_name(spec, cfg)
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    with file_lock(directory / f"{path.stem}.lock"):
        if path.exists():
            return path
        tmp = directory / f".{path.stem}.building"
        tmp.mkdir(exist_ok=True)
        part = tmp / path.name
        build(cfg, part)  # the external data file is named after the final .onnx: moved first
        data = part.with_name(part.name + ".data")
        if data.exists():
            os.replace(data, directory / data.name)
        os.replace(part, path)
        tmp.rmdir()
    return path
