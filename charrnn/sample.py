"""Checkpoint -> text. Needs only the checkpoint: the vocabulary, architecture and (lines mode) the hashed training
items travel inside it.

Sampling is stateful: the prime is fed once to warm the state, then each new character costs one recurrent step
(`model.sample_batch`). The same checkpoint, seed, settings and device give the same text. Settings left None take
the run's `sample` config.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint
from .config import RunConfig, config_from_dict
from .data import BOUNDARY, item_hash
from .errors import UsageError
from .model import CharRNN, Generated, beam_search, resolve_device, sample_batch
from .vocab import Vocab, show_chars


@dataclass
class Sample:
    """One generated text: `prime` + `text` is what is printed. `mean_logprob` is per generated character (stop
    string included), in nats under the model itself; `stopped` says it ended at a stop string (or line boundary)."""

    prime: str
    text: str
    mean_logprob: float
    stopped: bool
    settings: dict


@dataclass
class Lines:
    """What `Sampler.lines` made: the items kept after the filters, and the counts for the summary line."""

    items: list[Sample]
    generated: int
    complete: int  # ended at the boundary within `length` characters, and not empty
    novel: int  # complete and not an item of the training text
    unique: int  # distinct complete items

    def summary(self) -> str:
        return (f"lines: {self.generated} generated, {self.complete} complete, {self.novel} novel, "
                f"{self.unique} unique; {len(self.items)} kept")


class Sampler:
    """A trained model and its vocabulary, ready to generate and score text (`charrnn.load` returns one)."""

    def __init__(self, model: CharRNN, vocab: Vocab, device: torch.device, config: RunConfig | None = None,
                 known_items: torch.Tensor | None = None):
        self.model, self.vocab, self.device = model, vocab, device
        self.config = config or RunConfig()  # the run's config: `sample` gives the defaults, `data` the text layout
        self.settings = self.config.sample
        self.known_items = known_items  # lines mode: sorted hashes of the training items, for `novel`

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto") -> "Sampler":
        return cls.from_dict(checkpoint.load(path), device)

    @classmethod
    def from_dict(cls, ckpt: dict, device: str = "auto") -> "Sampler":
        """From a checkpoint already read by `checkpoint.load` (when the caller needs its other entries too)."""
        dev = resolve_device(device)
        model, vocab = checkpoint.restore_model(ckpt, dev)
        return cls(model, vocab, dev, config_from_dict(ckpt.get("config") or {}), ckpt.get("known_items"))

    def default_prime(self) -> str:
        prime = self.settings.prime
        return prime if prime and not self.vocab.unknown(prime) else "\n" if "\n" in self.vocab else self.vocab.chars[0]

    # --- settings -----------------------------------------------------------------------------------------------

    def _settings(self, length, temperature, top_k, top_p, repetition_penalty, seed) -> dict:
        """The effective settings (None takes the run's `sample` config), checked, top_k clamped to the vocabulary
        size; a missing seed is drawn so that it can be reported and the text reproduced."""
        s = self.settings
        out = {"length": s.length if length is None else length,
               "temperature": s.temperature if temperature is None else temperature,
               "top_k": s.top_k if top_k is None else top_k,
               "top_p": s.top_p if top_p is None else top_p,
               "repetition_penalty": s.repetition_penalty if repetition_penalty is None else repetition_penalty,
               "seed": int.from_bytes(os.urandom(4), "little") if seed is None else seed}
        for flag, key, ok, rule in [("--length", "length", out["length"] >= 0, ">= 0"),
                                    ("--temperature", "temperature", 0 <= out["temperature"] < math.inf,
                                     ">= 0 (0: greedy)"),
                                    ("--top-k", "top_k", out["top_k"] >= 0, ">= 0 (0: all characters)"),
                                    ("--top-p", "top_p", 0 < out["top_p"] <= 1, "in (0, 1] (1: all characters)"),
                                    ("--repetition-penalty", "repetition_penalty", out["repetition_penalty"] >= 1,
                                     ">= 1 (1: off)")]:
            if not ok:
                raise UsageError(f"{flag} must be {rule} (got {out[key]})")
        out["top_k"] = min(out["top_k"], len(self.vocab))  # k above the vocabulary keeps every character
        return out

    def _ids(self, text: str, what: str) -> torch.Tensor:
        """`text` as a 1-D id tensor on the device; characters the vocabulary lacks are a usage error naming them."""
        bad = self.vocab.unknown(text)
        if bad:
            raise UsageError(f"{what} has {len(bad)} character(s) the model's vocabulary lacks: {show_chars(bad)}; "
                             f"use only characters of the training text")
        return self.vocab.encode(text).long().to(self.device)

    def _stops(self, stop) -> list[torch.Tensor]:
        if isinstance(stop, str):
            stop = [stop]
        if any(s == "" for s in stop):
            raise UsageError("--stop needs a non-empty string, e.g. --stop '\\n\\n' or --stop '.'")
        return [self._ids(s, f"--stop {s!r}") for s in stop]

    def _results(self, prime: str, gen: Generated, settings: dict) -> list[Sample]:
        ids, lengths, stopped, logprob = (x.cpu() for x in (gen.ids, gen.lengths, gen.stopped, gen.logprob))
        return [Sample(prime, self.vocab.decode(ids[i, :n]), float(logprob[i]) / max(int(n), 1), bool(stopped[i]),
                       settings) for i, n in enumerate(lengths.tolist())]

    # --- generation -----------------------------------------------------------------------------------------------

    def samples(self, prime: str | None = None, length: int | None = None, temperature: float | None = None,
                top_k: int | None = None, num_samples: int | None = None, seed: int | None = None, stream=None, *,
                top_p: float | None = None, repetition_penalty: float | None = None, stop=(), beam: int = 0
                ) -> list[Sample]:
        """`num_samples` continuations of `prime`, generated together as one batch (see `generate`), with their
        mean log-probability and settings. With `beam` > 0, the one likeliest continuation by beam search."""
        num_samples = self.settings.num_samples if num_samples is None else num_samples
        if num_samples < 1:
            raise UsageError(f"--num-samples must be >= 1 (got {num_samples})")
        if beam < 0:
            raise UsageError(f"--beam must be >= 1 (got {beam}); leave it out to sample")
        if beam:
            given = [f for f, v in (("--temperature", temperature), ("--top-k", top_k), ("--top-p", top_p))
                     if v is not None]
            if given or num_samples > 1:
                raise UsageError(f"--beam searches for the one likeliest continuation and does not sample: "
                                 f"drop {', '.join(given + (['--num-samples'] if num_samples > 1 else []))}")
        settings = self._settings(length, temperature, top_k, top_p, repetition_penalty, seed)
        stops = self._stops(stop)
        prime = self.default_prime() if not prime else prime
        ids = self._ids(prime, "--prime").unsqueeze(0).repeat(num_samples, 1)  # (N, P)
        settings = {**settings, "stop": [stop] if isinstance(stop, str) else list(stop)}
        if beam:
            settings = {**settings, "beam": beam, "seed": None, "temperature": None, "top_k": None, "top_p": None}
            gen = beam_search(self.model, ids, settings["length"], beam, settings["repetition_penalty"],
                              [s.tolist() for s in stops])
            results = self._results(prime, gen, settings)
            if stream:
                stream(prime + results[0].text)
            return results
        def on_step(nxt: torch.Tensor, live: torch.Tensor) -> None:
            if live[0]:
                stream(self.vocab.chars[int(nxt[0])])

        if stream:
            stream(prime)
        generator = torch.Generator(self.device).manual_seed(settings["seed"])
        gen = sample_batch(self.model, ids, settings["length"], settings["temperature"], settings["top_k"],
                           settings["top_p"], settings["repetition_penalty"], generator, stops,
                           on_step if stream else None)
        return self._results(prime, gen, settings)

    def generate(self, prime: str | None = None, length: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, num_samples: int | None = None, seed: int | None = None, stream=None, *,
                 top_p: float | None = None, repetition_penalty: float | None = None, stop=(), beam: int = 0
                 ) -> list[str]:
        """`num_samples` continuations of `prime` (without it), generated together as one batch.

        temperature 0 is greedy; `top_k` keeps the k likeliest characters and `top_p` the smallest set holding that
        much probability; `repetition_penalty` > 1 shrinks the logits of the characters among the last 32. Each
        sample ends after the first of the `stop` strings it generates (the stop string is kept). With `stream`, a
        callable, the prime and then the characters of the first sample are passed to it as they are made.
        """
        return [s.text for s in self.samples(prime, length, temperature, top_k, num_samples, seed, stream,
                                             top_p=top_p, repetition_penalty=repetition_penalty, stop=stop, beam=beam)]

    def lines(self, n: int, prime: str = "", length: int | None = None, temperature: float | None = None,
              top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
              seed: int | None = None, novel: bool = False, unique: bool = False) -> Lines:
        """`n` items of a lines-mode model (e.g. names) as one batch: each from a fresh state primed with the line
        boundary (and `prime`, a start every item shares), ending at the boundary. An item that does not end within
        `length` characters, or is empty, is dropped as incomplete; `novel` keeps only items not in the training
        text, `unique` drops repeats."""
        if self.config.data.mode != "lines" or self.known_items is None:
            raise UsageError("--lines needs a checkpoint trained with data.mode: lines (e.g. configs/names.yaml)")
        if n < 1:
            raise UsageError(f"--lines must be >= 1 (got {n})")
        if BOUNDARY in prime:
            raise UsageError("--prime with --lines is the start of every item and cannot hold a newline")
        settings = self._settings(length, temperature, top_k, top_p, repetition_penalty, seed)
        ids = self._ids(BOUNDARY + prime, "--prime").unsqueeze(0).repeat(n, 1)  # (n, P)
        generator = torch.Generator(self.device).manual_seed(settings["seed"])
        gen = sample_batch(self.model, ids, settings["length"], settings["temperature"], settings["top_k"],
                           settings["top_p"], settings["repetition_penalty"], generator, [ids[0, :1]])
        complete = [Sample(s.prime, s.text[:-1], s.mean_logprob, True, s.settings)
                    for s in self._results(prime, gen, settings) if s.stopped and prime + s.text[:-1]]
        items = [prime + s.text for s in complete]
        hashes = torch.tensor([item_hash(item) for item in items], dtype=torch.int64)
        is_novel = (~torch.isin(hashes, self.known_items)).tolist()
        kept, shown = [], set()
        for s, item, new in zip(complete, items, is_novel):
            if (novel and not new) or (unique and item in shown):
                continue
            shown.add(item)
            kept.append(s)
        return Lines(kept, n, len(complete), sum(is_novel), len(set(items)))

    # --- scoring --------------------------------------------------------------------------------------------------

    def evaluate(self, text: str, progress: bool = False) -> dict:
        """Loss of the model on `text` (nats/char, bits/char, perplexity, characters scored and outside the
        vocabulary), laid out and scored the way the trainer scores its validation split; see `charrnn.evaluate`."""
        from .evaluate import evaluate_text

        return evaluate_text(self.model, self.vocab, text, self.config, self.device, progress)

