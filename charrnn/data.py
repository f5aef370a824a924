"""Text files -> train/val id streams -> (n_seqs x n_steps) batches whose streams continue from batch to batch.

The encoded text is laid out as B = n_seqs parallel contiguous streams, and batch i is columns [i*T, (i+1)*T) of
them, so row b of batch i+1 continues row b of batch i and the hidden state can be carried across batches
(truncated BPTT). For ids 0..11, B = 2 and T = 3 (targets are the same layout shifted by one character):

    x streams:  0  1  2 |  3  4  5      y streams:  1  2  3 |  4  5  6
                6  7  8 |  9 10 11                  7  8  9 | 10 11 12
                batch 0   batch 1

The corpus lives once on the training device in its narrow id dtype; batches are slices of it, widened to int64
only for the (B, T) slice the model reads.

In lines mode (`data.mode: lines`, e.g. a list of names) every item sits between two newlines, "\nemma\nolivia\n",
so the model sees each item start from the boundary and learns where items end; blank lines are dropped and the
items are shuffled with a fixed seed (lists are often sorted, and the order would leak from one item to the next).
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from pathlib import Path

import torch

from .config import DataConfig
from .errors import CharrnnError

BOUNDARY = "\n"  # lines mode: what precedes and follows every item


def read_text(path: str | Path, encoding: str = "utf-8", download_hint: str = "") -> str:
    """Read a training text, dropping a BOM and turning CRLF/CR line endings into LF."""
    path = Path(path)
    if not path.exists():
        hint = (f"run `charrnn download --gutenberg {download_hint}`" if download_hint
                else "point data.path at a text file")
        raise CharrnnError(f"text file {path} not found: {hint}")
    if path.is_dir():
        raise CharrnnError(f"text file {path} is a directory: point data.path at a text file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CharrnnError(f"text file {path} could not be read ({e.strerror}): check its permissions") from None
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise CharrnnError(f"text file {path} is not valid {encoding} (byte {e.start}): "
                           f"set data.encoding (e.g. --set data.encoding=latin-1)") from None
    except LookupError:
        raise CharrnnError(f"data.encoding {encoding!r} is not a known encoding: use e.g. utf-8 or latin-1") from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def read_corpus(data: DataConfig, path: str | Path | None = None) -> str:
    """The text a run trains on: the file at `path` (default `data.path`) read as `data` says (header lines
    skipped, ASCII, lines layout), so training and `charrnn eval` see a text the same way."""
    text = read_text(path or data.path, data.encoding, data.gutenberg)
    if data.skip_lines:
        parts = text.split("\n", data.skip_lines)
        text = parts[-1] if len(parts) > data.skip_lines else ""
    if data.ascii:
        from unidecode import unidecode
        text = unidecode(text)
    if data.mode == "lines":  # shuffled, always the same way: a sorted list would teach the order, not the items
        items = line_items(text)
        random.Random(0).shuffle(items)
        text = "".join(BOUNDARY + item for item in items) + BOUNDARY
    if not text.strip():
        raise CharrnnError(f"text file {path or data.path} is empty: point data.path at a text with content")
    return text


def line_items(text: str) -> list[str]:
    """The items of a lines-mode text: its lines without surrounding whitespace, blank ones dropped."""
    return [item for line in text.split(BOUNDARY) if (item := line.strip())]


def item_hash(item: str) -> int:
    """A stable signed 64-bit hash of an item (blake2b; Python's own hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(item.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def hash_items(items) -> torch.Tensor:
    """The sorted int64 tensor of the distinct hashes of `items`: what a checkpoint keeps for `--novel`."""
    return torch.tensor(sorted({item_hash(i) for i in items}), dtype=torch.int64)


def known_items(data: DataConfig) -> torch.Tensor:
    """The hashed items of a lines-mode training text; computed once per file version, since a run saves many
    checkpoints and hashing a large list takes a second."""
    path = Path(data.path).resolve()
    return _known_items(data, str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _known_items(data: DataConfig, path: str, mtime_ns: int) -> torch.Tensor:
    return hash_items(line_items(read_corpus(data, path)))


def split_ids(ids: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous split: the last `val_fraction` of the characters is validation, whatever the batch size."""
    n_val = int(len(ids) * val_fraction)
    return ids[: len(ids) - n_val], ids[len(ids) - n_val:]


class Batcher:
    """(x, y) batches of shape (B, T) over one id stream; `len(self)` batches make one epoch."""

    def __init__(self, ids: torch.Tensor, n_seqs: int, n_steps: int, device: torch.device | str = "cpu"):
        self.n_seqs, self.n_steps = n_seqs, n_steps
        self.length = (len(ids) - 1) // n_seqs  # characters per stream
        if self.length < 1:
            raise CharrnnError(f"{len(ids)} characters are too few for {n_seqs} streams: "
                               f"need at least {n_seqs + 1}; lower train.n_seqs or use a longer text")
        ids = ids.to(device)
        used = n_seqs * self.length
        self.x = ids[:used].view(n_seqs, self.length)  # (B, L) view of the corpus, no copy
        self.y = ids[1:used + 1].view(n_seqs, self.length)  # (B, L) the same shifted by one character

    def __len__(self) -> int:
        return math.ceil(self.length / self.n_steps)

    @property
    def chars_per_epoch(self) -> int:
        return self.n_seqs * self.length

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch i of the epoch as int64 (B, T) inputs and targets; the last batch of an epoch may be shorter."""
        cols = slice(i * self.n_steps, (i + 1) * self.n_steps)
        return self.x[:, cols].long(), self.y[:, cols].long()

    def __iter__(self):
        for i in range(len(self)):
            yield self.batch(i)
