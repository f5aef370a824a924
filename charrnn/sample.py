"""Checkpoint -> text. Needs only the checkpoint: the vocabulary and architecture travel inside it.

Sampling is stateful: the prime is fed once to warm the state, then each new character costs one recurrent step.
The same checkpoint, seed, settings and device give the same text.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import checkpoint
from .config import SampleConfig, config_from_dict
from .errors import UsageError
from .model import CharRNN, generate, resolve_device
from .vocab import Vocab, show_chars


class Sampler:
    """A trained model and its vocabulary, ready to generate text."""

    def __init__(self, model: CharRNN, vocab: Vocab, device: torch.device, settings: SampleConfig | None = None):
        self.model, self.vocab, self.device = model, vocab, device
        self.settings = settings or SampleConfig()  # the run's `sample` section: defaults for unset arguments

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto") -> "Sampler":
        dev = resolve_device(device)
        ckpt = checkpoint.load(path)
        model, vocab = checkpoint.restore_model(ckpt, dev)
        return cls(model, vocab, dev, config_from_dict(ckpt["config"]).sample)

    def default_prime(self) -> str:
        prime = self.settings.prime
        return prime if prime and not self.vocab.unknown(prime) else "\n" if "\n" in self.vocab else self.vocab.chars[0]

    def generate(self, prime: str | None = None, length: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, num_samples: int | None = None, seed: int | None = None,
                 stream=None) -> list[str]:
        """`num_samples` continuations of `prime`, generated together as one batch; an argument left None takes the
        run's `sample` setting. With `stream`, a callable, the prime and then the characters of the first sample are
        passed to it as they are made. Returns the generated texts (without the prime)."""
        s = self.settings
        length = s.length if length is None else length
        temperature = s.temperature if temperature is None else temperature
        top_k = s.top_k if top_k is None else top_k
        num_samples = s.num_samples if num_samples is None else num_samples
        if length < 0:
            raise UsageError(f"--length must be >= 0 (got {length})")
        if temperature < 0:
            raise UsageError(f"--temperature must be >= 0 (got {temperature}); 0 means greedy")
        if top_k < 0:
            raise UsageError(f"--top-k must be >= 0 (got {top_k}); 0 means all characters")
        if num_samples < 1:
            raise UsageError(f"--num-samples must be >= 1 (got {num_samples})")
        prime = self.default_prime() if prime is None or prime == "" else prime
        bad = self.vocab.unknown(prime)
        if bad:
            raise UsageError(f"--prime has {len(bad)} character(s) the model's vocabulary lacks: {show_chars(bad)}; "
                             f"use only characters of the training text")
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        gen = torch.Generator(self.device).manual_seed(seed)
        ids = self.vocab.encode(prime).long().to(self.device).unsqueeze(0).repeat(num_samples, 1)  # (N, P)
        if stream:
            stream(prime)
        on_step = (lambda nxt: stream(self.vocab.chars[int(nxt[0])])) if stream else None
        out = generate(self.model, ids, length, temperature, top_k, gen, on_step)  # (N, length)
        return [self.vocab.decode(row) for row in out.cpu()]
