"""Shared fixtures: tiny generated texts, a tiny config builder, and one tiny trained checkpoint per session.

Everything is small on purpose (hidden 16-32, one layer, a few dozen steps, a few KB of text) so the whole suite
stays cheap on a shared 2-core machine; nothing here touches the network.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from charrnn.config import build_config
from charrnn.train import Trainer

torch.set_num_threads(1)

SENTENCES = [
    "The little fir tree stood in the forest, and the sun shone on it.\n",
    "Once upon a time there was a stork who lived on the roof of a house.\n",
    "The snow queen came over the lake, and the children ran home to supper.\n",
    "She sang a song of the sea, and the old king listened by the fire.\n",
]


def make_text(n_chars: int = 4000) -> str:
    """A deterministic, repetitive English-ish text of about `n_chars` characters."""
    out, i = [], 0
    total = 0
    while total < n_chars:
        s = SENTENCES[i % len(SENTENCES)]
        out.append(s)
        total += len(s)
        i += 1
    return "".join(out)


def tiny_tree(text_path: str | Path) -> dict:
    """A nested config dict for a tiny CPU run over `text_path`."""
    return {
        "data": {"path": str(text_path), "val_fraction": 0.1},
        "model": {"cell": "lstm", "embed_size": 8, "hidden_size": 16, "num_layers": 1, "dropout": 0.0},
        "train": {"n_seqs": 4, "n_steps": 16, "lr": 1e-2, "warmup_steps": 2, "max_steps": 10, "max_epochs": 0,
                  "eval_every": 5, "log_every": 1, "sample_length": 10, "seed": 1, "device": "cpu"},
        "sample": {"prime": "The "},
    }


def apply_dotted(tree: dict, overrides: dict | None) -> dict:
    tree = copy.deepcopy(tree)
    for key, value in (overrides or {}).items():
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = value
    return tree


@pytest.fixture
def text_file(tmp_path) -> Path:
    """A ~4 KB repetitive text in tmp_path."""
    path = tmp_path / "tiny.txt"
    path.write_text(make_text(4000), encoding="utf-8")
    return path


@pytest.fixture
def make_cfg(text_file):
    """Build a validated tiny RunConfig; `make_cfg({"train.max_steps": 20})` overrides dotted keys."""

    def build(overrides: dict | None = None, text_path: str | Path | None = None):
        return build_config(apply_dotted(tiny_tree(text_path or text_file), overrides))

    return build


@pytest.fixture
def write_yaml(tmp_path, text_file):
    """Write a tiny config YAML (with dotted overrides) into tmp_path and return its path."""

    def write(name: str = "tiny.yaml", overrides: dict | None = None, text_path: str | Path | None = None) -> Path:
        path = tmp_path / name
        tree = apply_dotted(tiny_tree(text_path or text_file), overrides)
        path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A run directory trained once per session: tiny LSTM, 20 steps; holds last.pt and best.pt."""
    root = tmp_path_factory.mktemp("trained")
    text = root / "text.txt"
    text.write_text(make_text(4000), encoding="utf-8")
    cfg = build_config(apply_dotted(tiny_tree(text), {"model.hidden_size": 32, "train.max_steps": 20,
                                                      "train.eval_every": 10}))
    run_dir = root / "run"
    Trainer(cfg, run_dir, progress=False, log=lambda msg: None).fit()
    return run_dir


@pytest.fixture(scope="session")
def trained_ckpt(trained_run) -> Path:
    """The Trainer's own last.pt, exactly as written."""
    return trained_run / "last.pt"


@pytest.fixture(scope="session")
def trained_best(trained_run) -> Path:
    return trained_run / "best.pt"
