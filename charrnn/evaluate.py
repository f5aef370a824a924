"""Scoring a text with a trained model: loss in nats/char, bits/char and perplexity (`charrnn eval`, `.evaluate`).

The text is laid out as the trainer lays out its validation split (B parallel streams, batches of T characters, the
state carried from batch to batch) and scored by the trainer's own `stream_loss`, so `--split val` reproduces the
trainer's val loss. Each stream starts from a zero state, and the last few characters that do not fill a stream
(fewer than B) are not scored, as in training. A character outside the vocabulary is scored as the unknown symbol
when the vocabulary has one (data.max_vocab / data.min_freq), else skipped; either way it is counted.
"""

from __future__ import annotations

import math
import sys

import torch
from tqdm import tqdm

from .config import RunConfig
from .data import Batcher, read_corpus, split_ids
from .errors import CharrnnError
from .model import CharRNN, eval_mode
from .train import LN2, load_corpus, stream_loss
from .vocab import Vocab


def score_ids(model: CharRNN, ids: torch.Tensor, cfg: RunConfig, device: torch.device, progress: bool = False
              ) -> dict:
    """The loss of `model` on `ids` with the run's batch layout, by the trainer's own evaluation loop."""
    if len(ids) < 2:
        raise CharrnnError(f"a text of {len(ids)} character(s) is too short to score: it needs at least 2")
    t = cfg.train
    batches = Batcher(ids, min(t.n_seqs, max(1, len(ids) - 1)), t.n_steps, device)  # as the trainer's val_data
    shown = tqdm(batches, disable=not progress, file=sys.stderr, unit="batch", desc="eval", dynamic_ncols=True,
                 leave=False)
    with eval_mode(model):
        loss = stream_loss(model, shown, batches.chars_per_epoch)
    return {"loss": loss, "bpc": loss / LN2, "perplexity": math.exp(loss), "chars": batches.chars_per_epoch}


def evaluate_text(model: CharRNN, vocab: Vocab, text: str, cfg: RunConfig, device: torch.device,
                  progress: bool = False) -> dict:
    """Metrics of `model` on `text`, with the characters outside the vocabulary counted (`oov`, `oov_chars`)."""
    unknown = vocab.unknown(text)
    oov = sum(text.count(c) for c in unknown)
    if unknown and not vocab.unk:
        text = text.translate({ord(c): None for c in unknown})
    return {**score_ids(model, vocab.encode(text), cfg, device, progress), "oov": oov, "oov_chars": "".join(unknown)}


def evaluate_file(model: CharRNN, vocab: Vocab, path: str, cfg: RunConfig, device: torch.device,
                  progress: bool = False) -> dict:
    """Metrics on a whole file, read the way the training text was (encoding, header lines, ASCII, lines mode)."""
    return evaluate_text(model, vocab, read_corpus(cfg.data, path), cfg, device, progress)


def evaluate_split(model: CharRNN, vocab: Vocab, cfg: RunConfig, device: torch.device, progress: bool = False
                   ) -> dict:
    """Metrics on the validation split of the run's training text (`data.path`, read again): the trainer's val
    loss for the same weights."""
    _, ids = load_corpus(cfg, vocab)
    _, val_ids = split_ids(ids, cfg.data.val_fraction)
    if len(val_ids) < 2:
        raise CharrnnError(f"the run has no validation split (data.val_fraction {cfg.data.val_fraction}): "
                           f"use --text FILE")
    return {**score_ids(model, val_ids, cfg, device, progress), "oov": 0, "oov_chars": ""}
