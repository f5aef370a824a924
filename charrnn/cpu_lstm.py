"""charrnn's own LSTM layers for float32 on a CPU with AVX-512: the time loop of cpu_lstm.c, compiled on first use
with the machine's C compiler (OpenMP, -march=native) and cached; where it cannot be built or does not apply, the
model runs torch's nn.LSTM (oneDNN) instead, with the same weights and results to float rounding.

Why: at the sizes char-rnn trains on a laptop, oneDNN's LSTM spends most of a step between its small per-step
matrix products, and no kernel made of torch calls does better (docs/benchmarks.md). Here each thread runs its
own streams of the batch through all time steps with no synchronisation, a step's product is a register-blocked
tile with the gate nonlinearities applied in cache, and the first layer's input product is a row lookup: the
embedding followed by W_ih is one (vocabulary x 4H) table. The weight gradients, large products over all steps,
stay with torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_lstm.c")
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-Wno-psabi"]
FUSED_TABLE_BYTES = 8 << 20  # the backward pass sums the table's gradient itself while its per-thread copies fit

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None  # why the kernel could not be built or loaded, once tried


class BuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    """Where built kernels are kept: $CHARRNN_CACHE, else $XDG_CACHE_HOME/charrnn, else ~/.cache/charrnn."""
    if os.environ.get("CHARRNN_CACHE"):
        return Path(os.environ["CHARRNN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "charrnn"


def _openmp_runtime() -> list[str]:
    """Link to the OpenMP runtime torch has loaded, so the kernel's threads are torch's threads: with a second
    runtime both pools would spin for the same cores. Empty (the compiler's own runtime) where torch ships none."""
    lib = Path(torch.__file__).parent / "lib"
    found = sorted(lib.glob("libgomp*.so*")) + sorted((lib.parent.parent / "torch.libs").glob("libgomp*.so*"))
    return [str(found[0])] if found else ["-fopenmp"]


def _cpu_id() -> str:
    """The CPU's model and features: a kernel built with -march=native runs only where they match."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        return "\n".join(sorted({line for line in info.splitlines() if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def build(cflags: list[str] = CFLAGS, cc: str | None = None, out_dir: Path | None = None) -> Path:
    """Compile cpu_lstm.c into a shared library in the cache (once per source, compiler, flags and CPU) and return
    its path. Raises BuildError with the compiler's message if there is no compiler or it fails."""
    cpu = _cpu_id()
    if "flags" in cpu and " avx512f" not in cpu:
        raise BuildError("this CPU has no AVX-512, which the kernel is written for")
    cc = cc or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise BuildError("no C compiler found (set CC, or install gcc)")
    link = _openmp_runtime()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"cannot run the C compiler {cc}: {e}") from None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, *cflags, *link, cpu]).encode())
    out_dir = out_dir or cache_dir()
    target = out_dir / f"cpu_lstm-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        obj, lib = Path(tmp, "cpu_lstm.o"), Path(tmp, "cpu_lstm.so")
        for cmd in ([cc, *cflags, "-c", str(SOURCE), "-o", str(obj)], [cc, "-shared", str(obj), *link, "-o", str(lib)]):
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as e:
                raise BuildError(f"{' '.join(cmd)}: {e}") from None
            if done.returncode:
                lines = done.stderr.strip().splitlines() or ["(no message)"]
                first = next((line for line in lines if "error" in line), lines[-1])
                raise BuildError(f"{cc} failed: {first.strip()}\n{' '.join(cmd)}\n{done.stderr.strip()}")
        os.replace(lib, target)  # atomic: a concurrent build writes the same bytes
    return target


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.lstm_forward.argtypes = [i] * 5 + [p] * 10
    lib.lstm_forward.restype = None
    lib.lstm_backward.argtypes = [i] * 5 + [p] * 11 + [i, p]
    lib.lstm_backward.restype = None
    lib.pack_panels.argtypes = [i, i, p, ctypes.c_long, ctypes.c_long, p]
    lib.pack_panels.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The built kernel, building it on the first call; None if it cannot be built here (see `unavailable`)."""
    global _library, _failure
    with _lock:
        if _library is None and _failure is None:
            if sys.platform == "win32":
                _failure = "not built on Windows"
            else:
                try:
                    _library = _load(build())
                except (BuildError, OSError) as e:
                    _failure = str(e)
        return _library


def unavailable() -> str | None:
    """Why the kernel cannot be used here, or None if it can (builds it if not tried yet)."""
    library()
    return _failure


def min_rows(hidden_size: int) -> int:
    """The fewest batch rows per thread at which this kernel beats oneDNN's (docs/benchmarks.md, round 10). Each
    thread streams all of a step's weights, 16·H² bytes, for its rows: past the cache that takes rows ~ H²/4096 to
    pay (H=128: 4, 256: 16, 384: 36, 512: 64), where oneDNN, which gives each thread part of the weights, wins."""
    return max(4, hidden_size * hidden_size // 4096)


def applies(x: torch.Tensor, weight: torch.Tensor, hidden_size: int) -> bool:
    """Whether a batch `x` (B, T) of ids runs on this kernel: float32 weights on a CPU, no autocast or tracing, a
    hidden size that is a multiple of 16 (whole vectors), enough rows per thread, and the kernel built."""
    return (x.device.type == "cpu" and weight.dtype == torch.float32 and hidden_size % 16 == 0
            and x.dim() == 2 and x.size(1) >= 1 and x.size(0) >= min_rows(hidden_size) * torch.get_num_threads()
            and not _autocast() and not torch.jit.is_tracing() and not torch.jit.is_scripting()
            and library() is not None)


def _autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def panels(w: torch.Tensor) -> torch.Tensor:
    """A (K, N) matrix, any strides, in the kernel's packing: for each 64 columns (fewer in the last) a contiguous
    (K, width) block. In C: torch's copy of a transposed matrix into that order is several times slower."""
    out = w.new_empty(w.numel())
    library().pack_panels(w.size(0), w.size(1), _ptr(w), w.stride(0), w.stride(1), _ptr(out))
    return out


def _ptr(t: torch.Tensor | None):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def _forward(x, w_ih, w_hh, bias, h0, c0, ids, keep: bool):
    """The layer's time loop: (h (T+1,B,H), c (T+1,B,H), acts, tc), the last two None unless `keep`."""
    hidden = w_hh.size(1)
    if ids is not None:
        steps, batch = ids.shape
        src, width, wx = torch.addmm(bias, x, w_ih.t()), 0, None  # the (vocabulary, 4H) table
    else:
        steps, batch, width = x.shape
        src, wx = x.contiguous(), panels(w_ih.t())
    threads = min(torch.get_num_threads(), batch)
    h = x.new_empty(steps + 1, batch, hidden)
    c = x.new_empty(steps + 1, batch, hidden)
    h[0], c[0] = h0, c0
    acts = x.new_empty(steps, batch, 4 * hidden) if keep else None
    tc = x.new_empty(steps, batch, hidden) if keep else None
    scratch = x.new_empty(threads, -(-batch // threads) * 4 * hidden)
    bias, wt = bias.contiguous(), panels(w_hh.t())  # named: the C call must not outlive a temporary's memory
    library().lstm_forward(steps, batch, hidden, width, threads, _ptr(src), _ptr(ids), _ptr(wx), _ptr(bias),
                           _ptr(wt), _ptr(acts), _ptr(h), _ptr(c), _ptr(tc), _ptr(scratch))
    return h, c, acts, tc


class _Layer(torch.autograd.Function):
    """One LSTM layer over a (T, B, ·) sequence; see `lstm_layer`."""

    @staticmethod
    def forward(ctx, x, w_ih, w_hh, bias, h0, c0, ids):
        h, c, acts, tc = _forward(x, w_ih, w_hh, bias, h0, c0, ids, keep=True)
        ctx.save_for_backward(x, w_ih, w_hh, h, c, tc, acts, ids)
        return h[1:], h[-1].clone(), c[-1].clone()

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        x, w_ih, w_hh, h, c, tc, acts, ids = ctx.saved_tensors
        steps, batch, hidden = h.size(0) - 1, h.size(1), h.size(2)
        threads = min(torch.get_num_threads(), batch)
        d_out = d_out.contiguous() if d_out is not None else h.new_zeros(steps, batch, hidden)
        dh = d_hn.clone() if d_hn is not None else h.new_zeros(batch, hidden)  # becomes the initial state's
        dc = d_cn.clone() if d_cn is not None else h.new_zeros(batch, hidden)
        need = ctx.needs_input_grad
        fused_dx = ids is None and need[0] and x.size(2) % 16 == 0  # the input gradient from the time loop
        dx = x.new_empty(x.shape) if fused_dx else None
        fused_table = ids is not None and threads * x.size(0) * 16 * hidden <= FUSED_TABLE_BYTES
        table = h.new_empty(threads, x.size(0), 4 * hidden) if fused_table else None
        db, w, wx = h.new_empty(threads, 4 * hidden), panels(w_hh), panels(w_ih) if fused_dx else None
        library().lstm_backward(steps, batch, hidden, x.size(-1), threads, _ptr(acts), _ptr(w), _ptr(wx), _ptr(c),
                                _ptr(tc), _ptr(d_out), _ptr(dh), _ptr(dc), _ptr(db), _ptr(dx),
                                _ptr(ids) if fused_table else None, x.size(0), _ptr(table))
        dg = acts.view(steps * batch, 4 * hidden)  # now the gradient of the gate pre-activations
        # h_prev^T @ dg, transposed: a sixth faster than dg^T @ h_prev with dg fresh from memory
        d_w_hh = torch.mm(h[:-1].reshape(steps * batch, hidden).t(), dg).t() if need[2] else None
        if ids is not None:  # x is the embedding: the table's gradient, then its two factors'
            table = table.sum(0) if fused_table else \
                h.new_zeros(x.size(0), 4 * hidden).index_add_(0, ids.reshape(-1), dg)
            dx = torch.mm(table, w_ih) if need[0] else None
            d_w_ih = torch.mm(table.t(), x) if need[1] else None
        else:
            if need[0] and not fused_dx:
                dx = torch.mm(dg, w_ih).view(x.shape)
            d_w_ih = torch.mm(x.reshape(steps * batch, -1).t(), dg).t() if need[1] else None
        return dx, d_w_ih, d_w_hh, db.sum(0) if need[3] else None, dh, dc, None


def lstm_layer(x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, bias: torch.Tensor, h0: torch.Tensor,
               c0: torch.Tensor, ids: torch.Tensor | None = None):
    """One LSTM layer, nn.LSTM's gates (i, f, g, o) and weights: x (T, B, I) -> outputs (T, B, H) and the final
    (h, c), each (B, H). With `ids` (T, B), x is instead the (V, I) embedding and the layer's input is its rows
    `ids`. `bias` is b_ih + b_hh. Differentiable in all tensors but `ids`."""
    if ids is not None:
        ids = ids.long().contiguous()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= x.size(0)):
            raise IndexError(f"character ids must be in [0, {x.size(0)}): the vocabulary's size")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_ih, w_hh, bias, h0, c0)):
        return _Layer.apply(x, w_ih, w_hh, bias, h0, c0, ids)
    h, c, _, _ = _forward(x, w_ih, w_hh, bias, h0, c0, ids, keep=False)
    return h[1:], h[-1], c[-1]

