"""charrnn's CPU LSTM kernel: the same outputs and gradients as nn.LSTM on one and two threads, when it applies and
when the model falls back to torch (no compiler, no AVX-512), and the build cache."""

import json
import platform
import shutil
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from charrnn import cpu_lstm
from charrnn.errors import UsageError
from charrnn.info import environment, format_env
from charrnn.model import CharRNN, ModelArgs
from charrnn.train import Trainer, flat_pairs

needs_kernel = pytest.mark.skipif(cpu_lstm.unavailable() is not None,
                                  reason=f"charrnn's CPU kernel cannot be built here: {cpu_lstm.unavailable()}")
AVX512_CPU = "model name : a server\nflags : fpu sse2 avx2 avx512f avx512bw"  # /proc/cpuinfo's lines, for the checks


@contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def model(hidden: int, layers: int, vocab: int = 23, embed: int = 12, dropout: float = 0.0) -> CharRNN:
    torch.manual_seed(0)
    return CharRNN(ModelArgs(vocab_size=vocab, embed_size=embed, hidden_size=hidden, num_layers=layers,
                             dropout=dropout))


def outputs_and_grads(m: CharRNN, kernel: str, x, y, state):
    """Logits, final state and the gradients of every parameter and of the initial state, on `kernel`."""
    m.kernel = kernel
    m.zero_grad(set_to_none=True)
    state = tuple(s.detach().clone().requires_grad_() for s in state)
    logits, (h, c) = m(x, state)
    (F.cross_entropy(*flat_pairs(logits, y)) + 0.1 * h.square().sum() + 0.3 * c.sum()).backward()
    return [logits, h, c] + [p.grad for p in m.parameters()] + [s.grad for s in state]


def assert_close(a, b, rtol=2e-5):
    for u, v in zip(a, b):
        assert u.shape == v.shape
        assert (u - v).abs().max() <= rtol * v.abs().max() + 1e-6


@needs_kernel
@pytest.mark.parametrize("hidden, layers, batch, steps, n_threads", [
    (16, 1, 4, 9, 1),  # the test suite's tiny model
    (128, 2, 50, 20, 2),  # torch-rnn's 2x128 grid shape, on two threads
    (48, 3, 9, 5, 2),  # an odd batch, split 4 + 5 between the threads
    (80, 2, 13, 1, 1),  # a last weight panel narrower than 64 columns, one time step
])
def test_outputs_and_gradients_match_nn_lstm(hidden, layers, batch, steps, n_threads):
    m = model(hidden, layers)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 23, (batch, steps), generator=gen)
    y = torch.randint(0, 23, (batch, steps), generator=gen)
    state = tuple(torch.randn(layers, batch, hidden, generator=gen) * 0.5 for _ in range(2))
    with threads(n_threads):
        assert cpu_lstm.applies(x, m.head.weight, hidden)
        ours = outputs_and_grads(m, "auto", x, y, state)
    assert_close(ours, outputs_and_grads(m, "torch", x, y, state))


@needs_kernel
def test_without_autograd_and_in_inference_mode():
    m = model(32, 2).eval()
    x = torch.randint(0, 23, (8, 11))
    m.kernel = "torch"
    with torch.no_grad():
        want, (h, c) = m(x)
    m.kernel = "auto"
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            got, (h2, c2) = m(x)
        assert_close([got, h2, c2], [want, h, c])


@needs_kernel
def test_dropout_between_layers_is_applied_and_reproducible():
    m = model(32, 2, dropout=0.5).train()
    x = torch.randint(0, 23, (8, 10))
    torch.manual_seed(3)
    a = m(x)[0]
    torch.manual_seed(3)
    assert torch.equal(a, m(x)[0])  # same seed, same masks
    m.eval()
    assert not torch.allclose(a, m(x)[0])  # the masks did something in training


@needs_kernel
def test_a_character_outside_the_embedding_is_an_index_error():
    m = model(16, 1)
    with pytest.raises(IndexError, match="vocabulary"):
        m(torch.full((4, 3), 23))


def test_where_it_applies():
    x = torch.zeros(64, 5, dtype=torch.long)
    w = torch.zeros(1)
    with threads(2):
        assert not cpu_lstm.applies(x, w.to(torch.bfloat16), 128)  # bf16 runs torch's kernel
        assert not cpu_lstm.applies(x, w, 120)  # not a multiple of 16
        assert not cpu_lstm.applies(x[:6], w, 128)  # 3 rows per thread
        assert not cpu_lstm.applies(x, w, 512)  # 32 rows per thread are too few at H=512 (64 needed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not cpu_lstm.applies(x, w, 128)
        if cpu_lstm.unavailable() is None:
            assert cpu_lstm.applies(x, w, 128)
    assert [cpu_lstm.min_rows(h) for h in (32, 128, 256, 512)] == [4, 4, 16, 64]


def test_the_model_falls_back_to_torch_when_no_compiler_builds_it(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_lstm, "_cpu_id", lambda: AVX512_CPU)
    monkeypatch.setattr(cpu_lstm, "_library", None)
    monkeypatch.setattr(cpu_lstm, "_failure", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("CHARRNN_CACHE", str(tmp_path / "cache"))
    assert "no-such-cc" in cpu_lstm.unavailable()
    assert "cannot be built (cannot run the C compiler" in format_env(environment())  # what `charrnn env` prints
    m = model(16, 1)
    x = torch.randint(0, 23, (8, 6))
    assert not cpu_lstm.applies(x, m.head.weight, 16)
    logits, _ = m(x)  # nn.LSTM
    logits.sum().backward()
    assert m.rnn.weight_hh_l0.grad is not None


@needs_kernel
def test_the_build_is_cached(tmp_path):
    first = cpu_lstm.build(out_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cpu_lstm.build(out_dir=tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert list(tmp_path.iterdir()) == [first]  # no temporary files left behind


def test_it_is_built_only_for_avx512(monkeypatch, tmp_path):
    """Built for AVX2 its tiles would not fit the registers: an AVX2 build was 12x slower than oneDNN at 2x128."""
    monkeypatch.setattr(cpu_lstm, "_cpu_id", lambda: AVX512_CPU.replace(" avx512f avx512bw", ""))
    with pytest.raises(cpu_lstm.BuildError, match="no AVX-512"):
        cpu_lstm.build(out_dir=tmp_path)


@needs_kernel
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86 compiler flag")
def test_a_compiler_targeting_less_than_avx512_is_refused_with_a_reason(tmp_path):
    flags = [f for f in cpu_lstm.CFLAGS if f != "-march=native"] + ["-march=x86-64-v3"]  # AVX2
    with pytest.raises(cpu_lstm.BuildError, match="failed: .*written for AVX-512"):
        cpu_lstm.build(flags, out_dir=tmp_path)
    assert not list(tmp_path.glob("*.so"))


@needs_kernel
def test_training_on_the_kernel_learns_and_matches_torch_closely(make_cfg, tmp_path):
    """The same run on both kernels: the losses agree to float rounding over 10 steps, and go down."""
    losses = {}
    for kernel in ("auto", "torch"):
        cfg = make_cfg({"train.kernel": kernel, "model.num_layers": 2, "train.n_seqs": 8})
        trainer = Trainer(cfg, tmp_path / kernel, progress=False, log=lambda m: None)
        assert cpu_lstm.applies(trainer.train_data.batch(0)[0], trainer.model.head.weight, 16)
        trainer.fit()
        lines = (tmp_path / kernel / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        losses[kernel] = [r["train_loss"] for r in map(json.loads, lines) if "train_loss" in r]
    assert losses["auto"][-1] < losses["auto"][0]
    assert losses["auto"] == pytest.approx(losses["torch"], abs=3e-5)  # metrics.jsonl keeps 5 decimals


def test_kernel_setting_is_checked(make_cfg):
    with pytest.raises(UsageError, match="train.kernel"):
        make_cfg({"train.kernel": "fast"})


def test_no_compiler_on_path_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_lstm, "_cpu_id", lambda: AVX512_CPU)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(cpu_lstm.BuildError, match="no C compiler"):
        cpu_lstm.build(out_dir=tmp_path)
