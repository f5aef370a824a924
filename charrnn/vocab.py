"""Characters <-> integer ids. The vocabulary is built from the training text and stored in every checkpoint.

Encoding is vectorized: the text becomes code points with one `str.encode("utf-32-le")`, and a lookup table maps
code points to ids with one numpy indexing call per chunk, so a 100 MB book encodes in seconds. Ids are kept in the
narrowest integer type that holds the vocabulary (uint8 for up to 256 characters).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from .errors import CharrnnError

UNK = "\ufffd"  # the one symbol that stands for every character dropped by max_vocab / min_freq
CHUNK = 1 << 22  # characters encoded per numpy call: bounds the temporary code point array to 16 MB


def count_chars(text: str) -> Counter:
    """Character frequencies, counted in chunks so a large text never needs a list of all its characters."""
    counts: Counter = Counter()
    for start in range(0, len(text), CHUNK):
        cps = np.frombuffer(text[start:start + CHUNK].encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        freq = np.bincount(cps)  # O(n), unlike sorting; at most 0x110000 bins
        values = np.flatnonzero(freq)
        counts.update({chr(int(v)): int(freq[v]) for v in values})
    return counts


def id_dtype(size: int) -> torch.dtype:
    """The narrowest integer dtype that holds ids below `size`."""
    if size <= 256:
        return torch.uint8
    if size <= 32768:
        return torch.int16
    return torch.int32


class Vocab:
    """A sorted, deterministic character set; `unk` is set when rare characters were folded into one symbol."""

    def __init__(self, chars: list[str], unk: bool = False):
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise CharrnnError("vocabulary must be a list of distinct single characters")
        self.chars = list(chars)
        self.unk = unk
        self.index = {c: i for i, c in enumerate(self.chars)}
        self._table: np.ndarray | None = None

    @classmethod
    def build(cls, text: str, max_vocab: int = 0, min_freq: int = 1) -> "Vocab":
        """All characters of `text`, sorted; with `max_vocab`/`min_freq`, the rare ones share the UNK symbol."""
        return cls.from_counts(count_chars(text), max_vocab, min_freq)

    @classmethod
    def from_counts(cls, counts: Counter, max_vocab: int = 0, min_freq: int = 1) -> "Vocab":
        """`build` from character frequencies (a text streamed in chunks, see `data.Corpus`)."""
        kept = [c for c, n in counts.items() if n >= min_freq]
        needs_unk = len(kept) < len(counts)
        if max_vocab and len(kept) + needs_unk > max_vocab:  # keep the most frequent, leaving room for UNK
            kept = sorted(kept, key=lambda c: (-counts[c], c))[: max_vocab - 1]
        dropped = len(counts) - len(kept)
        chars = sorted(kept)
        if dropped:
            chars = sorted(set(chars) | {UNK})
        return cls(chars, unk=bool(dropped))

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, ch: str) -> bool:
        return ch in self.index

    @property
    def dtype(self) -> torch.dtype:
        return id_dtype(len(self))

    @property
    def unk_id(self) -> int | None:
        return self.index[UNK] if self.unk else None

    def lookup_table(self) -> np.ndarray:
        """Code point -> id (-1 for characters outside the vocabulary, or the UNK id when there is one)."""
        if self._table is None:
            top = max(ord(c) for c in self.chars) + 1 if self.chars else 1
            fill = -1 if self.unk_id is None else self.unk_id
            table = np.full(top, fill, dtype=np.int32)
            for c, i in self.index.items():
                table[ord(c)] = i
            self._table = table
        return self._table

    def unknown(self, text: str) -> list[str]:
        """Characters of `text` that have no id of their own, sorted."""
        return sorted({c for c in set(text) if c not in self.index})

    def encode(self, text: str) -> torch.Tensor:
        """Text -> 1-D tensor of ids in `self.dtype`. Characters outside the vocabulary map to UNK when there is one,
        else raise an error naming them."""
        table = self.lookup_table()
        fill = -1 if self.unk_id is None else self.unk_id
        out = np.empty(len(text), dtype=np.dtype(str(self.dtype).removeprefix("torch.")))
        for start in range(0, len(text), CHUNK):
            cps = np.frombuffer(text[start:start + CHUNK].encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            inside = cps < len(table)
            ids = np.where(inside, table[np.where(inside, cps, 0)], fill)
            if fill == -1 and (ids < 0).any():
                bad = self.unknown(text[start:start + CHUNK])
                raise CharrnnError(f"text has {len(bad)} character(s) outside the vocabulary: {show_chars(bad)}")
            out[start:start + len(cps)] = ids
        return torch.from_numpy(out)

    def decode(self, ids) -> str:
        """Ids (tensor, array or list) -> text."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        chars = self.chars
        return "".join(chars[i] for i in ids)

    def to_dict(self) -> dict:
        """Plain data for the checkpoint: a string of the characters and the UNK flag."""
        return {"chars": "".join(self.chars), "unk": self.unk}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        return cls(list(d["chars"]), unk=bool(d.get("unk", False)))


def show_chars(chars: list[str], limit: int = 20) -> str:
    """A printable list of characters for error messages: repr for invisible ones."""
    shown = " ".join(repr(c) if not c.isprintable() or c.isspace() else c for c in chars[:limit])
    return shown + (f" ... (+{len(chars) - limit} more)" if len(chars) > limit else "")
