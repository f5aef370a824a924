"""The character model: Embedding -> nn.LSTM/GRU/RNN -> Dropout -> Linear, and stateful generation from it.

Shape letters: B batch (parallel streams), T time steps, E embedding width, H hidden size, L layers, V vocabulary.
Training calls the recurrent module once per (B, T) batch so the fused oneDNN/cuDNN kernels run (on a CPU with
dropout, once per layer, so that our faster `dropout` goes between the layers), or, for an fp32 LSTM on a CPU
where it is faster, charrnn's own kernel (cpu_lstm) with the same weights; generation feeds one character per step
and keeps the state, so each new character costs O(1) work.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_lstm
from .errors import UsageError

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
LAYER_FNS = {"lstm": torch.lstm, "gru": torch.gru, "rnn": torch.rnn_tanh}  # what nn.LSTM/GRU/RNN call, one layer

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
        self.kernel = "auto"  # train.kernel: "torch" keeps nn.LSTM even where charrnn's CPU kernel applies

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x: (B, T) int64 ids -> logits (B, T, V) and the state after the last step. On charrnn's CPU kernel the
        logits are a view of a time-major (T, B, V) tensor (train.flat_pairs lays them out for a loss)."""
        p = self.args.dropout if self.training else 0.0
        if self.uses_cpu_kernel(x):
            out, new = self._cpu_layers(x, state or self.init_state(x.size(0)), p)  # (T, B, H)
            return self.head(dropout(out, p) if p else out).transpose(0, 1), new  # a (B, T, V) view
        emb = self.embed(x)  # (B, T, E)
        if self.training and p and x.device.type == "cpu":  # the module's own dropout would draw masks slowly
            out, new = self._layers_with_dropout(emb, state or self.init_state(x.size(0)), p)
            return self.head(dropout(out, p)), new
        rnn_state = state if self.args.cell == "lstm" or state is None else state[0]
        out, new = self.rnn(emb, rnn_state)  # (B, T, H)
        logits = self.head(self.drop(out))  # (B, T, V)
        return logits, (new if isinstance(new, tuple) else (new,))

    def _layers_with_dropout(self, x: torch.Tensor, state: State, p: float) -> tuple[torch.Tensor, State]:
        """The recurrent module in training, one fused layer call at a time with `dropout` between the layers:
        what the module computes, with masks drawn by `dropout` rather than the CPU's slow bernoulli_."""
        fn, weights = LAYER_FNS[self.args.cell], self.rnn._flat_weights
        per_layer = len(weights) // self.args.num_layers
        finals = []
        for layer in range(self.args.num_layers):
            if layer:
                x = dropout(x, p)
            w = weights[layer * per_layer:(layer + 1) * per_layer]
            if self.args.cell == "lstm":
                hx = [s[layer:layer + 1] for s in state]
                x, *final = fn(x, hx, w, True, 1, 0.0, True, False, True)
            else:
                x, *final = fn(x, state[0][layer:layer + 1], w, True, 1, 0.0, True, False, True)
            finals.append(final)
        return x, tuple(torch.cat(parts) for parts in zip(*finals))

    def uses_cpu_kernel(self, x: torch.Tensor) -> bool:
        """Whether a batch x (B, T) runs the LSTM on charrnn's CPU kernel (cpu_lstm) rather than torch's."""
        return self.args.cell == "lstm" and self.kernel == "auto" and \
            cpu_lstm.applies(x, self.head.weight, self.args.hidden_size)

    def _cpu_layers(self, x: torch.Tensor, state: State, p: float) -> tuple[torch.Tensor, State]:
        """The LSTM on charrnn's CPU kernel (cpu_lstm), time-major, with `dropout` between the layers: x (B, T) ids
        -> outputs (T, B, H) and the final state. The first layer reads its input product from the embedding."""
        weights, finals = self.rnn._flat_weights, []
        out = ids = x.t().contiguous()
        for layer in range(self.args.num_layers):
            w_ih, w_hh, b_ih, b_hh = weights[4 * layer:4 * layer + 4]
            h0, c0 = (s[layer] for s in state)
            if layer:
                out, h, c = cpu_lstm.lstm_layer(dropout(out, p) if p else out, w_ih, w_hh, b_ih + b_hh, h0, c0)
            else:
                out, h, c = cpu_lstm.lstm_layer(self.embed.weight, w_ih, w_hh, b_ih + b_hh, h0, c0, ids)
            finals.append((h, c))
        return out, tuple(torch.stack(parts) for parts in zip(*finals))

    def init_state(self, batch: int, device: torch.device | str | None = None) -> State:
        """Zero state for `batch` streams."""
        device = device or self.head.weight.device
        shape = (self.args.num_layers, batch, self.args.hidden_size)
        n = 2 if self.args.cell == "lstm" else 1
        return tuple(torch.zeros(shape, device=device, dtype=self.head.weight.dtype) for _ in range(n))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout for CPU tensors with masks cut from 16 random bits per element, four per drawn int64:
    the CPU's bernoulli_ draws one number per element at ~10 ns each, a fifth of a small model's training step.
    The drop probability is p rounded to a multiple of 1/65536."""
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, 2 ** 63 - 1)
    keep = bits.view(torch.int16)[:n].view(x.shape) >= round(p * 65536) - 32768
    return x * (keep.to(x.dtype) * (1 / (1 - p)))


def detach_state(state: State) -> State:
    """Truncated BPTT: keep the state's values across batches but cut the graph, so backward stops at the batch."""
    return tuple(s.detach() for s in state)


REPETITION_WINDOW = 32  # the repetition penalty looks this far back: a longer window holds every common character


def penalize(logits: torch.Tensor, recent: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty: the logits (B, V) of characters among `recent` (B, W) ids are divided by `penalty`
    where positive and multiplied by it where negative. Id V marks an empty slot of the window."""
    seen = torch.zeros(logits.size(0), logits.size(1) + 1, dtype=torch.bool, device=logits.device)
    seen = seen.scatter_(1, recent, True)[:, :-1]  # (B, V)
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def pick_next(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None,
              top_p: float = 1.0) -> torch.Tensor:
    """logits (B, V) -> next ids (B,): greedy at temperature 0, else sampled from the softmax cut to the top-k
    characters, then to the smallest set holding `top_p` of the probability (nucleus). All on the logits' device."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() if temperature == 1 else logits.float() / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # the more likely characters already hold top_p
        probs = probs.masked_fill(torch.empty_like(outside).scatter_(-1, order, outside), 0.0)
    return draw(probs, generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One id per row of `probs` (B, V), where a uniform draw falls in the cumulative distribution: what
    `torch.multinomial` does for one sample, without its per-call checks (a quarter of a one-stream 2x256 character
    on a CPU). In float64 (float32 on MPS, which has no float64), so a draw lands past the total only with
    probability ~2^-53; the clamp keeps even that in range."""
    dtype = torch.float32 if probs.device.type == "mps" else torch.float64
    cdf = probs.cumsum(-1, dtype=dtype)  # (B, V)
    u = torch.rand(probs.size(0), 1, generator=generator, dtype=dtype, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.size(-1) - 1)


@dataclass
class Generated:
    """A generated batch: `ids` (B, T), and per stream `lengths` (the characters kept: up to and including the first
    stop string, else all T), `stopped`, and `logprob`: the summed log-probability in nats of the kept characters
    under the model itself (temperature 1, no cut), a measure of how typical the text is whatever the settings."""

    ids: torch.Tensor
    lengths: torch.Tensor
    stopped: torch.Tensor
    logprob: torch.Tensor


@contextmanager
def eval_mode(model: nn.Module):
    """Dropout off while generating; the caller's mode is restored (the trainer samples mid-run)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def recent_window(prime: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The repetition penalty's window (B, W): the last W prime ids per stream, oldest first, padded with V (empty).
    Step t overwrites slot t % W, the oldest."""
    pad = torch.full((prime.size(0), REPETITION_WINDOW), vocab_size, dtype=torch.long, device=prime.device)
    return torch.cat([pad, prime], 1)[:, -REPETITION_WINDOW:].contiguous()


SCORE_EVERY = 64  # sample_batch keeps this many steps' logits and scores their log-probabilities in one go


@torch.inference_mode()
def sample_batch(model: CharRNN, prime: torch.Tensor, length: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, generator: torch.Generator | None = None,
                 stops: list[torch.Tensor] = (), on_step=None) -> Generated:
    """Warm the state on `prime` (B, P) in one call, then sample up to `length` ids per stream, one recurrent step
    per character, never re-reading the context.

    `stops` are 1-D id tensors: a stream ends with the first one it generates, and the batch ends once every stream
    has (checked every 16 steps, to keep device syncs rare). `on_step(ids, live)` receives each new (B,) column and
    the mask of the streams that had not ended before it, for streaming. Each step's logits go to a ring of
    SCORE_EVERY slots, scored for `logprob` when it is full: a few ops per step fewer, on a path of few ops.
    """
    n_streams, device = prime.size(0), prime.device
    with eval_mode(model):
        logits, state = model(prime)
        ring = logits.new_empty(SCORE_EVERY, n_streams, logits.size(-1))  # (K, B, V): the logits of recent steps
        ring[0] = logits[:, -1]
        step = Stepper(model, state)
        out = torch.zeros(n_streams, length, dtype=torch.long, device=device)
        lengths = torch.full((n_streams,), length, dtype=torch.long, device=device)
        stopped = torch.zeros(n_streams, dtype=torch.bool, device=device)
        everyone = torch.ones(n_streams, dtype=torch.bool, device=device)
        was_live = torch.ones(SCORE_EVERY, n_streams, dtype=torch.bool, device=device)  # (K, B), kept with stops
        logprob = torch.zeros(n_streams, dtype=torch.float64, device=device)
        recent = recent_window(prime, logits.size(-1)) if repetition_penalty != 1 else None
        made = 0
        for t in range(length):
            slot = t % SCORE_EVERY
            last = ring[slot]  # (B, V)
            scores = last if recent is None else penalize(last, recent, repetition_penalty)
            nxt = pick_next(scores, temperature, top_k, generator, top_p)  # (B,)
            out[:, t] = nxt
            live = ~stopped if stops else everyone  # without stops every stream is live to the end
            if stops:
                was_live[slot] = live
            made = t + 1
            if recent is not None:
                recent[:, t % REPETITION_WINDOW] = nxt
            if on_step is not None:
                on_step(nxt, live)
            for stop in stops:
                if made >= len(stop):
                    hit = (out[:, made - len(stop):made] == stop).all(1) & live  # (B,)
                    lengths = torch.where(hit & ~stopped, made, lengths)
                    stopped = stopped | hit
            ended = stops and made % 16 == 0 and bool(stopped.all())
            if slot == SCORE_EVERY - 1 or made == length or ended:
                gains = F.log_softmax(ring[:slot + 1], -1, dtype=torch.float64)  # (n, B, V)
                gains = gains.gather(2, out[:, t - slot:made].t().unsqueeze(2)).squeeze(2)  # (n, B)
                logprob += (gains * was_live[:slot + 1]).sum(0)
            if ended:
                break
            if made < length:
                step(nxt, out=ring[(slot + 1) % SCORE_EVERY])
        return Generated(out[:, :made], lengths, stopped, logprob)  # an early end means every stream stopped


def generate(model: CharRNN, prime: torch.Tensor, length: int, temperature: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """The (B, length) ids of plain temperature / top-k sampling: the trainer's progress samples, the benchmark."""
    return sample_batch(model, prime, length, temperature, top_k, generator=generator).ids


def first_stop(ids: list[int], stops: list[list[int]]) -> int | None:
    """Where `ids` ends if cut after the first stop sequence in it (None: no stop occurs)."""
    ends = [i + len(s) for s in stops for i in range(len(ids) - len(s) + 1) if ids[i:i + len(s)] == s]
    return min(ends) if ends else None


@torch.inference_mode()
def beam_search(model: CharRNN, prime: torch.Tensor, length: int, beam: int, repetition_penalty: float = 1.0,
                stops: list[list[int]] = ()) -> Generated:
    """The likeliest continuation of `prime` (1, P) of `length` characters, keeping the `beam` best partial
    continuations at each step (by summed log-probability, after the repetition penalty). The state is reordered
    and the history kept as back-pointers, so each step costs O(beam), not O(length). With `stops` the result is
    cut after the first stop string in it."""
    with eval_mode(model):
        logits, state = model(prime)
        last = logits[:, -1]  # (1, V) and then (beam, V)
        vocab_size = last.size(-1)
        width = min(beam, vocab_size)
        step = Stepper(model, state)
        score = torch.zeros(1, dtype=torch.float64, device=prime.device)
        recent = recent_window(prime, vocab_size) if repetition_penalty != 1 else None
        parents, chars, gains = [], [], []
        for t in range(length):
            logp = F.log_softmax(last.double(), -1)  # (b, V): the model's own log-probabilities
            search = logp if recent is None else F.log_softmax(penalize(last, recent, repetition_penalty).double(), -1)
            score, index = (score[:, None] + search).flatten().topk(width)  # (width,), best first
            parent, ch = index // vocab_size, index % vocab_size
            parents.append(parent)
            chars.append(ch)
            gains.append(logp[parent, ch])
            if recent is not None:
                recent = recent[parent]
                recent[:, t % REPETITION_WINDOW] = ch
            if t + 1 < length:
                step.reorder(parent)
                last = step(ch)
        ids, logps, k = [], [], 0
        if length:
            parents_, chars_, gains_ = (torch.stack(x).tolist() for x in (parents, chars, gains))
            for t in reversed(range(length)):  # follow the back-pointers from the best final continuation
                ids.append(chars_[t][k])
                logps.append(gains_[t][k])
                k = parents_[t][k]
        ids, logps = ids[::-1], logps[::-1]
        end = first_stop(ids, list(stops))
        kept = length if end is None else end
        return Generated(torch.tensor([ids], dtype=torch.long), torch.tensor([kept]), torch.tensor([end is not None]),
                         torch.tensor([sum(logps[:kept])], dtype=torch.float64))


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


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware (CUDA with bf16 support; a CPU with AVX512-BF16 or AMX), so that
    train.precision=bf16 can be faster than fp32 rather than emulated and slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                flags = f.read()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def _operand(w: torch.Tensor, streams: int) -> torch.Tensor:
    """A weight w (N, K) as the (K, N) right operand of x @ w. For one stream that is a matrix-vector product, which
    runs faster over w's rows as stored (a 2x256 LSTM step: 134 us against 176 us here); for more streams the
    transpose made contiguous is faster."""
    return w.t() if streams == 1 else w.t().contiguous()


class Stepper:
    """One recurrent step per call for generation, with each layer's weights packed once.

    `nn.LSTM` called on a single time step runs oneDNN's whole-sequence kernel and costs ~10x more than the step
    itself on a CPU; here an LSTM or RNN layer is one `addmm` over [x, h] @ [W_ih | W_hh]^T plus pointwise ops (a GRU
    needs its input and hidden parts apart, so two). Each layer keeps [x, h] in one buffer (B, I + H): the layer below
    (or the embedding) writes x there and the layer's last step wrote h there, and LSTM gates go to a preallocated
    buffer in the order i, f, o, g, one sigmoid covering three of them. No allocations and few ops: once the weights
    have streamed through a CPU's caches, each op of a one-stream step costs several microseconds.
    """

    def __init__(self, model: CharRNN, state: State):
        rnn, args = model.rnn, model.args
        self.cell, hid = args.cell, args.hidden_size
        streams = state[0].size(1)
        self.embed = model.embed.weight.detach()  # (V, E)
        self.head_w = _operand(model.head.weight.detach(), streams)  # (H, V)
        self.head_b = model.head.bias.detach()
        self.widths = [args.embed_size] + [hid] * (args.num_layers - 1)  # each layer's input width
        ifog = torch.cat([torch.arange(2 * hid), torch.arange(3 * hid, 4 * hid), torch.arange(2 * hid, 3 * hid)])
        self.weights = []
        for l in range(args.num_layers):
            w_ih, w_hh = getattr(rnn, f"weight_ih_l{l}").detach(), getattr(rnn, f"weight_hh_l{l}").detach()
            b_ih, b_hh = getattr(rnn, f"bias_ih_l{l}").detach(), getattr(rnn, f"bias_hh_l{l}").detach()
            if self.cell == "gru":
                self.weights.append((_operand(w_ih, streams), b_ih, _operand(w_hh, streams), b_hh))
            elif self.cell == "lstm":
                self.weights.append((_operand(torch.cat([w_ih, w_hh], 1)[ifog], streams), (b_ih + b_hh)[ifog]))
            else:
                self.weights.append((_operand(torch.cat([w_ih, w_hh], 1), streams), b_ih + b_hh))
        self.xh = [torch.cat([state[0].new_zeros(streams, width), h], 1) for width, h in zip(self.widths, state[0])]
        self.c = [c.clone() for c in state[1]] if self.cell == "lstm" else None  # (B, H) each, updated in place
        self._views()

    def _views(self) -> None:
        """The per-layer views into [x, h] and, for an LSTM, the gate buffers and their views, for the current B."""
        self.inputs = [xh[:, :width] for xh, width in zip(self.xh, self.widths)]
        self.hs = [xh[:, width:] for xh, width in zip(self.xh, self.widths)]
        if self.cell == "lstm":
            self.gates = []
            for h in self.hs:
                n = h.size(1)
                g = h.new_empty(h.size(0), 4 * n)
                self.gates.append((g, g[:, :3 * n], g[:, 3 * n:], g[:, :n], g[:, n:2 * n], g[:, 2 * n:3 * n],
                                   torch.empty_like(h)))

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B,) ids -> logits (B, V) for the next character (into `out` if given); advances the state."""
        torch.index_select(self.embed, 0, x, out=self.inputs[0])
        for l, w in enumerate(self.weights):
            h = self.hs[l]
            if self.cell == "lstm":
                gates, ifo, g, i, f, o, tanh_c = self.gates[l]
                torch.addmm(w[1], self.xh[l], w[0], out=gates)
                ifo.sigmoid_()
                g.tanh_()
                c = self.c[l].mul_(f).addcmul_(i, g)
                torch.mul(torch.tanh(c, out=tanh_c), o, out=h)
            elif self.cell == "gru":
                ir, iz, in_ = torch.addmm(w[1], self.inputs[l], w[0]).chunk(3, 1)
                hr, hz, hn = torch.addmm(w[3], h, w[2]).chunk(3, 1)
                r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
                torch.lerp(torch.tanh(in_ + r * hn), h, z, out=h)  # (1 - z) * n + z * h
            else:
                torch.tanh(torch.addmm(w[1], self.xh[l], w[0]), out=h)
            if l + 1 < len(self.weights):
                self.inputs[l + 1].copy_(h)
        return torch.addmm(self.head_b, self.hs[-1], self.head_w, out=out)  # (B, V)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the streams `index` (B',), in that order: a beam search's surviving continuations."""
        self.xh = [xh[index] for xh in self.xh]
        if self.c is not None:
            self.c = [c[index] for c in self.c]
        self._views()
