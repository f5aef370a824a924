"""Checkpoints: one self-contained dict of plain data, written atomically and loaded with `weights_only=True`.

A checkpoint holds the model args and weights, the resolved config, the vocabulary, optimizer and schedule state, the
step and data position, RNG states, the carried hidden state and metrics: enough to sample from it alone, or to
resume a run exactly. No pickled objects, so loading one runs no code; tensors are saved from the CPU so it loads
anywhere.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from .errors import CharrnnError
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


def save(ckpt: dict, path: str | Path) -> Path:
    """Write `ckpt` to `path` atomically: temp file in the same directory, fsync, rename, fsync the directory.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **to_cpu(ckpt)}
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic
    return path


def load(path: str | Path) -> dict:
    """Load a checkpoint on the CPU without unpickling objects; a wrong, corrupt or newer file is a clear error."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "not found"
        raise CharrnnError(f"checkpoint {path} {what}: pass the path of a .pt file written by `charrnn train`")
    try:
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
