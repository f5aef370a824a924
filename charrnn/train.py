"""The Trainer: text -> vocab -> batches -> model, with the schedule, evaluation, logging and checkpoints of a run.

`fit()` decides when to evaluate, log and save; `train_step()` is exactly one optimizer step; `evaluate()` runs under
no_grad; the learning rate is a pure function of the step and the fraction of the budget used. A run directory holds
`config.yaml`, `metrics.jsonl`, `samples.txt`, `last.pt` and `best.pt` (by validation loss).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint
from .config import RunConfig, config_from_dict
from .data import Batcher, read_text, split_ids
from .errors import CharrnnError, UsageError
from .model import CharRNN, ModelArgs, State, detach_state, generate, resolve_device
from .vocab import Vocab, show_chars

LN2 = math.log(2)


def lr_at(cfg, step: int, progress: float) -> float:
    """Learning rate after `step` steps with `progress` (0..1) of the budget used: linear warm-up, then decay."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "cosine":
        p = min(max(progress, 0.0), 1.0)
        decay = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    elif cfg.schedule == "step":
        decay = cfg.lr_decay ** (step // cfg.lr_decay_steps)
    else:
        decay = 1.0
    return cfg.lr * warm * decay


def load_corpus(cfg: RunConfig, vocab: Vocab | None = None) -> tuple[Vocab, torch.Tensor]:
    """Read and encode the training text; build the vocabulary unless one is given (resume)."""
    text = read_text(cfg.data.path, cfg.data.encoding, cfg.data.gutenberg)
    if cfg.data.ascii:
        from unidecode import unidecode
        text = unidecode(text)
    if not text.strip():
        raise CharrnnError(f"text file {cfg.data.path} is empty: point data.path at a text with content")
    if vocab is None:
        vocab = Vocab.build(text, cfg.data.max_vocab, cfg.data.min_freq)
    elif not vocab.unk and vocab.unknown(text):
        bad = vocab.unknown(text)
        raise UsageError(f"{cfg.data.path} has {len(bad)} character(s) outside the checkpoint's vocabulary: "
                         f"{show_chars(bad)}; train on a text over the same characters")
    return vocab, vocab.encode(text)


def capture_rng() -> dict:
    rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
           "python_version": random.getstate()[0]}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python_version"], tuple(rng["python"]), None))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


class Trainer:
    """One training run in `run_dir`; `resume` is a loaded checkpoint (see `checkpoint.load`) to continue exactly.

    On resume, build `cfg` over the checkpoint's config (`load_config(..., base=ckpt["config"])`).
    """

    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: dict | None = None,
                 overwrite: bool = False, progress: bool = True, log=None):
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
        ckpt = resume
        if ckpt is None and not overwrite and any((self.run_dir / n).exists() for n in ("last.pt", "best.pt")):
            raise UsageError(f"run directory {self.run_dir} already holds a run: pass --resume auto to continue it, "
                             f"--overwrite to start over, or --run-dir for a new one")
        if ckpt is not None:
            cfg = self._merge_resumed(cfg, ckpt)
        self.cfg = cfg
        t = cfg.train
        self.device = resolve_device(t.device)
        torch.manual_seed(t.seed)
        random.seed(t.seed)

        self.vocab, ids = load_corpus(cfg, Vocab.from_dict(ckpt["vocab"]) if ckpt else None)
        train_ids, val_ids = split_ids(ids, cfg.data.val_fraction)
        self.train_data = Batcher(train_ids, t.n_seqs, t.n_steps, self.device)
        self.val_data = Batcher(val_ids, min(t.n_seqs, max(1, len(val_ids) - 1)), t.n_steps, self.device) \
            if len(val_ids) > 1 else None

        self.model = CharRNN(ModelArgs(vocab_size=len(self.vocab), **dataclasses.asdict(cfg.model))).to(self.device)
        opt = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
        extra = {"foreach": True} if self.device.type != "mps" else {}
        self.optimizer = opt(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay, **extra)

        self.step = 0
        self.epoch = 0
        self.batch_index = 0  # next batch of the current epoch: the data position
        self.elapsed_s = 0.0  # wall time spent training in earlier sessions of this run
        self.chars_seen = 0
        self.best_val = math.inf
        self.last_val = math.inf
        self.state: State | None = None
        if ckpt is not None:
            self._restore(ckpt)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _merge_resumed(self, cfg: RunConfig, ckpt: dict) -> RunConfig:
        """The architecture comes from the checkpoint; training settings may change on resume and are reported."""
        saved = config_from_dict(ckpt["config"])
        for f in dataclasses.fields(saved.model):
            new, old = getattr(cfg.model, f.name), getattr(saved.model, f.name)
            if new != old:
                raise UsageError(f"config model.{f.name}={new!r} contradicts the checkpoint ({old!r}): "
                                 f"drop it to resume, or start a new run")
        changed = [f"train.{f.name}={getattr(cfg.train, f.name)!r}" for f in dataclasses.fields(cfg.train)
                   if getattr(cfg.train, f.name) != getattr(saved.train, f.name)]
        if changed:
            self.log("resume: changed training settings: " + ", ".join(changed))
        return cfg

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        pos = ckpt["position"]
        self.step, self.epoch, self.batch_index = pos["step"], pos["epoch"], pos["batch_index"]
        self.elapsed_s, self.chars_seen = pos["elapsed_s"], pos["chars_seen"]
        self.best_val = ckpt["metrics"]["best_val_loss"]
        self.last_val = ckpt["metrics"]["val_loss"]
        if ckpt.get("hidden") is not None:
            self.state = tuple(s.to(self.device) for s in ckpt["hidden"])
        restore_rng(ckpt["rng"])
        self.log(f"resumed from step {self.step} (epoch {self.epoch}, batch {self.batch_index}, "
                 f"best val {self.best_val:.4f})")

    # --- the budget ------------------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return self.elapsed_s + (time.perf_counter() - self._t0)

    def budget_used(self) -> float:
        """Fraction (0..1+) of the run's budget spent: the largest of steps, epochs and minutes used."""
        t = self.cfg.train
        fractions = []
        if t.max_steps:
            fractions.append(self.step / t.max_steps)
        if t.max_epochs:
            fractions.append((self.epoch + self.batch_index / len(self.train_data)) / t.max_epochs)
        if t.max_minutes:
            fractions.append(self.elapsed() / (60 * t.max_minutes))
        return max(fractions)

    # --- one step, evaluation, samples ------------------------------------------------------------------------

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        """One optimizer step on batch (x, y) with the carried state; returns the loss as a device tensor."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.state is None:
            self.state = self.model.init_state(x.size(0), self.device)
        logits, state = self.model(x, self.state)  # (B, T, V)
        self.state = detach_state(state)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip, foreach=True)
        self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss in nats per character over the whole validation split, the state carried across batches."""
        if self.val_data is None:
            return math.nan
        self.model.eval()
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        state = None
        for x, y in self.val_data:
            logits, state = self.model(x, state)
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        self.model.train()
        return total.item() / self.val_data.chars_per_epoch

    def sample_text(self, length: int) -> str:
        """A short sample from the current model, for watching progress; uses its own RNG so training is unchanged."""
        s = self.cfg.sample
        prime = s.prime if s.prime and not self.vocab.unknown(s.prime) else self.vocab.chars[0]
        gen = torch.Generator(self.device).manual_seed(self.step)
        ids = self.vocab.encode(prime).long().to(self.device).unsqueeze(0)
        out = generate(self.model, ids, length, s.temperature or 0.8, s.top_k, gen)
        return prime + self.vocab.decode(out[0])

    # --- the loop -------------------------------------------------------------------------------------------

    def done(self) -> bool:
        return self.budget_used() >= 1.0

    def fit(self) -> dict:
        """Train until the budget is spent; evaluate and save at intervals and at the end. Returns the summary."""
        t = self.cfg.train
        self._t0 = time.perf_counter()
        self._prepare_files()
        self.log(f"model: {self.cfg.model.cell} {self.cfg.model.num_layers}x{self.cfg.model.hidden_size}, "
                 f"{self.model.num_params():,} parameters, vocab {len(self.vocab)}, device {self.device}; "
                 f"train {self.train_data.chars_per_epoch:,} chars "
                 f"({len(self.train_data)} batches/epoch), val {self.val_data.chars_per_epoch if self.val_data else 0:,}")
        self.model.train()
        bar = tqdm(total=t.max_steps or None, initial=self.step, disable=not self.progress, file=sys.stderr,
                   unit="step", dynamic_ncols=True)
        running = torch.zeros((), device=self.device)
        since, chars_since, t_log = 0, 0, time.perf_counter()
        evaluated_at = self.step
        while not self.done():
            if self.batch_index == 0:
                self.state = None  # each epoch starts every stream from a zero state
            x, y = self.train_data.batch(self.batch_index)
            lr = lr_at(t, self.step, self.budget_used())
            running += self.train_step(x, y, lr)
            self.step += 1
            since += 1
            chars_since += x.numel()
            self.chars_seen += x.numel()
            self.batch_index += 1
            if self.batch_index == len(self.train_data):
                self.epoch, self.batch_index = self.epoch + 1, 0
            bar.update(1)
            is_eval = self.step % t.eval_every == 0
            if self.step % t.log_every == 0 or is_eval or self.done():
                now = time.perf_counter()
                train_loss = running.item() / since
                rate = chars_since / max(now - t_log, 1e-9)
                record = {"step": self.step, "epoch": round(self.epoch + self.batch_index / len(self.train_data), 4),
                          "train_loss": round(train_loss, 5), "lr": lr, "chars_per_s": round(rate, 1),
                          "elapsed_s": round(self.elapsed(), 2)}
                if is_eval or self.done():
                    record.update(self._eval_and_save())
                    evaluated_at = self.step
                bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{self.last_val:.3f}", cps=f"{rate:,.0f}")
                self._append_metrics(record)
                running.zero_()
                since, chars_since, t_log = 0, 0, time.perf_counter()
        if evaluated_at != self.step:
            self._eval_and_save()
        bar.close()
        return self._summary()

    def _eval_and_save(self) -> dict:
        val = self.evaluate()
        self.last_val = val
        improved = val < self.best_val
        if improved:
            self.best_val = val
        record = {"val_loss": round(val, 5), "val_bpc": round(val / LN2, 5)}
        ckpt = self.checkpoint_dict()
        checkpoint.save(ckpt, self.run_dir / "last.pt")
        if improved:
            checkpoint.save(ckpt, self.run_dir / "best.pt")
        mark = " (best, saved)" if improved else ""
        self.log(f"step {self.step}: val loss {val:.4f} nats/char, {val / LN2:.4f} bits/char{mark}")
        if self.cfg.train.sample_length:
            text = self.sample_text(self.cfg.train.sample_length)
            self.log(f"--- sample at step {self.step} ---\n{text}\n---")
            with open(self.run_dir / "samples.txt", "a", encoding="utf-8") as f:
                f.write(f"=== step {self.step} (val loss {val:.4f}) ===\n{text}\n\n")
        return record

    def checkpoint_dict(self) -> dict:
        """Everything a resume or a sampler needs, as plain data."""
        return {
            "model_args": self.model.args.to_dict(),
            "model": self.model.state_dict(),
            "config": self.cfg.to_dict(),
            "vocab": self.vocab.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": {"lr": self.optimizer.param_groups[0]["lr"], "budget_used": self.budget_used()},
            "position": {"step": self.step, "epoch": self.epoch, "batch_index": self.batch_index,
                         "elapsed_s": self.elapsed(), "chars_seen": self.chars_seen},
            "rng": capture_rng(),
            "hidden": list(self.state) if self.state is not None else None,
            "metrics": {"best_val_loss": self.best_val, "val_loss": self.last_val},
            "torch_version": str(torch.__version__),
            "device": str(self.device),
        }

    # --- run directory files ------------------------------------------------------------------------------------

    def _prepare_files(self) -> None:
        (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml(), encoding="utf-8")
        metrics = self.run_dir / "metrics.jsonl"
        if self.step == 0:
            metrics.write_text("", encoding="utf-8")
            (self.run_dir / "samples.txt").write_text("", encoding="utf-8")
        elif metrics.exists():  # drop lines logged after the checkpoint we resumed from
            keep = [ln for ln in metrics.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
            metrics.write_text("".join(k + "\n" for k in keep), encoding="utf-8")

    def _append_metrics(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _summary(self) -> dict:
        wall = self.elapsed()
        summary = {"steps": self.step, "epochs": round(self.epoch + self.batch_index / len(self.train_data), 3),
                   "chars_seen": self.chars_seen, "wall_s": round(wall, 1),
                   "chars_per_s": round(self.chars_seen / max(wall, 1e-9), 1),
                   "best_val_loss": self.best_val, "best_val_bpc": self.best_val / LN2,
                   "run_dir": str(self.run_dir)}
        self.log(f"done: {self.step} steps, {self.chars_seen:,} chars in {wall:.0f}s ({summary['chars_per_s']:,.0f} "
                 f"chars/s); best val loss {self.best_val:.4f} nats/char = {self.best_val / LN2:.4f} bits/char; "
                 f"checkpoints in {self.run_dir}")
        return summary


def train(cfg: RunConfig, run_dir: str | Path, resume: dict | None = None, overwrite: bool = False,
          progress: bool = True) -> dict:
    """Build a Trainer and run it to the end of its budget; returns the summary."""
    return Trainer(cfg, run_dir, resume=resume, overwrite=overwrite, progress=progress).fit()
