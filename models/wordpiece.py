"""BERT's WordPiece tokenizer read from a Hugging Face ``tokenizer.json``, in plain Python.

Implements what a BERT ``tokenizer.json`` declares (and refuses other kinds with a GraphoptError):

* normalizer ``BertNormalizer``: drop control characters and turn whitespace into spaces (clean_text),
  space out CJK ideographs, lowercase, strip accents (NFD, drop combining marks; on when lowercasing
  unless ``strip_accents`` says otherwise);
* pre-tokenizer ``BertPreTokenizer``: split on whitespace, every punctuation character a word of its own;
* model ``WordPiece``: greedy longest match from the left, continuation pieces prefixed ``##``, a word
  that cannot be covered (or longer than ``max_input_chars_per_word``) becomes ``[UNK]``;
* post-processor: ``[CLS] tokens [SEP]``, truncated to ``max_length`` ids.

    >>> tok = WordPiece.from_file("tokenizer.json")
    >>> tok.encode("Hello, world!")
    [101, 7592, 1010, 2088, 999, 102]
"""

from __future__ import annotations

import json
import os
import unicodedata

import numpy as np

from graphopt.core.errors import GraphoptError


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in (
        (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def _is_control(ch: str) -> bool:
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch) in ("Cc", "Cf", "Cn", "Co", "Cs")


class WordPiece:
    """A BERT WordPiece tokenizer: ``encode(text) -> ids`` and ``batch(texts) -> (ids, mask)``."""

    def __init__(self, vocab: dict[str, int], *, lowercase: bool = True, strip_accents: bool | None = None,
                 unk: str = "[UNK]", cls: str = "[CLS]", sep: str = "[SEP]", pad_id: int = 0,
                 prefix: str = "##", max_chars: int = 100, max_length: int = 256):
        self.vocab = vocab
        self.lowercase = lowercase
        self.strip_accents = lowercase if strip_accents is None else strip_accents
        self.unk_id, self.cls_id, self.sep_id = (self._id(t) for t in (unk, cls, sep))
        self.pad_id = pad_id
        self.prefix = prefix
        self.max_chars = max_chars
        self.max_length = max_length

    def _id(self, token: str) -> int:
        if token not in self.vocab:
            raise GraphoptError(f"tokenizer: special token {token!r} is not in the vocabulary")
        return self.vocab[token]

    @classmethod
    def from_file(cls, path: str | os.PathLike, max_length: int = 256) -> WordPiece:
        try:
            with open(path, encoding="utf-8") as f:
                spec = json.load(f)
        except (OSError, ValueError) as e:
            raise GraphoptError(f"cannot read tokenizer {path}: {e}") from None
        model, norm = spec.get("model") or {}, spec.get("normalizer") or {}
        if model.get("type") != "WordPiece" or norm.get("type") != "BertNormalizer":
            raise GraphoptError(
                f"tokenizer {path}: only BERT WordPiece tokenizers are supported "
                f"(model {model.get('type')!r}, normalizer {norm.get('type')!r})")
        return cls(
            dict(model["vocab"]), lowercase=bool(norm.get("lowercase", True)), strip_accents=norm.get("strip_accents"),
            unk=model.get("unk_token", "[UNK]"), prefix=model.get("continuing_subword_prefix", "##"),
            max_chars=int(model.get("max_input_chars_per_word", 100)), max_length=max_length)

    # ---------------------------------------------------------------- text -> words
    def normalize(self, text: str) -> str:
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                continue
            if ch.isspace():
                out.append(" ")
            elif _is_cjk(cp):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        text = "".join(out)
        if self.lowercase:
            text = text.lower()
        if self.strip_accents:
            text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        return text

    @staticmethod
    def pre_tokenize(text: str) -> list[str]:
        words: list[str] = []
        for chunk in text.split():
            current = ""
            for ch in chunk:
                if _is_punctuation(ch):
                    if current:
                        words.append(current)
                    words.append(ch)
                    current = ""
                else:
                    current += ch
            if current:
                words.append(current)
        return words

    def word_ids(self, word: str) -> list[int]:
        if len(word) > self.max_chars:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            if end == start:
                return [self.unk_id]
            start = end
        return ids

    # ---------------------------------------------------------------- ids
    def encode(self, text: str) -> list[int]:
        """``[CLS] pieces [SEP]``, at most ``max_length`` ids."""
        ids = [i for w in self.pre_tokenize(self.normalize(text)) for i in self.word_ids(w)]
        return [self.cls_id, *ids[: max(self.max_length - 2, 0)], self.sep_id]

    def batch(self, texts: list[str], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), int64 ``[len(texts), L]``, padded on the right to the longest
        (or to ``length``)."""
        rows = [self.encode(t) for t in texts]
        n = max(len(r) for r in rows) if length is None else length
        ids = np.full((len(rows), n), self.pad_id, np.int64)
        mask = np.zeros((len(rows), n), np.int64)
        for i, r in enumerate(rows):
            r = r[:n]
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return ids, mask
