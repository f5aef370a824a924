"""What a checkpoint holds (`charrnn info`) and what this machine offers (`charrnn env`): plain dicts for `--json`,
and aligned text for people."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

import torch
import yaml

from . import __version__, checkpoint, cpu_lstm
from .config import config_from_dict
from .errors import CharrnnError
from .vocab import Vocab, show_chars


def _finite(x):
    """None for a loss never measured (inf/nan), so that --json stays valid JSON."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def describe(path: str | Path) -> dict:
    """Architecture, parameter count, vocabulary, data, progress, losses, torch version and device of a checkpoint."""
    ckpt = checkpoint.load(path)
    try:
        cfg = config_from_dict(ckpt.get("config") or {})
        vocab = Vocab.from_dict(ckpt["vocab"])
        params = sum(t.numel() for t in ckpt["model"].values())
        args = dict(ckpt["model_args"])
    except (KeyError, TypeError, AttributeError) as e:
        raise CharrnnError(f"checkpoint {path} does not describe a charrnn model ({type(e).__name__}: {e}): "
                           f"use a file written by `charrnn train`") from None
    pos, metrics = ckpt.get("position") or {}, ckpt.get("metrics") or {}
    known = ckpt.get("known_items")
    return {
        "checkpoint": str(path),
        "model": {**args, "parameters": params},
        "vocab": {"size": len(vocab), "chars": "".join(vocab.chars), "unk": vocab.unk},
        "data": {"path": cfg.data.path, "mode": cfg.data.mode, "val_fraction": cfg.data.val_fraction,
                 "known_items": None if known is None else len(known)},
        "training": {"steps": pos.get("step"), "chars_seen": pos.get("chars_seen"),
                     "elapsed_s": _finite(pos.get("elapsed_s"))},
        "val_loss": {"best": _finite(metrics.get("best_val_loss")), "last": _finite(metrics.get("val_loss"))},
        "torch_version": ckpt.get("torch_version"),
        "device": ckpt.get("device"),
        "config": cfg.to_dict(),
    }


def format_info(d: dict) -> str:
    m, v, data, t, loss = d["model"], d["vocab"], d["data"], d["training"], d["val_loss"]
    items = f": {data['known_items']:,} known items" if data["known_items"] is not None else ""
    best = (f"best {loss['best']:.4f} nats/char ({loss['best'] / math.log(2):.4f} bits/char)"
            if loss["best"] is not None else "not measured")
    last = f", last {loss['last']:.4f}" if loss["last"] is not None else ""
    elapsed = f", {t['elapsed_s']:.0f} s" if t["elapsed_s"] is not None else ""
    rows = [
        ("checkpoint", d["checkpoint"]),
        ("model", f"{m['cell']}, {m['num_layers']} layer(s) x {m['hidden_size']} units, embedding "
                  f"{m['embed_size']}, dropout {m['dropout']}: {m['parameters']:,} parameters"),
        ("vocabulary", f"{v['size']} characters{' (with the unknown symbol)' if v['unk'] else ''}: "
                       f"{show_chars(list(v['chars']), limit=60)}"),
        ("data", f"{data['path']} ({data['mode']} mode{items}), val_fraction {data['val_fraction']}"),
        ("training", f"{t['steps'] or 0:,} steps, {t['chars_seen'] or 0:,} characters seen{elapsed}"),
        ("val loss", best + last),
        ("trained on", f"{d['device']} with torch {d['torch_version']}"),
    ]
    config = yaml.safe_dump(d["config"], sort_keys=False, allow_unicode=True)
    return "\n".join(f"{k:<11} {val}" for k, val in rows) + "\nconfig:\n" + \
        "".join(f"  {line}\n" for line in config.splitlines())


def environment() -> dict:
    """The torch build and the accelerators it can use here."""
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return {
        "charrnn": __version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "mps_available": mps,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_lstm_kernel": cpu_lstm.unavailable() or "built",  # builds it if this is the first use
    }


def format_env(e: dict) -> str:
    rows = [("charrnn", e["charrnn"]), ("python", e["python"]), ("torch", e["torch"]),
            ("cuda", f"available, CUDA {e['cuda_version']}: {', '.join(e['cuda_devices'])}" if e["cuda_available"]
             else f"not available (torch built with CUDA {e['cuda_version']})" if e["cuda_version"]
             else "not available (CPU-only torch build)"),
            ("cudnn", e["cudnn_version"] or "not available"),
            ("mps", "available" if e["mps_available"] else "not available"),
            ("cpu", f"{e['cpu_threads']} torch threads, {e['cpu_count']} logical CPUs"),
            ("lstm", "charrnn's CPU kernel built" if e["cpu_lstm_kernel"] == "built" else
             f"torch's kernel only: charrnn's CPU kernel cannot be built ({e['cpu_lstm_kernel'].splitlines()[0]})")]
    return "\n".join(f"{k:<8} {v}" for k, v in rows)
