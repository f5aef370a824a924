"""`charrnn export`: `--format torchscript` writes one TorchScript file that samples text with torch alone, no charrnn;
`--format safetensors` writes the weights, vocabulary and config as safetensors (no pickle), which `charrnn sample`,
`eval`, `info` and `--init-from` read like a checkpoint (needs `pip install 'charrnn[safetensors]'`).

The network (the model's own `forward`, traced) and a scripted sampling loop with the vocabulary travel in the file:

    import torch
    m = torch.jit.load("best.ts")
    print(m("The ", 200, 0.8, 5, 1))  # prime, length, temperature (0: greedy), top_k (0: all), seed

The loop is the plain one (temperature and top-k, the state carried, one step per character); the sampling options
of `charrnn sample` beyond those stay in charrnn. torch marks TorchScript as deprecated but still loads and runs it;
`torch.export` cannot hold a sampling loop.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

from . import checkpoint
from .errors import UsageError
from .model import CharRNN


class _Network(nn.Module):
    """The model with a uniform state (h, c), each (L, B, H), for tracing; a GRU or RNN passes `c` through."""

    def __init__(self, model: CharRNN):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        lstm = self.model.args.cell == "lstm"
        logits, state = self.model(x, (h, c) if lstm else (h,))
        return logits, state[0], state[1] if lstm else c


class ExportedSampler(nn.Module):
    """What the exported file holds: `forward(prime, length, temperature, top_k, seed) -> str`."""

    def __init__(self, network: torch.jit.ScriptModule, chars: List[str], num_layers: int, hidden_size: int):
        super().__init__()
        self.network = network
        self.chars = chars
        self.num_layers = num_layers
        self.hidden_size = hidden_size

    def forward(self, prime: str, length: int, temperature: float = 0.8, top_k: int = 0, seed: int = 0) -> str:
        index: Dict[str, int] = {}
        for i, ch in enumerate(self.chars):
            index[ch] = i
        ids: List[int] = []
        for i, ch in enumerate(prime):
            if ch not in index:  # (the character itself would not survive TorchScript's error text)
                raise ValueError("the prime has a character outside the model's vocabulary at position " + str(i))
            ids.append(index[ch])
        if len(ids) == 0:
            raise ValueError("the prime must hold at least one character")
        h = torch.zeros(self.num_layers, 1, self.hidden_size)
        c = torch.zeros(self.num_layers, 1, self.hidden_size)
        logits, h, c = self.network(torch.tensor([ids]), h, c)
        generator = torch.Generator()
        generator.manual_seed(seed)
        out: List[str] = []
        for _ in range(length):
            scores = logits[0, -1]  # (V,)
            if temperature == 0.0:
                nxt = int(scores.argmax())
            else:
                scores = scores / temperature
                if 0 < top_k < scores.size(0):
                    scores = scores.masked_fill(scores < torch.topk(scores, top_k).values[-1], float("-inf"))
                nxt = int(torch.multinomial(torch.softmax(scores, 0), 1, generator=generator).item())
            out.append(self.chars[nxt])
            logits, h, c = self.network(torch.tensor([[nxt]]), h, c)
        return "".join(out)


def export_safetensors(ckpt_path: str | Path, out_path: str | Path, force: bool = False) -> Path:
    """Write the checkpoint's weights, vocabulary and config as a safetensors file at `out_path`."""
    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise UsageError(f"{out_path} already exists: pass --force to overwrite it, or --output another path")
    ckpt = checkpoint.load(ckpt_path)
    checkpoint.restore_model(ckpt)  # a file that does not describe a model is refused here, not when it is read
    return checkpoint.save_safetensors(ckpt, out_path)


def export_torchscript(ckpt_path: str | Path, out_path: str | Path, force: bool = False) -> Path:
    """Write the checkpoint's model and vocabulary as a TorchScript sampler at `out_path`."""
    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise UsageError(f"{out_path} already exists: pass --force to overwrite it, or --output another path")
    model, vocab = checkpoint.restore_model(checkpoint.load(ckpt_path), "cpu")
    a = model.args
    zeros = torch.zeros(a.num_layers, 1, a.hidden_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript's deprecation notice, see the docstring
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # nn.LSTM's input size checks, true for any input
        network = torch.jit.trace(_Network(model), (torch.zeros(1, 2, dtype=torch.long), zeros, zeros))
        scripted = torch.jit.script(ExportedSampler(network, list(vocab.chars), a.num_layers, a.hidden_size))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    scripted.save(str(out_path))
    return out_path
