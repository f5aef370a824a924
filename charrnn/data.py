"""Text files -> train/val id streams -> (n_seqs x n_steps) batches whose streams continue from batch to batch.

The encoded text is laid out as B = n_seqs parallel contiguous streams, and batch i is columns [i*T, (i+1)*T) of
them, so row b of batch i+1 continues row b of batch i and the hidden state can be carried across batches
(truncated BPTT). For ids 0..11, B = 2 and T = 3 (targets are the same layout shifted by one character):

    x streams:  0  1  2 |  3  4  5      y streams:  1  2  3 |  4  5  6
                6  7  8 |  9 10 11                  7  8  9 | 10 11 12
                batch 0   batch 1

Files are read in chunks (`iter_text`): decoded incrementally, a BOM dropped, CRLF and CR turned into LF, a binary
file refused. A plain text is never held whole as a string: `Corpus` counts its characters in one pass over the file
and encodes them in a second, so a text of gigabytes trains in about one byte of memory per character.

The corpus lives once on the training device in its narrow id dtype; batches are slices of it, widened to int64
only for the (B, T) slice the model reads.

In lines mode (`data.mode: lines`, e.g. a list of names) every item sits between two newlines, "\nemma\nolivia\n",
so the model sees each item start from the boundary and learns where items end; blank lines are dropped and the
items are shuffled with a fixed seed (lists are often sorted, and the order would leak from one item to the next).
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import math
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .errors import CharrnnError
from .vocab import Vocab, count_chars

BOUNDARY = "\n"  # lines mode: what precedes and follows every item
CHUNK_BYTES = 16 << 20  # bytes of the file decoded at a time: bounds the memory a text of any size needs to read
SNIFF_BYTES = 8192  # the head of the file checked for binary content before decoding
CONTROL_BYTES = bytes(b for b in range(32) if b not in b"\t\n\v\f\r\x1b") + b"\x7f"  # never in plain text
MAX_CONTROL = 0.05  # a head with more control bytes than this fraction is binary
WIDE_BOMS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
             (codecs.BOM_UTF16_BE, "utf-16")]  # UTF-32 first: its little-endian BOM starts with UTF-16's


def _sniff(path: Path, head: bytes, encoding: str) -> None:
    """Refuse, before decoding, a binary file and a UTF-16/32 one read with a byte-wide encoding (UTF-8, latin-1):
    the head holds a NUL byte or more than MAX_CONTROL control bytes, or starts with a UTF-16/32 byte order mark."""
    for bom, name in WIDE_BOMS:
        if head.startswith(bom):
            raise CharrnnError(f"text file {path} is {name.upper()} text (it starts with a {name} byte order mark), "
                               f"not {encoding}: set data.encoding={name}")
    nul = head.find(0)
    control = sum(head.count(b) for b in CONTROL_BYTES)
    if nul >= 0 or control > MAX_CONTROL * len(head):
        why = f"a NUL byte at offset {nul}" if nul >= 0 else \
            f"{control:,} of its first {len(head):,} bytes are control characters"
        utf16 = " (or, if it is UTF-16 text, set data.encoding=utf-16)" if nul >= 0 else ""
        raise CharrnnError(f"text file {path} looks binary, not text ({why}): use a plain text file{utf16}")


def iter_text(path: str | Path, encoding: str = "utf-8", download_hint: str = "") -> Iterator[str]:
    """The text of a file, decoded in chunks of about CHUNK_BYTES: a BOM dropped, CRLF and CR line endings turned
    into LF (across chunk boundaries too). A missing, unreadable, binary or undecodable file is a one-line error."""
    path = Path(path)
    if not path.exists():
        hint = (f"run `charrnn download --gutenberg {download_hint}`" if download_hint
                else "point data.path at a text file")
        raise CharrnnError(f"text file {path} not found: {hint}")
    if path.is_dir():
        raise CharrnnError(f"text file {path} is a directory: point data.path at a text file")
    try:
        decoder = codecs.getincrementaldecoder(encoding)()
        wide = len("\n\n".encode(encoding)) - len("\n".encode(encoding)) > 1  # UTF-16/32: NULs are text
    except LookupError:
        raise CharrnnError(f"data.encoding {encoding!r} is not a known encoding: use e.g. utf-8 or latin-1") from None
    offset, chars, cr, started = 0, 0, "", False
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.read(CHUNK_BYTES)
                if not offset and not wide:
                    _sniff(path, raw[:SNIFF_BYTES], encoding)
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    held = len(e.object) - len(raw)  # bytes of the previous chunk the decoder was holding
                    raise CharrnnError(f"text file {path} is not valid {encoding} (byte {offset - held + e.start:,}): "
                                       f"set data.encoding (e.g. --set data.encoding=latin-1)") from None
                offset += len(raw)
                if not started and text:
                    text, started = text.removeprefix("\ufeff"), True
                text = cr + text
                cr = "\r" if raw and text.endswith("\r") else ""  # it may start a CRLF split by the chunk boundary
                text = text[:len(text) - len(cr)].replace("\r\n", "\n").replace("\r", "\n")
                nul = text.find("\x00")
                if nul >= 0:
                    raise CharrnnError(f"text file {path} holds a NUL character (character {chars + nul:,}), so it "
                                       f"looks binary, not text: use a plain text file")
                chars += len(text)
                if text:
                    yield text
                if not raw:
                    return
    except OSError as e:
        raise CharrnnError(f"text file {path} could not be read ({e.strerror or e}): check its permissions") from None


def read_text(path: str | Path, encoding: str = "utf-8", download_hint: str = "") -> str:
    """Read a whole text file as `iter_text` decodes it."""
    return "".join(iter_text(path, encoding, download_hint))


def _skip_lines(chunks: Iterable[str], n: int) -> Iterator[str]:
    """The chunks of a text without its first `n` lines."""
    for chunk in chunks:
        pos = 0
        while n and pos < len(chunk):
            cut = chunk.find("\n", pos)
            if cut < 0:
                pos = len(chunk)
            else:
                pos, n = cut + 1, n - 1
        if pos < len(chunk):
            yield chunk[pos:]


def _check_content(path: str | Path, counts: Counter) -> None:
    """Refuse a text with nothing to learn: empty, or only whitespace."""
    if not counts:
        raise CharrnnError(f"text file {path} is empty: point data.path at a text with content")
    if all(c.isspace() for c in counts):
        raise CharrnnError(f"text file {path} holds only whitespace ({sum(counts.values()):,} characters): point "
                           f"data.path at a text with content")


def _laid_out(data: DataConfig, path: str | Path) -> str:
    """The whole text as a string: header lines skipped, ASCII, lines layout."""
    text = "".join(_skip_lines(iter_text(path, data.encoding, data.gutenberg), data.skip_lines))
    if data.ascii:
        from unidecode import unidecode
        text = unidecode(text)
    if data.mode == "lines":  # shuffled, always the same way: a sorted list would teach the order, not the items
        items = line_items(text)
        random.Random(0).shuffle(items)
        text = "".join(BOUNDARY + item for item in items) + BOUNDARY if items else ""
    return text


def read_corpus(data: DataConfig, path: str | Path | None = None) -> str:
    """The text a run trains on: the file at `path` (default `data.path`) read as `data` says (header lines
    skipped, ASCII, lines layout), so training and `charrnn eval` see a text the same way."""
    path = path or data.path
    text = _laid_out(data, path)
    _check_content(path, count_chars(text))
    return text


class Corpus:
    """The training text as `read_corpus` sees it, with its character counts (`counts`, `length`) for building the
    vocabulary, and `encode` into ids.

    A plain text (text mode, no ASCII) is never held as a string: it is streamed from the file twice, in chunks,
    once to count the characters and once to encode them into one array of the vocabulary's narrow dtype, so a
    text of gigabytes needs about one byte of memory per character. A lines-mode or ASCII text is held as a string.
    """

    def __init__(self, data: DataConfig):
        self.data, self.path = data, Path(data.path)
        streamed = data.mode == "text" and not data.ascii
        self.text = None if streamed else _laid_out(data, self.path)
        self.counts, self.length = Counter(), 0
        for chunk in self._chunks():
            self.counts.update(count_chars(chunk))
            self.length += len(chunk)
        _check_content(self.path, self.counts)

    def _chunks(self) -> Iterable[str]:
        if self.text is not None:
            return [self.text]
        return _skip_lines(iter_text(self.path, self.data.encoding, self.data.gutenberg), self.data.skip_lines)

    def encode(self, vocab: Vocab) -> torch.Tensor:
        """The text as a 1-D tensor of ids in the vocabulary's dtype (see `Vocab.encode`)."""
        out = np.empty(self.length, dtype=np.dtype(str(vocab.dtype).removeprefix("torch.")))
        pos, grew = 0, False
        for chunk in self._chunks():
            grew = pos + len(chunk) > self.length
            if grew:
                break
            out[pos:pos + len(chunk)] = vocab.encode(chunk).numpy()
            pos += len(chunk)
        if grew or pos != self.length:
            raise CharrnnError(f"text file {self.path} changed while it was read: train again once it is written")
        return torch.from_numpy(out)


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
