"""Checkpoints: one self-contained dict of plain data, written atomically and loaded with `weights_only=True`.

A checkpoint holds the model args and weights, the resolved config, the vocabulary, optimizer and schedule state, the
step and data position, RNG states, the carried hidden state and metrics: enough to sample from it alone, or to
resume a run exactly. No pickled objects, so loading one runs no code; tensors are saved from the CPU so it loads
anywhere. A `.safetensors` file (`charrnn export --format safetensors`) holds the weights, vocabulary and config
without the training state: enough to sample, evaluate and fine-tune, not to resume. `RunCheckpoints` is the run
directory's policy: when to save, which files to keep, best.pt never replaced by a worse model, and what a failed
write does.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import time
import warnings
from pathlib import Path

import torch

from .errors import CharrnnError
from .files import write_atomic
from .model import CharRNN, ModelArgs
from .vocab import Vocab

FORMAT = "charrnn-checkpoint"
FORMAT_VERSION = 1


def to_cpu(obj):
    """Move every tensor in a nested structure to the CPU, so the file loads on any machine."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def encode(ckpt: dict) -> bytes:
    """The bytes of a checkpoint file, so one checkpoint written to several names is serialized once."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **to_cpu(ckpt)}, buf)
    return buf.getvalue()


def save(ckpt: dict, path: str | Path) -> Path:
    """Write `ckpt` to `path` atomically (see `write_atomic`)."""
    return write_atomic(path, encode(ckpt))


def load(path: str | Path) -> dict:
    """Load a checkpoint on the CPU without unpickling objects; a wrong, corrupt or newer file is a clear error."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "not found"
        raise CharrnnError(f"checkpoint {path} {what}: pass the path of a .pt file written by `charrnn train`")
    if path.suffix == ".safetensors":
        ckpt = _load_safetensors(path)
    else:
        try:
            with warnings.catch_warnings():  # a foreign pickle's protocol is reported by the refusal below, if at all
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported (?:global: GLOBAL|operand) ?\S*", str(e))
            why = f" ({found.group(0).strip()})" if found else ""
            raise CharrnnError(f"checkpoint {path} was refused: it holds objects that are not plain data{why}; "
                               f"only load checkpoints written by charrnn") from None
        except Exception as e:  # torch's loader raises many types for a torn or foreign file
            raise CharrnnError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}): "
                               f"use another checkpoint, e.g. the run's best.pt or last.pt") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CharrnnError(f"{path} is not a charrnn checkpoint: pass a .pt file written by `charrnn train`")
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CharrnnError(f"checkpoint {path} has format version {version}, newer than this charrnn reads "
                           f"({FORMAT_VERSION}): upgrade charrnn")
    return ckpt


SAFETENSORS_KEYS = ("format", "format_version", "model_args", "vocab", "config", "position", "metrics",
                    "torch_version", "device")  # the entries an export keeps, as JSON in the metadata


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise CharrnnError("safetensors files need the safetensors package: pip install 'charrnn[safetensors]'") \
            from None
    return safetensors.torch


def save_safetensors(ckpt: dict, path: str | Path) -> Path:
    """Write a checkpoint's weights (and lines-mode known items) as safetensors, its vocabulary, config and progress
    as JSON metadata, atomically."""
    tensors = {f"model.{k}": v.contiguous() for k, v in ckpt["model"].items()}
    if ckpt.get("known_items") is not None:
        tensors["known_items"] = ckpt["known_items"]
    meta = json.dumps({k: ckpt.get(k) for k in SAFETENSORS_KEYS}, ensure_ascii=False)
    return write_atomic(path, _safetensors().save(tensors, metadata={"charrnn": meta}))


def _load_safetensors(path: Path) -> dict:
    """The checkpoint dict of a `save_safetensors` file (no optimizer or training state); parsing it runs no code."""
    st = _safetensors()
    try:
        with st.safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        ckpt = json.loads(meta["charrnn"]) if "charrnn" in meta else {}
    except Exception as e:  # safetensors raises its own error types for a torn or foreign file
        raise CharrnnError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}): "
                           f"export it again, or use the run's best.pt") from None
    if isinstance(ckpt, dict):
        ckpt["model"] = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        ckpt["known_items"] = tensors.get("known_items")
    return ckpt


def restore_model(ckpt: dict, device: torch.device | str = "cpu"):
    """Rebuild the model (in eval mode, on `device`) and vocabulary a checkpoint describes."""
    try:
        vocab = Vocab.from_dict(ckpt["vocab"])
        model = CharRNN(ModelArgs(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CharrnnError(f"checkpoint does not describe a charrnn model ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else e!r}): use a file written by `charrnn train`") from None
    model.to(device).eval()
    if hasattr(model.rnn, "flatten_parameters"):
        model.rnn.flatten_parameters()
    return model, vocab


# --- a run directory's checkpoints: when to save, what to keep -------------------------------------------------

STEP_FILE = re.compile(r"step-(\d+)\.pt")
TEMP_FILE = re.compile(r"\..+\.tmp-(\d+)")  # what write_atomic leaves behind when its process dies mid-write
RUN_FILE = re.compile(r"last\.pt|best\.pt|step-\d+\.pt")
MAX_FAILED_SAVES = 3  # saves in a row that may fail (disk full, read-only) before the run stops


def step_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows: assume it lives
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete the temp files of saves cut short by a crash: those of dead processes, and our own pid's (a recycled
    pid after a restart). A live process's temp file is left alone: it may be mid-write."""
    removed = []
    for p in Path(directory).iterdir():
        m = TEMP_FILE.fullmatch(p.name)
        if m and (int(m.group(1)) == os.getpid() or not _alive(int(m.group(1)))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


class RunCheckpoints:
    """The checkpoint policy of a run directory, kept out of the training loop.

    Saves happen at evaluations, interrupts and the end (the Trainer asks), and every `every_steps` steps or
    `every_minutes` minutes (`due`). Each save writes last.pt, a step-numbered copy when `keep_last` > 0 (the newest
    `keep_last` are kept), and best.pt only when the validation loss beats the one best.pt holds on disk, so a worse
    model never replaces it, across resumes too. A failed write (OSError: disk full, read-only) is reported in one
    line and training goes on with the earlier files intact; the run stops (CharrnnError) if the session's first
    save fails, if MAX_FAILED_SAVES saves fail in a row, or if the final save fails.
    """

    def __init__(self, run_dir: str | Path, every_steps: int = 0, every_minutes: float = 0.0, keep_last: int = 0,
                 log=print):
        self.dir = Path(run_dir)
        self.every_steps, self.every_minutes, self.keep_last = every_steps, every_minutes, keep_last
        self.log = log
        self.best_val = math.inf  # the validation loss of best.pt on disk
        self.saved_step: int | None = None  # the step last.pt holds, once this session wrote it
        self.saves = 0  # successful saves this session
        self.failures = 0  # failed saves in a row
        self._last_save = time.monotonic()

    def start(self, fresh: bool) -> None:
        """Before the first step: drop crashed saves' temp files; a fresh run also drops an old run's checkpoints
        (only reached with --overwrite); otherwise read which validation loss best.pt has to beat."""
        stale = remove_stale_temps(self.dir)
        if stale:
            self.log(f"removed {len(stale)} temp file(s) of an interrupted save: {', '.join(p.name for p in stale)}")
        if fresh:
            for p in self.dir.iterdir():
                if RUN_FILE.fullmatch(p.name):
                    p.unlink()
        elif (self.dir / "best.pt").exists():
            try:
                self.best_val = load(self.dir / "best.pt")["metrics"]["val_loss"]
            except (CharrnnError, KeyError, TypeError) as e:
                self.log(f"warning: {self.dir / 'best.pt'} is unreadable ({e}); the next evaluation replaces it")
        self._last_save = time.monotonic()

    def due(self, step: int) -> bool:
        """Whether a periodic save is due after `step`."""
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_minutes) and time.monotonic() - self._last_save >= 60 * self.every_minutes

    def save(self, ckpt: dict, step: int, val_loss: float | None = None, final: bool = False) -> bool:
        """Write the checkpoint of `step` (see the class); returns whether it became best.pt."""
        target = self.dir / "last.pt"
        try:
            data = encode(ckpt)
            write_atomic(target, data)
            self.saved_step = step
            if self.keep_last:
                target = self.dir / step_name(step)
                write_atomic(target, data)
                self._prune(step)
            best = val_loss is not None and val_loss < self.best_val
            if best:
                target = self.dir / "best.pt"
                write_atomic(target, data)
                self.best_val = val_loss
        except OSError as e:
            self.failures += 1
            held = "earlier files are intact" if self.saved_step is None else f"last.pt holds step {self.saved_step}"
            what = f"could not save the checkpoint of step {step} to {target} ({e.strerror or e})"
            if final or not self.saves or self.failures >= MAX_FAILED_SAVES:
                why = "the final save" if final else "the first save" if not self.saves else \
                    f"{self.failures} saves in a row"
                raise CharrnnError(f"{what}; {why} failed, so training stops; {held}: free disk space or fix "
                                   f"the directory's permissions, then resume with --resume auto") from None
            self.log(f"warning: {what}; {held}; training goes on")
            return False
        self.saves += 1
        self.failures = 0
        self._last_save = time.monotonic()
        return best

    def _prune(self, step: int) -> None:
        """Keep the newest `keep_last` step files up to `step`. Later ones come from before a resume at an earlier
        checkpoint and stay until this run writes those steps again."""
        files = sorted((int(m.group(1)), p) for p in self.dir.iterdir() if (m := STEP_FILE.fullmatch(p.name)))
        for _, p in [f for f in files if f[0] <= step][:-self.keep_last]:
            p.unlink(missing_ok=True)
