"""The speed benchmark behind `charrnn bench` and `scripts/bench.py`: what this machine can do, and how close we get.

Every number is measured in this run; ratios compare measurements taken in the same run. Each measurement runs in
its own spawned process so that its peak RSS is its own (`--quick`: all in one process, at toy sizes).

FLOPs per character (H hidden size, I layer input size, V vocabulary, per layer l):
    forward  = sum_l 2 * 4H * (I_l + H)   (the four LSTM gate matmuls; GRU: 3H, RNN: H)
             + 2 * H * V                   (the output layer)
    training = 3 * forward                 (backward costs about twice the forward)
Achieved GFLOP/s = training FLOPs per char * chars/s, reported as a % of the matmul peak of its precision (fp32, or
bf16 for train.precision=bf16 rows where the CPU has AVX512-BF16 or AMX) measured just before and just after the row.
Beside it, the same for the recurrent layers alone (their forward and backward, without the output layer): how close
the kernel itself gets, so a step's shortfall can be told apart from the kernel's; and for the matrix products those
layers are made of, each run alone as torch.mm calls: how close any kernel built on torch's matmul could get.
The LSTM kernel column says which kernel the row's step runs: charrnn's CPU kernel (cpu_lstm) or torch's. The first
layer on charrnn's kernel looks its input product up in a table instead of computing it, so its rows count model
FLOPs, more than the machine does. Training runs with `train.keep_freed_memory` in effect, as `charrnn train` on a
CPU does.

`--device cuda` measures the same training and sampling rows on a GPU (timers wait for the device; memory is the
peak torch allocated there), and writes its own section of docs/benchmarks.md; the data rows measure the host and
stay with the CPU run. `--grid` adds torch-rnn's benchmark grid, ms per training iteration.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device) -> None:
    """Wait for the device's queued work, so that a timer stopped after this call has timed it (a no-op on a CPU)."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


def peak_memory_mb(device) -> float:
    """The process's peak RSS on a CPU; on CUDA the peak memory torch allocated on the device."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return peak_rss_mb()


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def train_flops_per_char(cell: str, embed: int, hidden: int, layers: int, vocab: int) -> float:
    """Training FLOPs per character, by the formula in the module docstring (vocab=0: the recurrent layers alone)."""
    g = GATES[cell]
    fwd = sum(2 * g * hidden * ((embed if l == 0 else hidden) + hidden) for l in range(layers)) + 2 * hidden * vocab
    return 3.0 * fwd


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synthetic_text(n_chars: int, seed: int = 0) -> str:
    """English-like text with a ~80-character alphabet, made fast by repeating shuffled words."""
    import random

    rng = random.Random(seed)
    words = ["the", "little", "mermaid", "said", "and", "snow", "queen", "she", "was", "very", "beautiful", "King",
             "stork", "garden", "old", "tree", "Ida's", "flowers", "\"Yes,\"", "shoes", "red", "fir", "(tin)",
             "soldier;", "sea!", "night?", "1805", "Kay", "Gerda", "rose-tree", "--", "ugly", "duckling:", "X-ray",
             "jump", "quiz", "vex", "wolf", "zephyr", "[note]", "A.", "B", "C", "D", "E", "F", "G", "H", "J", "L",
             "M", "N", "O", "P", "Q", "R", "S", "T", "U", "V", "W", "Y", "Z", "0", "2", "3", "4", "6", "7", "9"]
    block = " ".join(rng.choice(words) + ("\n" if rng.random() < 0.08 else "") for _ in range(20000))
    return (block * (n_chars // len(block) + 1))[:n_chars]


# --- measurements, each run in a child process -------------------------------------------------------------------

def measure_matmul(quick: bool, reps: int = 10, device: str = "cpu") -> dict:
    """GFLOP/s of n x n matmuls into a preallocated output (allocating it is not the matmul), the median of `reps`,
    in fp32 and, where the device computes bfloat16 natively (a CPU with AVX512-BF16 or AMX, a CUDA GPU with bf16),
    bf16. n is 2048 on a CPU and 8192 on a GPU, large enough to reach the peak of each."""
    import torch

    from .model import native_bf16

    dev = torch.device(device)
    n = 1024 if quick else 2048 if dev.type == "cpu" else 8192
    dtypes = {"fp32": torch.float32}
    if native_bf16(dev) and (dev.type != "cpu" or torch.backends.mkldnn.is_available()):
        dtypes["bf16"] = torch.bfloat16
    out = {}
    for name, dtype in dtypes.items():
        a, b, c = (torch.randn(n, n, device=dev).to(dtype) for _ in range(3))
        torch.mm(a, b, out=c)
        times = []
        for _ in range(3 if quick else reps):
            sync(dev)
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            sync(dev)
            times.append(time.perf_counter() - t0)
        out[name] = 2 * n ** 3 / statistics.median(times) / 1e9
    return {"gflops": out, "n": n}


def measure_training(config: str, steps: int, naive: bool, overrides: tuple = (), label: str = "",
                     precision: str = "fp32", device: str = "cpu", ceilings: bool = True) -> dict:
    """chars/s of our training step (the real Trainer on a synthetic text) on `device`; with `ceilings`, the
    GFLOP/s of its recurrent layers alone and of their matrix products alone; and, if `naive`, the chars/s of both
    naive per-character loops (`_naive_chars_per_s`) at the same sizes and precision."""
    from .config import load_config
    from .train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config, [f"data.path={tmp}/text.txt", f"train.device={device}", "train.sample_length=0",
                                   f"train.precision={precision}", *overrides])
        t = cfg.train
        n_chars = max(4 * t.n_seqs * t.n_steps * (steps + 4), 200_000)
        Path(tmp, "text.txt").write_text(synthetic_text(n_chars), encoding="utf-8")
        trainer = Trainer(cfg, Path(tmp) / "run", progress=False, log=lambda m: None)
        trainer.model.train()
        times = []
        for i in range(steps + 2):
            x, y = trainer.train_data.batch(i % len(trainer.train_data))
            t0 = time.perf_counter()
            loss = trainer.train_step(x, y, t.lr)
            loss.item()  # waits for the step on any device
            times.append(time.perf_counter() - t0)
        ms = statistics.median(times[2:]) * 1000
        m = cfg.model
        flops = train_flops_per_char(m.cell, m.embed_size, m.hidden_size, m.num_layers, len(trainer.vocab))
        cps = t.n_seqs * t.n_steps / (ms / 1000)
        layer_flops = train_flops_per_char(m.cell, m.embed_size, m.hidden_size, m.num_layers, 0)
        result = {"config": label or Path(config).stem, "precision": precision, "layer_flops": layer_flops,
                  "shape": f"{m.num_layers}x{m.hidden_size} B{t.n_seqs} T{t.n_steps}",
                  "ms_step": ms, "chars_s": cps, "gflops": flops * cps / 1e9}
        dtype, dev = trainer.net.head.weight.dtype, trainer.device
        result["kernel"] = "charrnn" if trainer.net.uses_cpu_kernel(x) else "torch"
        if ceilings:
            result["layers_gflops"] = _layers_alone_gflops(m, t, steps, dtype, dev, t.kernel)
            result["products_gflops"] = _products_alone_gflops(m, t, steps, dtype, dev)
        if naive:
            for kind in ("module", "cell"):
                result[f"naive_{kind}_chars_s"] = _naive_chars_per_s(m, len(trainer.vocab), t, max(2, steps // 2),
                                                                     precision, kind, dev)
        result["peak_mem_mb"] = peak_memory_mb(dev)
        return result


def _layers_alone_gflops(m, t, steps: int, dtype, device, kernel: str = "auto") -> float:
    """GFLOP/s of the recurrent layers alone, as the row's training step runs them (forward and backward, no
    dropout): charrnn's CPU kernel from the character ids where it applies (model.CharRNN.uses_cpu_kernel), else
    the nn.LSTM/GRU/RNN module on embeddings. About what a training step, which spends most of its time there,
    could reach."""
    import torch

    from .model import CharRNN, ModelArgs

    model = CharRNN(ModelArgs(vocab_size=80, cell=m.cell, embed_size=m.embed_size, hidden_size=m.hidden_size,
                              num_layers=m.num_layers)).to(device, dtype)
    model.kernel = kernel
    ids = torch.randint(0, 80, (t.n_seqs, t.n_steps), device=device)
    if model.uses_cpu_kernel(ids):
        grad = torch.randn(t.n_steps, t.n_seqs, m.hidden_size, dtype=dtype, device=device)

        def layers():
            model._cpu_layers(ids, model.init_state(t.n_seqs), 0.0)[0].backward(grad)
    else:
        x = torch.randn(t.n_seqs, t.n_steps, m.embed_size, dtype=dtype, device=device, requires_grad=True)
        grad = torch.randn(t.n_seqs, t.n_steps, m.hidden_size, dtype=dtype, device=device)

        def layers():
            model.rnn(x)[0].backward(grad)
    return _layer_gflops(layers, m, t, steps, device)


def _layer_gflops(run, m, t, steps: int, device) -> float:
    """The recurrent layers' training FLOPs per second when `run()` does one batch's worth of them: the median of
    `steps` timed runs after two warm-up ones."""
    times = []
    for _ in range(steps + 2):
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t0)
    cps = t.n_seqs * t.n_steps / statistics.median(times[2:])
    return train_flops_per_char(m.cell, m.embed_size, m.hidden_size, m.num_layers, 0) * cps / 1e9


def layer_products(m, t, dtype, device="cpu"):
    """A function that runs the matrix products the recurrent layers' forward and backward are made of, each as one
    torch.mm into a preallocated output and nothing else: per layer the input projection over all time steps, one
    recurrent product per step forward and one per step backward, then the input gradient and the two weight
    gradients over all steps. A kernel whose pointwise work (gates, cell state) cost nothing could go no faster than
    these, at these shapes, on this machine's matmul. Their FLOPs are the formula's for the layers."""
    import torch

    n, b, h, g = t.n_steps * t.n_seqs, t.n_seqs, m.hidden_size, GATES[m.cell] * m.hidden_size

    def rand(*shape):
        return torch.randn(*shape, device=device).mul_(0.1).to(dtype)

    layers = []
    for l in range(m.num_layers):
        i = m.embed_size if l == 0 else h
        layers.append({"x": rand(n, i), "w_ih": rand(g, i), "w_hh": rand(g, h), "hs": rand(t.n_steps, b, h),
                       "gates": rand(t.n_steps, b, g), "dh": rand(t.n_steps, b, h), "dx": rand(n, i),
                       "dw_ih": rand(g, i), "dw_hh": rand(g, h)})

    def products():
        for p in layers:
            w_ih_t, w_hh_t, gates = p["w_ih"].t(), p["w_hh"].t(), p["gates"].view(n, g)
            torch.mm(p["x"], w_ih_t, out=gates)
            for s in range(t.n_steps):
                torch.mm(p["hs"][s], w_hh_t, out=p["gates"][s])
            for s in range(t.n_steps):
                torch.mm(p["gates"][s], p["w_hh"], out=p["dh"][s])
            torch.mm(gates, p["w_ih"], out=p["dx"])
            torch.mm(gates.t(), p["x"], out=p["dw_ih"])
            torch.mm(gates.t(), p["hs"].view(n, h), out=p["dw_hh"])

    return products


def _products_alone_gflops(m, t, steps: int, dtype, device) -> float:
    """GFLOP/s of `layer_products` at the row's sizes and dtype, the median of `steps` runs."""
    return _layer_gflops(layer_products(m, t, dtype, device), m, t, steps, device)


def _naive_chars_per_s(m, vocab: int, t, steps: int, precision: str, kind: str, device) -> float:
    """A training step that calls the recurrence once per character, as the first PyTorch char-rnn ports do, in one
    of two ways. `module` (spro/char-rnn.pytorch): the model itself on one-step sequences, each call running the
    embedding, the recurrent module (oneDNN's whole-sequence kernel, for one step) and the output layer. `cell`: an
    nn.LSTMCell (GRUCell, RNNCell) per layer, as many tutorials write it: faster than `module` on a CPU, where one
    oneDNN call costs more than a cell's few ops. Both apply the config's dropout as a port would, with PyTorch's
    own (the module's between its layers, nn.Dropout between cells and before the output layer), sum the loss per
    step, and use our optimizer (`train.make_optimizer`) and gradient clipping; in bf16 the whole model is bfloat16
    (no master weights)."""
    import torch
    from torch import nn

    from .model import CharRNN, ModelArgs
    from .train import make_optimizer

    model = CharRNN(ModelArgs(vocab_size=vocab, cell=m.cell, embed_size=m.embed_size, hidden_size=m.hidden_size,
                              num_layers=m.num_layers, dropout=m.dropout))
    if kind == "module":
        def one_char(x, state):
            out, state = model.rnn(model.embed(x[:, None]), state if m.cell == "lstm" else state[0])
            return model.head(model.drop(out[:, 0])), state if m.cell == "lstm" else (state,)

        start = model.init_state
    else:
        cell = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}[m.cell]
        model.rnn = nn.ModuleList(cell(m.embed_size if l == 0 else m.hidden_size, m.hidden_size)
                                  for l in range(m.num_layers))

        def one_char(x, state):
            inp, new = model.embed(x), []
            for i, (layer, s) in enumerate(zip(model.rnn, state)):
                s = layer(model.drop(inp) if i else inp, s)
                inp = s[0] if isinstance(s, tuple) else s
                new.append(s)
            return model.head(model.drop(inp)), new

        def start(batch):
            zeros = model.head.weight.new_zeros
            return [(zeros(batch, m.hidden_size), zeros(batch, m.hidden_size)) if m.cell == "lstm"
                    else zeros(batch, m.hidden_size) for _ in range(m.num_layers)]
    model = model.to(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    opt = make_optimizer(model.parameters(), t, device)
    criterion = nn.CrossEntropyLoss()
    x = torch.randint(0, vocab, (t.n_seqs, t.n_steps), device=device)
    y = torch.randint(0, vocab, (t.n_seqs, t.n_steps), device=device)
    times = []
    for _ in range(steps + 1):
        sync(device)
        t0 = time.perf_counter()
        state = start(t.n_seqs)
        loss = 0
        for c in range(t.n_steps):
            logits, state = one_char(x[:, c], state)
            loss = loss + criterion(logits.float(), y[:, c])
        opt.zero_grad()
        (loss / t.n_steps).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0, foreach=True)
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return t.n_seqs * t.n_steps / statistics.median(times[1:])


def measure_sampling(config: str, streams: int, length: int, repeats: int = 3, overrides: tuple = (),
                     label: str = "", device: str = "cpu") -> dict:
    """chars/s generating `length` characters for `streams` streams together from a model of `config`'s size (with
    `overrides`), the median of `repeats` runs."""
    import torch

    from .config import load_config
    from .model import CharRNN, ModelArgs, generate

    cfg = load_config(config, list(overrides))
    torch.manual_seed(0)
    model = CharRNN(ModelArgs(vocab_size=80, **{k: getattr(cfg.model, k) for k in
                                                ("cell", "embed_size", "hidden_size", "num_layers", "dropout")}))
    model.to(device)
    prime = torch.zeros(streams, 1, dtype=torch.long, device=device)
    gen = torch.Generator(device).manual_seed(0)
    generate(model, prime, 5, 1.0, 0, gen)
    rates = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        generate(model, prime, length, 1.0, 0, gen)
        sync(device)
        rates.append(streams * length / (time.perf_counter() - t0))
    return {"config": label or Path(config).stem, "shape": f"{cfg.model.num_layers}x{cfg.model.hidden_size}",
            "streams": streams, "chars_s": statistics.median(rates)}


def measure_corpus_rss(n_chars: int) -> dict:
    """RSS a training run holds for a corpus of `n_chars` characters: taken after two steps on the tiny model, minus
    the RSS before the text was read. Two sizes give the bytes per corpus character as a slope."""
    import gc

    from .config import load_config
    from .train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        text_path = Path(tmp, "text.txt")
        text_path.write_text(synthetic_text(n_chars), encoding="utf-8")
        gc.collect()
        cfg = load_config(None, [f"data.path={text_path}", "train.device=cpu", "train.sample_length=0",
                                 "model.hidden_size=32", "model.num_layers=1", "train.max_steps=2"])
        import torch  # noqa: F401  (imported before the baseline so its own memory is not counted)

        rss0 = current_rss_bytes()
        trainer = Trainer(cfg, Path(tmp) / "run", progress=False, log=lambda m: None)
        for i in range(2):
            trainer.train_step(*trainer.train_data.batch(i), cfg.train.lr)
        return {"chars": n_chars, "rss_bytes": current_rss_bytes() - rss0}


def measure_encoding(n_chars: int) -> dict:
    """Seconds and peak RSS to build the vocabulary of and encode a synthetic text of `n_chars` characters."""
    from .vocab import Vocab

    text = synthetic_text(n_chars)
    rss_text = peak_rss_mb()
    t0 = time.perf_counter()
    vocab = Vocab.build(text)
    ids = vocab.encode(text)
    dt = time.perf_counter() - t0
    return {"chars": n_chars, "seconds": dt, "dtype": str(ids.dtype).removeprefix("torch."),
            "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_text}


def _child(fn_name: str, kwargs: dict, queue) -> None:
    try:
        queue.put(("ok", globals()[fn_name](**kwargs)))
    except BaseException as e:  # report the failure to the parent instead of hanging it
        queue.put(("error", f"{type(e).__name__}: {e}"))


def _in_process(fn_name: str, **kwargs) -> dict:
    return globals()[fn_name](**kwargs)


def _in_child(fn_name: str, **kwargs) -> dict:
    """Run one measurement in a fresh spawned process and return its result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn_name, kwargs, queue))
    proc.start()
    status, value = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"benchmark {fn_name} failed: {value}")
    return value


# --- the report -----------------------------------------------------------------------------------------------

GRID_LAYERS, GRID_HIDDEN = (1, 2, 3), (128, 256, 512)


def run(quick: bool = False, configs_dir: str = "configs", device: str = "cpu", grid: bool = False) -> str:
    """Run every measurement on `device` and return the markdown report; `grid` adds torch-rnn's benchmark grid
    (1-3 layers x 128/256/512 hidden, batch 50, 50 steps: ms per training iteration)."""
    import torch

    from .model import resolve_device

    dev = resolve_device(device)
    device = str(dev)
    cfgs = Path(configs_dir)
    steps = 2 if quick else 20
    started = time.perf_counter()
    measure = _in_process if quick else _in_child  # quick: no process start-up per measurement
    toy = ("train.n_seqs=4", "train.n_steps=8") if quick else ()  # quick: every path, at toy sizes
    mm = measure("measure_matmul", quick=quick, device=device)

    def grid_shape(layers: int, hidden: int) -> tuple:
        """torch-rnn's benchmark shape (at toy sizes in a quick run)."""
        return ("model.embed_size=64", f"model.hidden_size={hidden}", f"model.num_layers={layers}",
                "model.dropout=0", "train.n_seqs=50", "train.n_steps=50") + toy

    precisions = ["fp32", "bf16"] if "bf16" in mm["gflops"] else ["fp32"]

    def training(config: str, **kwargs) -> dict:
        """A training row, with its precision's matmul peak measured just before and just after it: the machine's
        speed drifts over a run (clock, neighbours), and the % of peak should compare like with like."""
        around = [measure("measure_matmul", quick=quick, reps=5, device=device)]
        row = measure("measure_training", config=str(cfgs / config), device=device, **kwargs)
        around.append(measure("measure_matmul", quick=quick, reps=5, device=device))
        row["peak_gflops"] = statistics.mean(m["gflops"][row["precision"]] for m in around)
        return row

    train_rows = [training("tiny.yaml", steps=steps, naive=False)]
    for precision in precisions:
        train_rows += [
            training("tiny.yaml", steps=steps, naive=True, overrides=grid_shape(2, 128), label="2x128 grid",
                     precision=precision),
            *([training("tiny.yaml", steps=steps, naive=True, overrides=grid_shape(2, 128) + ("train.kernel=torch",),
                        label="2x128 grid, train.kernel=torch")] if precision == "fp32" and dev.type == "cpu" else []),
            training("andersen.yaml", steps=steps, naive=True, overrides=toy, precision=precision),
            training("anna.yaml", steps=max(2, steps // 2), naive=True, overrides=toy, precision=precision),
        ]
    grid_rows = [measure("measure_training", config=str(cfgs / "tiny.yaml"), steps=steps, naive=False,
                         ceilings=False, overrides=grid_shape(layers, hidden), precision=precision, device=device)
                 for precision in precisions for layers in GRID_LAYERS for hidden in GRID_HIDDEN] if grid else []
    sampled = [("andersen", (), ""), ("andersen", ("model.hidden_size=256",), "2x256"), ("anna", (), "")]
    sample_rows = [measure("measure_sampling", config=str(cfgs / f"{name}.yaml"), streams=s, overrides=ov,
                           label=label, length=20 if quick else 2000 if s == 1 else 400, repeats=1 if quick else 3,
                           device=device)
                   for name, ov, label in sampled for s in (1, 64)]
    if dev.type == "cpu":  # the data rows measure the host alone: a GPU run leaves them to the CPU run
        enc = measure("measure_encoding", n_chars=1_000_000 if quick else 100_000_000)
        small, large = (200_000, 2_000_000) if quick else (2_000_000, 50_000_000)
        rss_small, rss_large = (measure("measure_corpus_rss", n_chars=n) for n in (small, large))
        bytes_per_char = (rss_large["rss_bytes"] - rss_small["rss_bytes"]) / (large - small)
    total = time.perf_counter() - started

    host = f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if dev.type == "cuda":
        host = (f"{torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda}; TF32 for matmuls "
                f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}, for cuDNN "
                f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'}) on {host}")
    lines = [f"Machine: {host}, device {device}, {datetime.date.today().isoformat()}"
             f"{' — QUICK run: not for comparison' if quick else ''}. Whole run: {total:.0f} s.",
             "",
             "| reference | value |", "|---|---|"]
    for name, g in mm["gflops"].items():
        lines.append(f"| {name} matmul {mm['n']}x{mm['n']} (median) | {g:.1f} GFLOP/s |")
    lines += ["", "| training | precision | shape | LSTM kernel | ms/step | chars/s | GFLOP/s | matmul peak alongside "
              "| % of that peak | recurrent layers alone, % of peak | their matrix products alone, % of peak "
              "| naive: module per char, chars/s | speed-up | naive: cell per char, chars/s | speed-up "
              f"| {'peak CUDA memory MB' if dev.type == 'cuda' else 'peak RSS MB'} |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in train_rows:
        naive = [r.get(f"naive_{kind}_chars_s") for kind in ("module", "cell")]
        naive_cols = " | ".join(f"{n:,.0f} | {r['chars_s'] / n:.2f}x" if n else "- | -" for n in naive)
        lines.append(f"| {r['config']} | {r['precision']} | {r['shape']} | {r['kernel']} | {r['ms_step']:.1f} "
                     f"| {r['chars_s']:,.0f} "
                     f"| {r['gflops']:.1f} | {r['peak_gflops']:.0f} | {100 * r['gflops'] / r['peak_gflops']:.0f}% "
                     f"| {100 * r['layers_gflops'] / r['peak_gflops']:.0f}% "
                     f"| {100 * r['products_gflops'] / r['peak_gflops']:.0f}% "
                     f"| {naive_cols} | {r['peak_mem_mb']:.0f} |")
    bounds = [f"{r['config']} {r['precision']} {products_bound(r):.2f}x" for r in train_rows
              if r.get("naive_module_chars_s")]
    if bounds:
        lines += ["", "Lead over the module loop if the recurrent layers cost only their matrix products as torch.mm "
                  "calls (the step, less the layers alone, plus their products alone): the ceiling of a kernel built "
                  f"on torch's matmul, which charrnn's CPU kernel is not: {', '.join(bounds)}."]
    fp32 = {r["config"]: r["chars_s"] for r in train_rows if r["precision"] == "fp32"}
    ratios = [f"{r['config']} {r['chars_s'] / fp32[r['config']]:.2f}x" for r in train_rows if r["precision"] == "bf16"]
    if ratios:
        lines += ["", f"train.precision=bf16 over fp32, chars/s: {', '.join(ratios)}."]
    if grid_rows:
        lines += ["", "| torch-rnn grid: ms per training iteration (B50 T50, embedding 64, no dropout) | precision | "
                  + " | ".join(f"hidden {h}" for h in GRID_HIDDEN) + " |", "|---|---|" + "---|" * len(GRID_HIDDEN)]
        for i in range(0, len(grid_rows), len(GRID_HIDDEN)):
            row = grid_rows[i:i + len(GRID_HIDDEN)]
            layers = row[0]["shape"].split("x")[0]
            lines.append(f"| {layers} layer{'s' if layers != '1' else ''} | {row[0]['precision']} | "
                         + " | ".join(f"{r['ms_step']:.1f}" for r in row) + " |")
    lines += ["", "| sampling | shape | streams | chars/s |", "|---|---|---|---|"]
    for r in sample_rows:
        lines.append(f"| {r['config']} | {r['shape']} | {r['streams']} | {r['chars_s']:,.0f} |")
    if dev.type != "cpu":
        return "\n".join(lines) + "\n"
    lines += ["", "| data | value |", "|---|---|",
              f"| encode {enc['chars'] / 1e6:.0f} MB synthetic text (build vocab + encode) | {enc['seconds']:.2f} s |",
              f"| ids dtype | {enc['dtype']} |",
              f"| peak RSS while encoding (text alone: {enc['rss_before_mb']:.0f} MB) | {enc['peak_rss_mb']:.0f} MB |",
              f"| RSS per corpus character while training (slope {small / 1e6:g}M -> {large / 1e6:g}M chars) "
              f"| {bytes_per_char:.2f} B |"]
    return "\n".join(lines) + "\n"


def products_bound(row: dict) -> float:
    """The speed-up over the module-per-character loop that a training row would reach if its recurrent layers took
    only the time of their matrix products alone: a ceiling for any faster LSTM kernel built on this matmul."""
    per_char = (1 / row["chars_s"] - row["layer_flops"] / (row["layers_gflops"] * 1e9)
                + row["layer_flops"] / (row["products_gflops"] * 1e9))
    return 1 / per_char / row["naive_module_chars_s"]


def write_report(report: str, path: str | Path, command: str, section: str = "bench") -> None:
    """Replace the generated `section` of docs/benchmarks.md (one per kind of device), keeping what people wrote
    around it."""
    path = Path(path)
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    body = f"{start}\nCommand: `{command}`\n\n{report}{end}"
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    if start in old and end in old:
        new = old[: old.index(start)] + body + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + body + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new, encoding="utf-8")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="every path in a few seconds (numbers not comparable)")
    p.add_argument("--write", action="store_true", help="also write the table into docs/benchmarks.md (a section "
                   "per kind of device)")
    p.add_argument("--configs", default="configs", help="folder with tiny.yaml, andersen.yaml, anna.yaml")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--grid", action="store_true", help="add torch-rnn's grid: 1-3 layers x 128/256/512 hidden, "
                   "batch 50, 50 steps, ms per iteration")


def run_from_args(args) -> int:
    from .model import resolve_device

    kind = resolve_device(args.device).type  # a device this machine lacks fails here, before any measurement
    report = run(quick=args.quick, configs_dir=args.configs, device=args.device, grid=args.grid)
    sys.stdout.write(report)
    if args.write:
        flags = [f for f, on in (("--quick", args.quick), (f"--device {args.device}", kind != "cpu"),
                                 ("--grid", args.grid)) if on]
        write_report(report, Path("docs/benchmarks.md"), " ".join(["python scripts/bench.py", *flags]),
                     "bench" if kind == "cpu" else f"bench-{kind}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """scripts/bench.py: `charrnn bench` with the same arguments, and the CLI's one-line errors."""
    from .cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])
