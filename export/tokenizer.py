"""Query tokenizer: word tokens, with character-trigram fallback for out-of-vocabulary words.

This file is copied into the Triton model repository (next to every Python-backend step: the cpu
target's `query_intent`, the gpu target's `preprocess`) and
imported there, so it depends only on the standard library and numpy. Its state is the shipped
`tokenizer.json`: {"vocab": {token: id}, "max_len", "pad_id": 0, "unk_id": 1, "normalization": {...}}.

Encoding of one query:
  normalize -> split on spaces -> for each word: its id if the word is in the vocabulary, else the
  ids of its boundary-marked trigrams ("#ab", "abc", ..., "yz#"; unknown trigrams -> unk) ->
  truncate to max_len -> pad with pad_id. attention_mask is 1 for real tokens, 0 for padding.
  An empty query encodes as a single unk token (a row is never all padding).
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

PAD, UNK = "[PAD]", "[UNK]"
PAD_ID, UNK_ID = 0, 1
TRIGRAM_PREFIX = "##"   # vocabulary key of a trigram: "##" + trigram
_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def normalize(text: str) -> str:
    """NFKD, strip accents, lower-case, every run of non [0-9a-z] characters -> one space, trim."""
    text = str(text)
    if not text.isascii():   # NFKD and accent stripping leave ASCII text as it is
        text = unicodedata.normalize("NFKD", text)
        text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = text.lower()
    return _NON_ALNUM.sub(" ", text).strip()


def trigrams(word: str) -> list[str]:
    w = f"#{word}#"
    return [w[i:i + 3] for i in range(len(w) - 2)]


class Tokenizer:
    def __init__(self, vocab: dict[str, int], max_len: int):
        if vocab.get(PAD) != PAD_ID or vocab.get(UNK) != UNK_ID:
            raise ValueError("tokenizer vocab must map [PAD]->0 and [UNK]->1")
        self.vocab = dict(vocab)
        self.max_len = int(max_len)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    # -- building and files -------------------------------------------------------------------
    @classmethod
    def build(cls, corpus: Iterable[str], max_len: int, min_word_count: int = 2,
              min_trigram_count: int = 2) -> "Tokenizer":
        words: Counter[str] = Counter()
        for text in corpus:
            words.update(normalize(text).split())
        tris: Counter[str] = Counter()
        for w, c in words.items():
            for t in trigrams(w):
                tris[t] += c
        vocab = {PAD: PAD_ID, UNK: UNK_ID}
        for w, c in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
            if c >= min_word_count:
                vocab[w] = len(vocab)
        for t, c in sorted(tris.items(), key=lambda kv: (-kv[1], kv[0])):
            if c >= min_trigram_count:
                vocab[TRIGRAM_PREFIX + t] = len(vocab)
        return cls(vocab, max_len)

    def to_dict(self) -> dict:
        return {"vocab": self.vocab, "max_len": self.max_len, "pad_id": PAD_ID, "unk_id": UNK_ID,
                "normalization": {"unicode": "NFKD", "strip_accents": True, "lowercase": True,
                                  "split": "runs of [^0-9a-z] -> space"},
                "oov": {"strategy": "char_trigrams", "boundary": "#", "vocab_prefix": TRIGRAM_PREFIX},
                "empty_query": "single unk token"}

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True), encoding="utf-8")

    @classmethod
    def from_dict(cls, d: dict) -> "Tokenizer":
        return cls({str(k): int(v) for k, v in d["vocab"].items()}, int(d["max_len"]))

    @classmethod
    def load(cls, path) -> "Tokenizer":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    # -- encoding ---------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = []
        for w in normalize(text).split():
            wid = self.vocab.get(w)
            if wid is not None:
                ids.append(wid)
            else:
                ids.extend(self.vocab.get(TRIGRAM_PREFIX + t, UNK_ID) for t in trigrams(w))
        return ids[: self.max_len] or [UNK_ID]

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(texts), self.max_len), PAD_ID, dtype=np.int64)
        mask = np.zeros((len(texts), self.max_len), dtype=np.int64)
        for i, t in enumerate(texts):
            tok = self.tokenize(t)
            ids[i, : len(tok)] = tok
            mask[i, : len(tok)] = 1
        return ids, mask
