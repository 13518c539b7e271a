"""Training data from a text file: documents -> token windows -> deterministic batches.

Documents are separated by blank lines. Each is tokenized (with the tokenizer's BOS) and
ended with EOS, then cut into windows of `seq + 1` tokens (a window's inputs are its first
`seq` tokens, its targets the last `seq`); the last window of a document is right-padded, and
padding carries weight 0 in the loss. Documents are not packed together, so no attention
crosses a document boundary.

The batch of step s depends only on (seed, s): windows are visited in a fresh permutation per
epoch. A run resumed at step s therefore sees exactly the batches it would have seen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from flax import struct

from jaxpar.tokenizer import Tokenizer


class DataError(ValueError):
    """The training data cannot be used."""


@struct.dataclass
class Batch:
    inputs: np.ndarray  # [B, T] int32
    targets: np.ndarray  # [B, T] int32: the token after each input
    weights: np.ndarray  # [B, T] float32: 1 where the target is a real token
    lengths: np.ndarray  # [B] int32: real input tokens per row (right padding after)


def split_documents(text: str) -> list[str]:
    docs = [d.strip() for d in text.replace("\r\n", "\n").split("\n\n")]
    return [d for d in docs if d]


def windows(docs_ids: Sequence[Sequence[int]], seq: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [N, seq + 1], real lengths [N]) of every document's windows. Consecutive
    windows of a document overlap by one token, so every target is predicted once."""
    rows, lens = [], []
    for ids in docs_ids:
        ids = list(ids)
        for start in range(0, max(len(ids) - 1, 1), seq):
            piece = ids[start:start + seq + 1]
            if len(piece) < 2:
                continue
            rows.append(piece + [pad_id] * (seq + 1 - len(piece)))
            lens.append(len(piece))
    if not rows:
        raise DataError("the data has no document of at least 2 tokens")
    return np.asarray(rows, np.int32), np.asarray(lens, np.int32)


class TextDataset:
    """Token windows of a text and the batch of any step."""

    def __init__(self, tokens: np.ndarray, lengths: np.ndarray, *, seed: int = 0):
        self.tokens, self.lengths, self.seed = tokens, lengths, seed

    @classmethod
    def from_text(cls, text: str, tokenizer: Tokenizer, seq: int, *, seed: int = 0) -> "TextDataset":
        if seq < 1:
            raise DataError(f"seq must be >= 1, got {seq}")
        docs = split_documents(text)
        if not docs:
            raise DataError("the training text is empty")
        eos = tokenizer.eos_token_id
        ids = [tokenizer.encode(d) + ([eos] if eos is not None else []) for d in docs]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(*windows(ids, seq, pad), seed=seed)

    @classmethod
    def from_file(cls, path: str | Path, tokenizer: Tokenizer, seq: int, *, seed: int = 0) -> "TextDataset":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"training data {path} does not exist")
        return cls.from_text(path.read_text(encoding="utf-8"), tokenizer, seq, seed=seed)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def seq(self) -> int:
        return self.tokens.shape[1] - 1

    def batch(self, step: int, batch_size: int) -> Batch:
        """The rows of step `step`: positions step*B .. step*B + B - 1 of the epoch-wise
        permuted windows (a batch may span two epochs)."""
        n = len(self)
        perms: dict[int, np.ndarray] = {}
        idx = []
        for k in range(step * batch_size, (step + 1) * batch_size):
            epoch, pos = divmod(k, n)
            if epoch not in perms:
                perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
            idx.append(perms[epoch][pos])
        rows, lens = self.tokens[idx], self.lengths[idx]
        t = self.seq
        positions = np.arange(t)[None]
        return Batch(inputs=rows[:, :-1], targets=rows[:, 1:],
                     weights=(positions + 1 < lens[:, None]).astype(np.float32),
                     lengths=np.minimum(lens, t).astype(np.int32))
