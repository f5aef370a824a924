"""The character model: Embedding -> nn.LSTM/GRU/RNN -> Dropout -> Linear, and stateful generation from it.

Shape letters: B batch (parallel streams), T time steps, E embedding width, H hidden size, L layers, V vocabulary.
Training calls the recurrent module once per (B, T) batch so the fused oneDNN/cuDNN kernels run; generation feeds
one character per step and keeps the state, so each new character costs O(1) work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}

State = tuple[torch.Tensor, ...]  # LSTM: (h, c), each (L, B, H); GRU/RNN: (h,)


@dataclass(frozen=True)
class ModelArgs:
    """Everything needed to rebuild the model: the model config plus the derived vocabulary size."""

    vocab_size: int
    cell: str = "lstm"
    embed_size: int = 64
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class CharRNN(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.embed_size)
        self.rnn = CELLS[args.cell](args.embed_size, args.hidden_size, num_layers=args.num_layers,
                                    dropout=args.dropout if args.num_layers > 1 else 0.0, batch_first=True)
        self.drop = nn.Dropout(args.dropout)
        self.head = nn.Linear(args.hidden_size, args.vocab_size)

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x: (B, T) int64 ids -> logits (B, T, V) and the state after the last step."""
        emb = self.embed(x)  # (B, T, E)
        rnn_state = state if self.args.cell == "lstm" or state is None else state[0]
        out, new = self.rnn(emb, rnn_state)  # (B, T, H)
        logits = self.head(self.drop(out))  # (B, T, V)
        return logits, (new if isinstance(new, tuple) else (new,))

    def init_state(self, batch: int, device: torch.device | str | None = None) -> State:
        """Zero state for `batch` streams."""
        device = device or self.head.weight.device
        shape = (self.args.num_layers, batch, self.args.hidden_size)
        n = 2 if self.args.cell == "lstm" else 1
        return tuple(torch.zeros(shape, device=device, dtype=self.head.weight.dtype) for _ in range(n))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def detach_state(state: State) -> State:
    """Truncated BPTT: keep the state's values across batches but cut the graph, so backward stops at the batch."""
    return tuple(s.detach() for s in state)


def pick_next(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,): greedy at temperature 0, else sampled from the top-k softmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.inference_mode()
def generate(model: CharRNN, prime: torch.Tensor, length: int, temperature: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None, on_step=None) -> torch.Tensor:
    """Warm the state on `prime` (B, P) in one call, then sample `length` ids per stream, one step at a time.

    `on_step(ids)` receives each new (B,) column as it is made, for streaming. Returns (B, length) ids.
    """
    was_training = model.training
    model.eval()
    try:
        logits, state = model(prime)
        last = logits[:, -1]  # (B, V)
        step = Stepper(model, state)
        out = torch.empty(prime.size(0), length, dtype=torch.long, device=prime.device)
        for t in range(length):
            nxt = pick_next(last, temperature, top_k, generator)  # (B,)
            out[:, t] = nxt
            if on_step is not None:
                on_step(nxt)
            if t + 1 < length:
                last = step(nxt)
        return out
    finally:
        model.train(was_training)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; asking for a device this machine lacks is a clear error."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available to this torch ({torch.__version__}); "
                         f"use --device cpu or --device auto")
    if name == "mps" and not mps:
        raise UsageError("--device mps: Apple's MPS backend is not available here; use --device cpu or --device auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None


class Stepper:
    """One recurrent step per call for generation, with each layer's weights packed once.

    `nn.LSTM` called on a single time step runs oneDNN's whole-sequence kernel and costs ~10x more than the step
    itself on a CPU; here an LSTM or RNN layer is one `addmm` over [x, h] @ [W_ih | W_hh]^T plus pointwise ops (a GRU
    needs its input and hidden parts apart, so two). Holds the state of its B streams; `state()` gives it back in the
    model's (L, B, H) layout.
    """

    def __init__(self, model: CharRNN, state: State):
        rnn, args = model.rnn, model.args
        self.cell = args.cell
        self.embed = model.embed.weight.detach()  # (V, E)
        self.head_w = model.head.weight.detach().t().contiguous()  # (H, V)
        self.head_b = model.head.bias.detach()
        self.layers = []
        for l in range(args.num_layers):
            w_ih, w_hh = getattr(rnn, f"weight_ih_l{l}").detach(), getattr(rnn, f"weight_hh_l{l}").detach()
            b_ih, b_hh = getattr(rnn, f"bias_ih_l{l}").detach(), getattr(rnn, f"bias_hh_l{l}").detach()
            if self.cell == "gru":
                self.layers.append((w_ih.t().contiguous(), b_ih, w_hh.t().contiguous(), b_hh))
            else:
                self.layers.append((torch.cat([w_ih, w_hh], 1).t().contiguous(), b_ih + b_hh))
        self.h = list(state[0].unbind(0))  # L tensors of (B, H)
        self.c = list(state[1].unbind(0)) if self.cell == "lstm" else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B,) ids -> logits (B, V) for the next character; advances the state."""
        inp = self.embed[x]  # (B, E)
        for l, w in enumerate(self.layers):
            h = self.h[l]
            if self.cell == "lstm":
                i, f, g, o = torch.addmm(w[1], torch.cat([inp, h], 1), w[0]).chunk(4, 1)  # (B, H) each
                self.c[l] = torch.sigmoid(f) * self.c[l] + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(self.c[l])
            elif self.cell == "gru":
                ir, iz, in_ = torch.addmm(w[1], inp, w[0]).chunk(3, 1)
                hr, hz, hn = torch.addmm(w[3], h, w[2]).chunk(3, 1)
                r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
                h = torch.lerp(torch.tanh(in_ + r * hn), h, z)  # (1 - z) * n + z * h
            else:
                h = torch.tanh(torch.addmm(w[1], torch.cat([inp, h], 1), w[0]))
            self.h[l] = inp = h
        return torch.addmm(self.head_b, inp, self.head_w)  # (B, V)

    def state(self) -> State:
        h = torch.stack(self.h)
        return (h, torch.stack(self.c)) if self.c is not None else (h,)
