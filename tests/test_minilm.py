"""all-MiniLM-L6-v2 built from its real weights (models/minilm.py) and its WordPiece tokenizer.

Reference: the sentence-transformers quickstart prints, for this model and the three sentences of
``QUICKSTART``, the cosine similarities [[1, 0.6660, 0.1046], [0.6660, 1, 0.1411], [0.1046, 0.1411, 1]].
The graph run in ONNX Runtime must give those (to the 4 printed decimals) and rank related
sentences above unrelated ones in a small retrieval.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphopt import models
from graphopt.core.errors import GraphoptError
from graphopt.models import minilm
from graphopt.models.wordpiece import WordPiece

QUICKSTART = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
QUICKSTART_COSINE = np.array([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])

# (query, its relevant document); every other document is unrelated to it
RETRIEVAL = [
    ("How do I bake bread at home?", "Mix flour, water, yeast and salt, let the dough rise, then bake it in a hot oven."),
    ("What is the capital of France?", "Paris is the capital and largest city of France."),
    ("Which planet is closest to the sun?", "Mercury is the smallest planet and the nearest one to the Sun."),
    ("How can I fix a flat bicycle tire?", "Remove the wheel, patch the punctured inner tube and pump it up again."),
    ("Symptoms of the common cold", "A runny nose, sneezing and a sore throat are typical signs of a cold."),
]


@pytest.fixture(scope="module")
def tok() -> WordPiece:
    return minilm.tokenizer()


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(str(models.resolve("minilm:l6")), providers=["CPUExecutionProvider"])


def _embed(session, tok, texts):
    ids, mask = tok.batch(texts)
    return session.run(None, {"input_ids": ids, "attention_mask": mask})[0]


def test_graph_is_symbolic_and_cached():
    path = models.resolve("minilm:l6")
    assert models.entry("minilm:l6").sha256[:16] in path.name
    assert models.resolve("minilm:l6") == path  # built once
    m = onnx.load(str(path), load_external_data=False)
    assert m.opset_import[0].version == 17
    for v in m.graph.input:
        assert [d.dim_param for d in v.type.tensor_type.shape.dim] == ["batch", "seq"]
        assert v.type.tensor_type.elem_type == onnx.TensorProto.INT64
    ops = {n.op_type for n in m.graph.node}
    assert {"Erf", "Softmax", "LayerNormalization", "ReduceL2"} <= ops and "Shape" not in ops


def test_tokenizer_wordpiece(tok):
    # bert-base-uncased ids: [CLS] hello , world ! [SEP]
    assert tok.encode("Hello, world!") == [101, 7592, 1010, 2088, 999, 102]
    assert tok.encode("HELLO,world!") == tok.encode("hello , world !")  # lowercase, punctuation split
    assert tok.encode("Café") == tok.encode("cafe")  # accents stripped
    pieces = tok.word_ids("unbelievably")
    inv = {i: t for t, i in tok.vocab.items()}
    assert len(pieces) > 1 and "".join(inv[i].removeprefix("##") for i in pieces) == "unbelievably"
    assert all(inv[i].startswith("##") for i in pieces[1:])
    assert tok.encode("\u2603") == [101, tok.unk_id, 102]  # a character outside the vocabulary
    long = tok.encode("word " * 400)
    assert len(long) == minilm.MAX_SEQ and long[0] == 101 and long[-1] == 102
    ids, mask = tok.batch(["a b c", "a"])
    assert ids.shape == mask.shape == (2, 5) and mask.sum(1).tolist() == [5, 3] and ids[1, 3:].tolist() == [0, 0]


def test_tokenizer_refuses_other_kinds(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps({"model": {"type": "BPE", "vocab": {}}, "normalizer": None}))
    with pytest.raises(GraphoptError, match="only BERT WordPiece"):
        WordPiece.from_file(bad)


def test_quickstart_similarities(session, tok):
    e = _embed(session, tok, QUICKSTART)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(e @ e.T, QUICKSTART_COSINE, atol=6e-4)


def test_retrieval_ranks_related_first(session, tok):
    q = _embed(session, tok, [a for a, _ in RETRIEVAL])
    d = _embed(session, tok, [b for _, b in RETRIEVAL])
    sim = q @ d.T
    assert sim.argmax(axis=1).tolist() == list(range(len(RETRIEVAL)))
    related, unrelated = np.diag(sim), sim[~np.eye(len(RETRIEVAL), dtype=bool)]
    assert related.min() > unrelated.max()


def test_padding_does_not_change_embeddings(session, tok):
    alone = _embed(session, tok, [QUICKSTART[2]])
    ids, mask = tok.batch([QUICKSTART[2]], length=40)
    padded = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    assert float(alone[0] @ padded[0]) > 0.99999


def test_truncated_safetensors_names_the_tensor():
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    blob = struct.pack("<Q", len(header)) + header + b"\0" * 32
    with pytest.raises(GraphoptError, match="'w' runs past the end"):
        minilm.read_safetensors(blob)
    with pytest.raises(GraphoptError, match="not a safetensors"):
        minilm.read_safetensors(b"\x05\0\0\0\0\0\0\0{bad")
