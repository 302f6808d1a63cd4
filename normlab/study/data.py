"""Character-level corpus: CPython's own help text by default, or any UTF-8 text file.

Batches are a pure function of ``(seed, step)``: every variant sees the same data in the same order,
a resumed run continues with exactly the batches it would have seen, and a data-parallel run splits the
same global batch across ranks (rank ``r`` of ``W`` takes rows ``[r·B/W, (r+1)·B/W)``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

BUILTIN = "builtin:pydoc_data.topics"


def builtin_text() -> str:
    """``pydoc_data.topics.topics`` (CPython's help text, ≈ 465 KB), topics joined in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text_file(path: str | Path) -> str:
    """The UTF-8 text of ``path``; a clear error for a missing, empty, binary or non-UTF-8 file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--data: file not found: {p}")
    if not p.is_file():
        raise ValueError(f"--data: expected a UTF-8 text file, got a directory or special file: {p}")
    raw = p.read_bytes()
    if not raw.strip():
        raise ValueError(f"--data: file is empty: {p} (expected UTF-8 text)")
    if b"\x00" in raw:
        raise ValueError(f"--data: file looks binary (contains NUL bytes): {p} (expected UTF-8 text)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data: file is not valid UTF-8 (byte {e.start}): {p}") from None


@dataclass
class Corpus:
    """Characters → ids, with a 90/10 train/val split (in text order)."""

    text: str
    source: str

    def __post_init__(self) -> None:
        self.chars = sorted(set(self.text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([self.stoi[c] for c in self.text], dtype=torch.int64)
        n = int(0.9 * len(ids))
        self.train, self.val = ids[:n], ids[n:]
        self.digest = hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> torch.Tensor:
        return torch.tensor([self.stoi[c] for c in s], dtype=torch.int64)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def check_block_size(self, block_size: int) -> None:
        if len(self.val) < block_size + 2:
            raise ValueError(
                f"--data: text too short for context {block_size}: the 10 % validation split has "
                f"{len(self.val)} characters, needs at least {block_size + 2} "
                f"(≥ {10 * (block_size + 2)} characters in all)"
            )

    def batch(self, split: str, index: int, batch_size: int, block_size: int, seed: int, rank: int = 0, world: int = 1):
        """Batch number ``index`` of ``split``: ``(x, y)`` of shape ``(batch_size / world, block_size)``
        for ``rank``; the global batch depends only on ``(seed, split, index)``."""
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} must be divisible by the number of processes {world}")
        data = self.train if split == "train" else self.val
        g = torch.Generator().manual_seed(hash_seed(seed, split, index))
        starts = torch.randint(0, len(data) - block_size - 1, (batch_size,), generator=g)
        per = batch_size // world
        starts = starts[rank * per : (rank + 1) * per]
        offs = torch.arange(block_size)
        x = data[starts[:, None] + offs]
        y = data[starts[:, None] + offs + 1]
        return x, y


def hash_seed(seed: int, split: str, index: int) -> int:
    h = hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def load_corpus(data: str | Path | None = None) -> Corpus:
    """The built-in corpus (``data=None``) or the UTF-8 text file ``data``."""
    if data is None or str(data) == BUILTIN:
        return Corpus(builtin_text(), BUILTIN)
    return Corpus(read_text_file(data), str(Path(data).resolve()))
