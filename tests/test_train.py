"""Training: run directory files, learning, overwrite protection, exact resume, and the lr schedule."""

import json
import math
import platform
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from charrnn import checkpoint
from charrnn.config import load_config
from charrnn.errors import CharrnnError, UsageError
from charrnn.train import Trainer, keep_freed_memory, lr_at, make_optimizer, overfit_hint

QUIET = {"progress": False, "log": lambda msg: None}


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]


def test_run_writes_its_files(make_cfg, tmp_path):
    cfg = make_cfg({"train.max_steps": 10, "train.eval_every": 5, "train.log_every": 1})
    run_dir = tmp_path / "run"
    summary = Trainer(cfg, run_dir, **QUIET).fit()
    assert summary["steps"] == 10
    for name in ("last.pt", "best.pt", "metrics.jsonl", "config.yaml", "samples.txt"):
        assert (run_dir / name).is_file(), name
    lines = read_metrics(run_dir)
    assert [r["step"] for r in lines] == list(range(1, 11))
    for r in lines:
        assert {"step", "train_loss", "lr", "chars_per_s", "elapsed_s"} <= set(r)
        assert math.isfinite(r["train_loss"]) and r["lr"] > 0 and r["chars_per_s"] > 0 and r["elapsed_s"] >= 0
    evals = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in evals] == [5, 10]
    for r in evals:
        assert r["val_bpc"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-3)
    assert load_config(run_dir / "config.yaml") == cfg
    samples = (run_dir / "samples.txt").read_text(encoding="utf-8")
    assert "step 5" in samples and "step 10" in samples
    ckpt = checkpoint.load(run_dir / "last.pt")
    assert ckpt["position"]["step"] == 10
    best = checkpoint.load(run_dir / "best.pt")
    assert best["metrics"]["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in evals), abs=1e-4)


def test_loss_goes_down(make_cfg, tmp_path):
    cfg = make_cfg({"model.hidden_size": 32, "train.max_steps": 60, "train.eval_every": 60, "train.lr": 1e-2,
                    "train.sample_length": 0})
    run_dir = tmp_path / "run"
    trainer = Trainer(cfg, run_dir, **QUIET)
    summary = trainer.fit()
    losses = [r["train_loss"] for r in read_metrics(run_dir)]
    assert len(losses) == 60
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert summary["best_val_loss"] < math.log(len(trainer.vocab)) - 0.5  # well below a uniform guess


def test_second_run_needs_overwrite(make_cfg, tmp_path):
    cfg = make_cfg({"train.max_steps": 2, "train.eval_every": 2, "train.sample_length": 0})
    run_dir = tmp_path / "run"
    Trainer(cfg, run_dir, **QUIET).fit()
    with pytest.raises(UsageError) as e:
        Trainer(cfg, run_dir, **QUIET)
    assert "--overwrite" in str(e.value) and "--resume" in str(e.value)
    Trainer(cfg, run_dir, overwrite=True, **QUIET).fit()
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]  # the old metrics were replaced


def test_same_seed_same_run(make_cfg, tmp_path):
    cfg = make_cfg({"train.max_steps": 4, "train.eval_every": 4, "train.sample_length": 0,
                    "model.dropout": 0.2})
    Trainer(cfg, tmp_path / "a", **QUIET).fit()
    Trainer(cfg, tmp_path / "b", **QUIET).fit()
    la = [r["train_loss"] for r in read_metrics(tmp_path / "a")]
    lb = [r["train_loss"] for r in read_metrics(tmp_path / "b")]
    assert la == lb


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_exact_resume(make_cfg, tmp_path, text_file, cell, precision):
    # a short text so the run crosses an epoch boundary (the state resets) after the resume point
    text_file.write_text(text_file.read_text(encoding="utf-8")[:1200], encoding="utf-8")
    N, k = 20, 8
    common = {"model.cell": cell, "model.num_layers": 2, "model.dropout": 0.3, "model.hidden_size": 16,
              "train.precision": precision, "train.log_every": 1,
              "train.eval_every": k, "train.schedule": "step", "train.lr_decay_steps": 5, "train.lr_decay": 0.7,
              "train.warmup_steps": 3, "train.sample_length": 5}
    straight = tmp_path / "straight"
    t = Trainer(make_cfg({**common, "train.max_steps": N}), straight, **QUIET)
    assert len(t.train_data) < N  # an epoch boundary lies inside the run
    t.fit()

    resumed = tmp_path / "resumed"
    Trainer(make_cfg({**common, "train.max_steps": k}), resumed, **QUIET).fit()
    ckpt = checkpoint.load(resumed / "last.pt")
    assert ckpt["position"]["step"] == k
    cfg = load_config(None, [f"train.max_steps={N}"], base=ckpt["config"])
    Trainer(cfg, resumed, resume=ckpt, **QUIET).fit()

    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in b] == list(range(1, N + 1))
    assert [(r["step"], r["train_loss"]) for r in a] == [(r["step"], r["train_loss"]) for r in b]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert a[-1]["val_loss"] == b[-1]["val_loss"]
    wa = checkpoint.load(straight / "last.pt")["model"]
    wb = checkpoint.load(resumed / "last.pt")["model"]
    assert all(torch.equal(wa[n], wb[n]) for n in wa)


def test_resume_refuses_a_different_architecture(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(make_cfg({"train.max_steps": 2, "train.eval_every": 2, "train.sample_length": 0}), run_dir,
            **QUIET).fit()
    ckpt = checkpoint.load(run_dir / "last.pt")
    cfg = load_config(None, ["model.hidden_size=24", "train.max_steps=4"], base=ckpt["config"])
    with pytest.raises(UsageError, match="model.hidden_size"):
        Trainer(cfg, run_dir, resume=ckpt, **QUIET)


def test_missing_text_names_download_command(make_cfg, tmp_path):
    cfg = make_cfg({"data.gutenberg": "andersen"}, text_path=tmp_path / "data" / "andersen.txt")
    with pytest.raises(CharrnnError) as e:
        Trainer(cfg, tmp_path / "run", **QUIET)
    assert "charrnn download --gutenberg andersen" in str(e.value)


def sched(**kw):
    base = dict(lr=1.0, warmup_steps=0, schedule="constant", min_lr_ratio=0.1, lr_decay=0.5, lr_decay_steps=10)
    return SimpleNamespace(**{**base, **kw})


def test_overfit_hint_when_val_loss_ends_above_its_best():
    hint = overfit_hint(1.4627, 9500, 1.5104, 16087, 16.4, 0.1)
    assert "step 9500 (1.4627)" in hint and "1.5104 by step 16087" in hint and "--set model.dropout=0.3" in hint
    assert "smaller model" in overfit_hint(1.40, 100, 1.45, 200, 3.0, 0.5)
    assert overfit_hint(1.40, 100, 1.41, 200, 3.0, 0.1) is None  # within noise of the best
    assert overfit_hint(1.40, 200, 1.40, 200, 3.0, 0.1) is None  # best at the end
    assert overfit_hint(math.inf, 0, math.inf, 200, 3.0, 0.1) is None  # no validation split


def test_a_run_that_learns_its_text_by_heart_says_so(make_cfg, tmp_path):
    """Random letters: nothing carries over to the validation split, so its loss rises as the model memorises."""
    rng = random.Random(0)
    text = tmp_path / "random.txt"
    text.write_text("".join(rng.choice("abcdefghij") for _ in range(2000)), encoding="utf-8")
    cfg = make_cfg({"model.hidden_size": 64, "train.max_steps": 150, "train.eval_every": 25,
                    "train.sample_length": 0}, text_path=text)
    logs = []
    summary = Trainer(cfg, tmp_path / "run", progress=False, log=logs.append).fit()
    notes = [line for line in logs if line.startswith("note: val loss was lowest")]
    assert len(notes) == 1 and f"best.pt holds step {summary['best_step']}" in notes[0]
    assert "--set model.dropout=0.2" in notes[0]


def test_a_run_still_improving_gives_no_hint(make_cfg, tmp_path):
    logs = []
    Trainer(make_cfg({"train.max_steps": 20, "train.eval_every": 10}), tmp_path / "run", progress=False,
            log=logs.append).fit()
    assert not [line for line in logs if line.startswith("note:")]


def test_lr_warmup_rises_to_peak():
    cfg = sched(warmup_steps=10, lr=0.5)
    lrs = [lr_at(cfg, s, 0.0) for s in range(15)]
    assert lrs[0] == pytest.approx(0.5 / 10)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert lrs[9] == pytest.approx(0.5)
    assert all(v == pytest.approx(0.5) for v in lrs[9:])


def test_lr_cosine_decays_to_min_ratio():
    cfg = sched(schedule="cosine", lr=2.0, min_lr_ratio=0.1)
    assert lr_at(cfg, 0, 0.0) == pytest.approx(2.0)
    assert lr_at(cfg, 100, 0.5) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert lr_at(cfg, 200, 1.0) == pytest.approx(0.2)
    assert lr_at(cfg, 300, 1.5) == pytest.approx(0.2)  # past the budget it stays at the floor
    values = [lr_at(cfg, 0, p / 10) for p in range(11)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_lr_step_schedule():
    cfg = sched(schedule="step", lr=1.0, lr_decay=0.5, lr_decay_steps=10)
    assert lr_at(cfg, 0, 0.3) == pytest.approx(1.0)
    assert lr_at(cfg, 9, 0.3) == pytest.approx(1.0)
    assert lr_at(cfg, 10, 0.3) == pytest.approx(0.5)
    assert lr_at(cfg, 25, 0.9) == pytest.approx(0.25)


def test_lr_constant():
    cfg = sched(schedule="constant", lr=0.3)
    assert {lr_at(cfg, s, p) for s, p in [(0, 0.0), (50, 0.5), (1000, 1.0)]} == {0.3}


def test_bf16_trains_fp32_master_weights_close_to_fp32(make_cfg, tmp_path):
    """train.precision=bf16 runs the steps in bfloat16 but keeps fp32 weights, optimizer moments and checkpoints, and
    learns about as well as fp32 over the same steps."""
    common = {"model.num_layers": 2, "model.hidden_size": 32, "train.max_steps": 30, "train.eval_every": 30,
              "train.log_every": 30, "train.sample_length": 20}
    losses = {}
    for precision in ("fp32", "bf16"):
        t = Trainer(make_cfg({**common, "train.precision": precision}), tmp_path / precision, **QUIET)
        losses[precision] = t.fit()["best_val_loss"]
    assert t.net is not t.model and t.net.head.weight.dtype == torch.bfloat16
    assert all(torch.equal(p.to(torch.bfloat16), q) for p, q in zip(t.model.parameters(), t.net.parameters()))
    ckpt = checkpoint.load(tmp_path / "bf16" / "last.pt")
    assert {w.dtype for w in ckpt["model"].values()} == {torch.float32}
    assert {s.dtype for s in ckpt["hidden"]} == {torch.float32}
    moments = [v for state in ckpt["optimizer"]["state"].values() for k, v in state.items() if k != "step"]
    assert moments and {m.dtype for m in moments} == {torch.float32}
    assert losses["bf16"] < 3.0 and abs(losses["bf16"] - losses["fp32"]) < 0.05, losses


def test_bf16_warns_where_it_is_emulated(make_cfg, tmp_path, monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("charrnn.train"), "native_bf16", lambda device: False)
    logged = []
    Trainer(make_cfg({"train.precision": "bf16"}), tmp_path / "run", progress=False, log=logged.append)
    assert any("no native bfloat16" in line and "slower than fp32" in line for line in logged)


def test_optimizer_is_fused_where_torch_has_it():
    t = SimpleNamespace(optimizer="adamw", lr=1e-3, weight_decay=0.1)
    opt = make_optimizer([torch.nn.Parameter(torch.ones(3))], t, torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == 0.1
    fused_on_cpu = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)
    assert opt.defaults["fused" if fused_on_cpu else "foreach"] is True


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory is a glibc malloc setting")
def test_keep_freed_memory_keeps_large_blocks_for_reuse():
    """Freed large blocks stay in the process (and are reused) once the setting is on; before, glibc returns them.
    Run apart: the setting lasts for the whole process."""
    code = """
import torch
from charrnn.train import keep_freed_memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
def alloc_free():
    t = torch.ones(16 * 2**20)  # 64 MB, touched
    del t
    return rss()
base = rss()
before = alloc_free() - base
keep_freed_memory()
kept = alloc_free() - base
later = max(alloc_free() for _ in range(8)) - base
print(before // 2**20, kept // 2**20, later // 2**20)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    before, kept, later = map(int, out.stdout.split())
    assert before < 16 and kept >= 60  # returned to the kernel before; kept after
    assert later <= kept + 70  # reused: eight more rounds add at most one block, not one each
