"""The Trainer: text -> vocab -> batches -> model, with the schedule, evaluation, logging and checkpoints of a run.

`fit()` decides when to evaluate, log and stop; `train_step()` is exactly one optimizer step; `evaluate()` runs under
no_grad; the learning rate is a pure function of recorded state (the step, the fraction of the budget used, the
plateau cuts), so a resume continues bit for bit. A run directory holds `config.yaml`, `metrics.jsonl`,
`samples.txt`, `last.pt`, `best.pt` (by validation loss), optional `step-*.pt` and, at the end, `summary.json`; when to
save and what to keep is `checkpoint.RunCheckpoints`' policy. SIGINT/SIGTERM stop after the current step with a save.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import json
import math
import random
import re
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint, cpu_lstm
from .config import RunConfig, config_from_dict
from .data import Batcher, Corpus, known_items, split_ids
from .errors import CharrnnError, UsageError
from .model import CharRNN, ModelArgs, State, detach_state, generate, native_bf16, resolve_device
from .vocab import Vocab, show_chars

LN2 = math.log(2)
SAMPLE_HEADING = re.compile(r"^=== step (\d+) ", re.MULTILINE)  # how samples.txt starts each evaluation's sample


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


OVERFIT_RISE = 0.02  # nats/char: a final val loss this far above the run's best is worth a hint


def overfit_hint(best_val: float, best_step: int, last_val: float, step: int, epochs: float,
                 dropout: float) -> str | None:
    """A one-line hint when a run ended with its val loss well above its best: the model began to learn the training
    text by heart, and more dropout (or a smaller model) would have done better for a budget this long. On tiny
    Shakespeare, 20 minutes of the 2x384 config (16-18 epochs) gave 1.4627 with dropout 0.1 and 1.4270 with 0.3."""
    if not (math.isfinite(best_val) and math.isfinite(last_val)) or last_val - best_val < OVERFIT_RISE \
            or best_step >= step:
        return None
    fix = f"more dropout (--set model.dropout={min(dropout + 0.2, 0.5):g})" if dropout < 0.5 else \
        "a smaller model (--set model.hidden_size=...)"
    return (f"note: val loss was lowest at step {best_step} ({best_val:.4f}) and rose to {last_val:.4f} by step {step} "
            f"({epochs:.1f} epochs): the model began to learn the training text by heart. best.pt holds step "
            f"{best_step}; for a run this long on this text, try {fix} or a shorter budget")


def load_corpus(cfg: RunConfig, vocab: Vocab | None = None, extend: bool = False) -> tuple[Vocab, torch.Tensor]:
    """Read (see `data.Corpus`) and encode the training text; build the vocabulary unless one is given (resume,
    fine-tune). `extend` adds the text's new characters to a given vocabulary (a fine-tune with --extend-vocab)."""
    corpus = Corpus(cfg.data)
    if vocab is None:
        vocab = Vocab.from_counts(corpus.counts, cfg.data.max_vocab, cfg.data.min_freq)
    elif (extend or not vocab.unk) and (bad := sorted(c for c in corpus.counts if c not in vocab)):
        if not extend:
            raise UsageError(f"{cfg.data.path} has {len(bad)} character(s) outside the checkpoint's vocabulary: "
                             f"{show_chars(bad)}; train on a text over the same characters, or fine-tune with "
                             f"--init-from CKPT --extend-vocab to add them")
        vocab = Vocab(sorted(vocab.chars + bad), unk=vocab.unk)
    return vocab, corpus.encode(vocab)


def check_length(cfg: RunConfig, n_train: int) -> None:
    """Refuse a training split shorter than one full batch, saying how many characters a batch needs and which
    smaller batch shape fits, rather than train silently on shorter sequences than train.n_steps asks for."""
    t = cfg.train
    need = t.n_seqs * t.n_steps + 1  # the targets are the inputs shifted by one character
    if n_train >= need:
        return
    if n_train - 1 >= t.n_seqs:
        fix = f", or a smaller batch: --set train.n_steps={(n_train - 1) // t.n_seqs}"
    elif n_train >= 2:
        fix = f", or a smaller batch: --set train.n_seqs=1 --set train.n_steps={n_train - 1}"
    else:
        fix = ""
    split = f" after data.val_fraction {cfg.data.val_fraction:g}" if cfg.data.val_fraction else ""
    raise CharrnnError(f"text file {cfg.data.path} is too short: {n_train:,} training characters{split}, and one "
                       f"batch of train.n_seqs x train.n_steps = {t.n_seqs} x {t.n_steps} needs {need:,}: use a "
                       f"longer text{fix}")


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for reuse rather than hand it back to the kernel. A CPU training step
    frees and re-allocates the same large buffers every step (activations, the LSTM kernel's workspace); glibc serves
    each one over 32 MB with a fresh mmap, whose pages the kernel faults in and zeroes again each time: on the anna
    config that was a sixth of the step (scripts/bench.py: 1,030 ms -> 830 ms). The process keeps its peak memory
    instead, which a training loop reaches every step anyway. A no-op where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    mallopt(m_mmap_max, 0)  # large blocks come from the heap, where freed ones are reused...
    mallopt(m_trim_threshold, 2 ** 31 - 1)  # ...and the heap's free top is not returned to the kernel


def make_optimizer(params, t, device: torch.device) -> torch.optim.Optimizer:
    """Adam or AdamW per train.optimizer, as one fused kernel over all the parameters where this torch has one (CUDA;
    CPU since torch 2.4, at a sixth of the foreach kernels' time), else the foreach kernels (not on MPS)."""
    params = list(params)
    opt = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    for kind in ("fused", "foreach") if device.type != "mps" else ():
        try:
            return opt(params, lr=t.lr, weight_decay=t.weight_decay, **{kind: True})
        except RuntimeError:  # no such kernel in this torch for this device
            pass
    return opt(params, lr=t.lr, weight_decay=t.weight_decay)


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


def flat_pairs(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, T, V) and targets (B, T) as rows (B*T, V) and (B*T,) for the loss, in the logits' memory order:
    a time-major model output (charrnn's CPU kernel) then needs no copy, and a mean or sum does not mind the order."""
    if not logits.is_contiguous() and logits.transpose(0, 1).is_contiguous():
        logits, y = logits.transpose(0, 1), y.t()
    return logits.reshape(-1, logits.size(-1)), y.reshape(-1)


@torch.no_grad()
def stream_loss(model: CharRNN, batches, n_chars: int) -> float:
    """Mean loss in nats per character over (x, y) batches laid out as streams (a `Batcher`, maybe behind a progress
    bar), the state carried from batch to batch: the trainer's validation loss and `charrnn eval` both use it."""
    total = torch.zeros((), dtype=torch.float64, device=model.head.weight.device)
    state = None
    for x, y in batches:
        logits, state = model(x, state)  # (B, T, V)
        total += F.cross_entropy(*flat_pairs(logits, y), reduction="sum")
    return total.item() / n_chars


VOCAB_ROWS = ("embed.weight", "head.weight", "head.bias")  # the parameters with one row per character
SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}  # the shell's 128 + signal number


class Interrupted(CharrnnError):
    """A second SIGINT/SIGTERM: training stops at once; the atomic writes keep every file on disk whole."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def signals_to(handler):
    """Route SIGINT and SIGTERM to `handler` while training (main thread only: Python delivers signals there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class Trainer:
    """One training run in `run_dir`; `resume` is a loaded checkpoint (see `checkpoint.load`) to continue exactly,
    `init_from` one whose weights start a new run (fine-tuning; `extend_vocab` grows its vocabulary to the text's).

    On resume, build `cfg` over the checkpoint's config (`load_config(..., base=ckpt["config"])`); to fine-tune, over
    its model section. After `fit()`, `exit_code` is 0, or 130/143 when SIGINT/SIGTERM stopped the run.
    """

    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: dict | None = None,
                 overwrite: bool = False, progress: bool = True, log=None, init_from: dict | None = None,
                 extend_vocab: bool = False):
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
        ckpt = resume
        if ckpt is None and not overwrite and self.run_dir.is_dir() and \
                any(checkpoint.RUN_FILE.fullmatch(p.name) for p in self.run_dir.iterdir()):
            raise UsageError(f"run directory {self.run_dir} already holds a run: pass --resume auto to continue it, "
                             f"--overwrite to start over, or --run-dir for a new one")
        if ckpt is not None or init_from is not None:
            self._check_architecture(cfg, ckpt or init_from)
        if ckpt is not None:
            self._report_changes(cfg, ckpt)
        self.cfg = cfg
        t = cfg.train
        self.device = resolve_device(t.device)
        torch.manual_seed(t.seed)
        random.seed(t.seed)

        given = ckpt or init_from
        self.vocab, ids = load_corpus(cfg, Vocab.from_dict(given["vocab"]) if given else None,
                                      extend=extend_vocab and init_from is not None)
        train_ids, val_ids = split_ids(ids, cfg.data.val_fraction)
        check_length(cfg, len(train_ids))
        self.train_data = Batcher(train_ids, t.n_seqs, t.n_steps, self.device)
        self.val_data = Batcher(val_ids, min(t.n_seqs, max(1, len(val_ids) - 1)), t.n_steps, self.device) \
            if len(val_ids) > 1 else None
        if self.val_data is None and (t.patience or t.plateau_patience):
            raise UsageError("train.patience and train.plateau_patience watch the validation loss, and this run has "
                             "no validation split: set data.val_fraction above 0 (or a longer text)")
        self._summary_writer = self._tensorboard_class() if t.tensorboard else None
        if self.device.type == "cpu":
            keep_freed_memory()  # after reading the text, whose freed buffers should go back to the kernel

        self.model = CharRNN(ModelArgs(vocab_size=len(self.vocab), **dataclasses.asdict(cfg.model))).to(self.device)
        self.model.kernel = t.kernel
        self.net = self.model  # what the steps run: the model itself, or its bfloat16 copy (train.precision=bf16)
        if t.precision == "bf16":
            if not native_bf16(self.device):
                self.log(f"warning: train.precision=bf16, but {self.device} has no native bfloat16 (AVX512-BF16, "
                         f"AMX or a bf16 GPU): it is emulated and likely slower than fp32")
            self.net = copy.deepcopy(self.model).to(torch.bfloat16)
        self.optimizer = make_optimizer(self.model.parameters(), t, self.device)

        self.step = 0
        self.epoch = 0
        self.batch_index = 0  # next batch of the current epoch: the data position
        self.elapsed_s = 0.0  # wall time spent training in earlier sessions of this run
        self.chars_seen = 0
        self.best_val = math.inf
        self.best_step = 0
        self.last_val = math.inf
        self.first_loss: float | None = None  # the run's first logged train loss: the divergence guard's yardstick
        self.lr_scale = 1.0  # the product of the plateau cuts so far
        self.evals_since_best = 0  # for early stopping
        self.evals_since_cut = 0  # for reduce-on-plateau: since the best or the last cut
        # the metrics line in progress: sums over the steps since the last logged one, kept on the device
        self.loss_sum = torch.zeros((), device=self.device)
        self.grad_norm_sum = torch.zeros((), device=self.device)
        self.window_steps = 0
        self.state: State | None = None
        self.exit_code = 0
        self._signal: str | None = None  # the stop request, SIGINT or SIGTERM
        self._failure = "error"  # the summary's `stopped` when a CharrnnError ends the run
        self.keeper = checkpoint.RunCheckpoints(self.run_dir, t.checkpoint_every, t.checkpoint_minutes, t.keep_last,
                                                self.log)
        if ckpt is not None:
            self._restore(ckpt)
        elif init_from is not None:
            self._init_weights(init_from)

    def _check_architecture(self, cfg: RunConfig, ckpt: dict) -> None:
        """The architecture comes from the checkpoint: a config that contradicts it is an error naming the field."""
        saved = config_from_dict(ckpt["config"])
        for f in dataclasses.fields(saved.model):
            new, old = getattr(cfg.model, f.name), getattr(saved.model, f.name)
            if new != old:
                raise UsageError(f"config model.{f.name}={new!r} contradicts the checkpoint ({old!r}): "
                                 f"drop it to continue from the checkpoint, or start a new run")

    def _report_changes(self, cfg: RunConfig, ckpt: dict) -> None:
        """Training settings may change on resume; say which did."""
        saved = config_from_dict(ckpt["config"])
        changed = [f"train.{f.name}={getattr(cfg.train, f.name)!r}" for f in dataclasses.fields(cfg.train)
                   if getattr(cfg.train, f.name) != getattr(saved.train, f.name)]
        if changed:
            self.log("resume: changed training settings: " + ", ".join(changed))

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self._copy_to_net()
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group in self.optimizer.param_groups:  # the loaded state carries the old run's value
            group["weight_decay"] = self.cfg.train.weight_decay
        pos = ckpt["position"]
        self.step, self.epoch, self.batch_index = pos["step"], pos["epoch"], pos["batch_index"]
        self.elapsed_s, self.chars_seen = pos["elapsed_s"], pos["chars_seen"]
        m, sched, window = ckpt["metrics"], ckpt["schedule"], ckpt.get("log_window", {})
        self.best_val, self.last_val = m["best_val_loss"], m["val_loss"]
        self.best_step, self.first_loss = m.get("best_step", 0), m.get("first_loss")
        self.lr_scale = sched.get("lr_scale", 1.0)
        self.evals_since_best = sched.get("evals_since_best", 0)
        self.evals_since_cut = sched.get("evals_since_cut", 0)
        self.loss_sum.fill_(window.get("loss_sum", 0.0))
        self.grad_norm_sum.fill_(window.get("grad_norm_sum", 0.0))
        self.window_steps = window.get("steps", 0)
        if ckpt.get("hidden") is not None:
            self.state = tuple(s.to(self.device, self.net.head.weight.dtype) for s in ckpt["hidden"])
        restore_rng(ckpt["rng"])
        self.log(f"resumed from step {self.step} (epoch {self.epoch}, batch {self.batch_index}, "
                 f"best val {self.best_val:.4f})")

    def _init_weights(self, ckpt: dict) -> None:
        """Fine-tune: start from the checkpoint's weights. With an extended vocabulary every old character keeps its
        trained embedding and output rows (moved to its place in the sorted vocabulary); new ones start fresh."""
        old = Vocab.from_dict(ckpt["vocab"])
        weights = dict(ckpt["model"])
        if old.chars != self.vocab.chars:
            fresh = self.model.state_dict()
            rows = torch.tensor([self.vocab.index[c] for c in old.chars], device=self.device)
            for name in VOCAB_ROWS:
                grown = fresh[name].clone()
                grown[rows] = weights[name].to(self.device)
                weights[name] = grown
            added = [c for c in self.vocab.chars if c not in old]
            self.log(f"vocabulary extended by {len(added)} character(s): {show_chars(added)}")
        self.model.load_state_dict(weights)
        self._copy_to_net()

    def _tensorboard_class(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise CharrnnError("train.tensorboard=true needs the tensorboard package: pip install tensorboard, "
                               "or set train.tensorboard=false") from None
        return SummaryWriter

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

    def lr(self) -> float:
        """The next step's learning rate: the schedule times the plateau cuts, both recorded, so resume is exact."""
        return lr_at(self.cfg.train, self.step, self.budget_used()) * self.lr_scale

    # --- one step, evaluation, samples ------------------------------------------------------------------------

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        """One optimizer step on batch (x, y) with the carried state; returns the loss as a device tensor (no sync)
        and leaves the gradient norm before clipping in `self.grad_norm`.

        With train.precision=bf16 the forward and backward run on the bfloat16 copy `net`; its gradients are widened
        onto the fp32 master weights, which the optimizer updates and which are copied back to `net`: the cheap
        matmuls of bf16 without its rounding accumulating in the weights and optimizer moments."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.state is None:
            self.state = self.net.init_state(x.size(0), self.device)
        logits, state = self.net(x, self.state)  # (B, T, V)
        self.state = detach_state(state)
        rows, targets = flat_pairs(logits, y)
        loss = F.cross_entropy(rows.float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        if self.net is not self.model:
            self.net.zero_grad(set_to_none=True)
        loss.backward()
        if self.net is not self.model:
            for master, p in zip(self.model.parameters(), self.net.parameters()):
                master.grad = p.grad.float()
        clip = self.cfg.train.grad_clip or math.inf  # inf: measure the norm, scale by exactly 1
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True).detach()
        self.optimizer.step()
        self._copy_to_net()
        return loss.detach()

    @torch.no_grad()
    def _copy_to_net(self) -> None:
        """Bring the bf16 copy up to date with the fp32 master weights (nothing to do in fp32)."""
        if self.net is not self.model:
            for p, master in zip(self.net.parameters(), self.model.parameters()):
                p.copy_(master)

    def evaluate(self) -> float:
        """Mean loss in nats per character over the whole validation split."""
        if self.val_data is None:
            return math.nan
        self.model.eval()
        loss = stream_loss(self.model, self.val_data, self.val_data.chars_per_epoch)
        self.model.train()
        return loss

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

    def _kernel_note(self) -> str:
        """Which kernel runs an fp32 LSTM on a CPU, for the start-up line: charrnn's, or torch's and why."""
        if self.cfg.model.cell != "lstm" or self.device.type != "cpu" or self.net is not self.model:
            return ""
        if self.model.uses_cpu_kernel(self.train_data.batch(0)[0]):
            return " (LSTM on charrnn's CPU kernel)"
        why = cpu_lstm.unavailable() if self.cfg.train.kernel == "auto" else None
        return f" (LSTM on torch's kernel: charrnn's could not be built: {why.splitlines()[0]})" if why else ""

    def fit(self) -> dict:
        """Train until the budget is spent, early stopping or a stop request (SIGINT, SIGTERM); evaluate and save
        at intervals and at the end. Returns the summary, also written to summary.json."""
        t = self.cfg.train
        self._t0 = time.perf_counter()
        self._prepare_files()
        self.log(f"model: {self.cfg.model.cell} {self.cfg.model.num_layers}x{self.cfg.model.hidden_size}, "
                 f"{self.model.num_params():,} parameters, vocab {len(self.vocab)}, device {self.device}"
                 f"{self._kernel_note()}; "
                 f"train {self.train_data.chars_per_epoch:,} chars "
                 f"({len(self.train_data)} batches/epoch), val {self.val_data.chars_per_epoch if self.val_data else 0:,}")
        self.model.train()
        bar = tqdm(total=t.max_steps or None, initial=self.step, disable=not self.progress, file=sys.stderr,
                   unit="step", dynamic_ncols=True)
        tb = self._summary_writer(str(self.run_dir / "tensorboard"), purge_step=self.step + 1 if self.step else None) \
            if self._summary_writer else None
        try:
            with signals_to(self._on_signal):
                stopped = self._loop(bar, tb)
        except Interrupted:
            raise
        except CharrnnError:  # diverged, or checkpoints could not be saved
            self._write_summary(self._summary(self._failure))
            raise
        finally:
            bar.close()
            if tb is not None:
                tb.close()
        summary = self._summary(stopped)
        self._write_summary(summary)
        self._report(summary)
        return summary

    def _loop(self, bar, tb) -> str:
        """The steps; returns why they ended: budget, early_stopping, SIGINT or SIGTERM."""
        t = self.cfg.train
        chars_since, t_log = 0, time.perf_counter()
        finished = self.done()
        while not finished and not self._signal:
            if self.batch_index == 0:
                self.state = None  # each epoch starts every stream from a zero state
            x, y = self.train_data.batch(self.batch_index)
            lr = self.lr()
            self.loss_sum += self.train_step(x, y, lr)
            self.grad_norm_sum += self.grad_norm
            self.window_steps += 1
            self.step += 1
            chars_since += x.numel()
            self.chars_seen += x.numel()
            self.batch_index += 1
            if self.batch_index == len(self.train_data):
                self.epoch, self.batch_index = self.epoch + 1, 0
            bar.update(1)
            finished = self.done()
            is_eval = self.step % t.eval_every == 0 or finished
            if self.step % t.log_every == 0 or is_eval:
                record = self._log_record(lr, chars_since / max(time.perf_counter() - t_log, 1e-9))
                chars_since, t_log = 0, time.perf_counter()
                if is_eval:
                    record.update(self._evaluate_record())
                bar.set_postfix(loss=f"{record['train_loss']:.3f}", val=f"{self.last_val:.3f}",
                                cps=f"{record['chars_per_s']:,.0f}")
                self._append_metrics(record, tb)  # before the checkpoint: a resume keeps lines up to its step
            stop_early = is_eval and t.patience and self.evals_since_best >= t.patience
            if is_eval or self.keeper.due(self.step):
                best = self.keeper.save(self.checkpoint_dict(), self.step, self.last_val if is_eval else None,
                                        final=finished or stop_early)
                if is_eval:
                    self._report_eval(best)
            if stop_early:
                self.log(f"early stopping at step {self.step}: no new best val loss in {t.patience} evaluations "
                         f"(best {self.best_val:.4f} at step {self.best_step})")
                return "early_stopping"
        if finished:
            return "budget"
        if self.keeper.saved_step != self.step:
            self.keeper.save(self.checkpoint_dict(), self.step, final=True)
        return self._signal

    def _on_signal(self, signum, frame) -> None:
        """The first SIGINT/SIGTERM asks the loop to stop after the current step and save; a second stops at once."""
        name = signal.Signals(signum).name
        if self._signal:
            raise Interrupted(f"{name} again: stopped at once at step {self.step}; {self._resume_hint()}",
                              SIGNAL_EXIT[name])
        self._signal = name
        self.log(f"{name}: stopping after this step and saving last.pt (send it again to stop at once)")

    def _resume_hint(self) -> str:
        if self.keeper.saved_step is None and not (self.run_dir / "last.pt").exists():
            return "no checkpoint was saved"
        held = f" (step {self.keeper.saved_step})" if self.keeper.saved_step is not None else ""
        return f"resume with: charrnn train --resume {shlex.quote(str(self.run_dir / 'last.pt'))}{held}"

    def _log_record(self, lr: float, chars_per_s: float) -> dict:
        """The metrics line of the steps since the last one; stops the run if the loss diverged."""
        loss_sum, grad_sum = torch.stack([self.loss_sum, self.grad_norm_sum]).tolist()  # one device sync
        train_loss, grad_norm = loss_sum / self.window_steps, grad_sum / self.window_steps
        self.loss_sum.zero_()
        self.grad_norm_sum.zero_()
        self.window_steps = 0
        self._check_divergence(train_loss)
        if self.first_loss is None:
            self.first_loss = train_loss
        return {"step": self.step, "epoch": round(self.epoch + self.batch_index / len(self.train_data), 4),
                "train_loss": round(train_loss, 5), "lr": lr, "grad_norm": round(grad_norm, 5),
                "chars_per_s": round(chars_per_s, 1), "elapsed_s": round(self.elapsed(), 2)}

    def _check_divergence(self, train_loss: float) -> None:
        """A NaN/inf loss, or one above diverge_factor x the first logged loss, ends the run (exit 1) without saving
        the broken weights: last.pt and best.pt keep the last good state."""
        factor = self.cfg.train.diverge_factor
        if math.isfinite(train_loss) and not (factor and self.first_loss and train_loss > factor * self.first_loss):
            return
        self._failure = "diverged"
        why = f"loss {train_loss:.4g}" + ("" if not math.isfinite(train_loss) else
                                          f", over {factor:g}x the first logged loss {self.first_loss:.4g}")
        kept = f"last.pt (step {self.keeper.saved_step}) and best.pt are kept" if self.keeper.saved_step is not None \
            else "the checkpoints on disk are kept"
        raise CharrnnError(f"training diverged at step {self.step} ({why}); {kept}; retry with a lower learning rate: "
                           f"--set train.lr={self.cfg.train.lr / 3:.2g}")

    def _evaluate_record(self) -> dict:
        """Evaluate, and update the early-stopping and plateau counters and the lr scale from the result."""
        t = self.cfg.train
        val = self.evaluate()
        self.last_val = val
        if val < self.best_val:
            self.best_val, self.best_step = val, self.step
            self.evals_since_best = self.evals_since_cut = 0
        else:
            self.evals_since_best += 1
            self.evals_since_cut += 1
            if t.plateau_patience and self.evals_since_cut >= t.plateau_patience:
                self.lr_scale *= t.plateau_factor
                self.evals_since_cut = 0
                self.log(f"step {self.step}: no new best val loss in {t.plateau_patience} evaluations: "
                         f"lr x{t.plateau_factor:g} (now {self.lr_scale:g} of the schedule)")
        return {"val_loss": round(val, 5), "val_bpc": round(val / LN2, 5)}

    def _report_eval(self, best: bool) -> None:
        val = self.last_val
        mark = " (best, saved)" if best else ""
        self.log(f"step {self.step}: val loss {val:.4f} nats/char, {val / LN2:.4f} bits/char{mark}")
        if self.cfg.train.sample_length:
            text = self.sample_text(self.cfg.train.sample_length)
            self.log(f"--- sample at step {self.step} ---\n{text}\n---")
            self._append("samples.txt", f"=== step {self.step} (val loss {val:.4f}) ===\n{text}\n\n")

    def checkpoint_dict(self) -> dict:
        """Everything a resume or a sampler needs, as plain data."""
        loss_sum, grad_sum = torch.stack([self.loss_sum, self.grad_norm_sum]).tolist()
        return {
            "model_args": self.model.args.to_dict(),
            "model": self.model.state_dict(),
            "config": self.cfg.to_dict(),
            "vocab": self.vocab.to_dict(),
            "known_items": known_items(self.cfg.data) if self.cfg.data.mode == "lines" else None,  # for --novel
            "optimizer": self.optimizer.state_dict(),
            "schedule": {"lr": self.optimizer.param_groups[0]["lr"], "budget_used": self.budget_used(),
                         "lr_scale": self.lr_scale, "evals_since_best": self.evals_since_best,
                         "evals_since_cut": self.evals_since_cut},
            "position": {"step": self.step, "epoch": self.epoch, "batch_index": self.batch_index,
                         "elapsed_s": self.elapsed(), "chars_seen": self.chars_seen},
            "rng": capture_rng(),
            "hidden": [s.float() for s in self.state] if self.state is not None else None,
            "metrics": {"best_val_loss": self.best_val, "val_loss": self.last_val, "best_step": self.best_step,
                        "first_loss": self.first_loss},
            "log_window": {"loss_sum": loss_sum, "grad_norm_sum": grad_sum, "steps": self.window_steps},
            "torch_version": str(torch.__version__),
            "device": str(self.device),
        }

    # --- run directory files ------------------------------------------------------------------------------------

    def _prepare_files(self) -> None:
        """Clean up after a crash (stale temp files; metrics lines and samples past the resumed step, or torn by a
        kill) and write config.yaml; a new run starts its files empty."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.keeper.start(fresh=self.step == 0)
            checkpoint.write_atomic(self.run_dir / "config.yaml", self.cfg.to_yaml().encode("utf-8"))
            metrics = self.run_dir / "metrics.jsonl"
            if self.step == 0:
                metrics.write_text("", encoding="utf-8")
                (self.run_dir / "samples.txt").write_text("", encoding="utf-8")
                (self.run_dir / "summary.json").unlink(missing_ok=True)
            elif metrics.exists():
                keep = [ln for ln in metrics.read_text(encoding="utf-8").splitlines()
                        if (rec := _parse_line(ln)) and rec.get("step", 0) <= self.step]
                checkpoint.write_atomic(metrics, "".join(k + "\n" for k in keep).encode("utf-8"))
            samples = self.run_dir / "samples.txt"
            if self.step and samples.exists():
                text = samples.read_text(encoding="utf-8")
                later = [m.start() for m in SAMPLE_HEADING.finditer(text) if int(m.group(1)) > self.step]
                if later:
                    checkpoint.write_atomic(samples, text[:later[0]].encode("utf-8"))
        except OSError as e:
            raise CharrnnError(f"cannot write to run directory {self.run_dir} ({e.strerror or e}): check its "
                               f"permissions and free space, or pass --run-dir") from None

    def _append(self, name: str, text: str) -> None:
        """Append to a run file; a failure (disk full) is reported, and training goes on."""
        try:
            with open(self.run_dir / name, "a", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            self.log(f"warning: could not write {self.run_dir / name} ({e.strerror or e}); training goes on")

    def _append_metrics(self, record: dict, tb) -> None:
        self._append("metrics.jsonl", json.dumps(record) + "\n")
        if tb is not None:
            for key in ("train_loss", "val_loss", "val_bpc", "lr", "grad_norm", "chars_per_s"):
                if key in record:
                    tb.add_scalar(key, record[key], self.step)

    def _summary(self, stopped: str) -> dict:
        wall = self.elapsed()
        best = self.best_val if math.isfinite(self.best_val) else None
        return {"steps": self.step, "epochs": round(self.epoch + self.batch_index / len(self.train_data), 3),
                "chars_seen": self.chars_seen, "wall_s": round(wall, 1),
                "chars_per_s": round(self.chars_seen / max(wall, 1e-9), 1),
                "best_val_loss": best, "best_val_bpc": best / LN2 if best is not None else None,
                "best_step": self.best_step, "stopped": stopped, "run_dir": str(self.run_dir)}

    def _write_summary(self, summary: dict) -> None:
        try:
            checkpoint.write_atomic(self.run_dir / "summary.json", (json.dumps(summary) + "\n").encode("utf-8"))
        except OSError as e:
            self.log(f"warning: could not write {self.run_dir / 'summary.json'} ({e.strerror or e})")

    def _report(self, summary: dict) -> None:
        stopped = summary["stopped"]
        head = "done" if stopped == "budget" else f"stopped ({stopped.replace('_', ' ')})"
        self.log(f"{head}: {self.step} steps, {self.chars_seen:,} chars in {summary['wall_s']:.0f}s "
                 f"({summary['chars_per_s']:,.0f} chars/s); best val loss {self.best_val:.4f} nats/char = "
                 f"{self.best_val / LN2:.4f} bits/char; checkpoints in {self.run_dir}")
        if stopped in SIGNAL_EXIT:
            self.exit_code = SIGNAL_EXIT[stopped]
            self.log(f"interrupted by {stopped} at step {self.step}; {self._resume_hint()}")
        elif hint := overfit_hint(self.best_val, self.best_step, self.last_val, self.step, summary["epochs"],
                                  self.cfg.model.dropout):
            self.log(hint)


def _parse_line(line: str) -> dict | None:
    """One metrics.jsonl record, or None for a blank or torn line (a kill mid-write)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def train(cfg: RunConfig, run_dir: str | Path, resume: dict | None = None, overwrite: bool = False,
          progress: bool = True) -> dict:
    """Build a Trainer and run it to the end of its budget; returns the summary."""
    return Trainer(cfg, run_dir, resume=resume, overwrite=overwrite, progress=progress).fit()
