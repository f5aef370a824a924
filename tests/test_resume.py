"""Leaving training running: exact resume after a stop request, early stopping and reduce-on-plateau, the divergence
guard, best.pt across resumes, summary.json, and fine-tuning from a checkpoint (--init-from, --extend-vocab)."""

import json
import math
import signal

import pytest
import torch

from charrnn import checkpoint
from charrnn.cli import main
from charrnn.config import load_config
from charrnn.errors import CharrnnError, UsageError
from charrnn.train import Trainer

QUIET = {"progress": False, "log": lambda msg: None}


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))


class SignalAt(Trainer):
    """Sends itself `signum` in the middle of step `at` (the real handler runs, as with Ctrl-C)."""

    def __init__(self, *args, at: int, signum=signal.SIGINT, **kwargs):
        super().__init__(*args, **kwargs)
        self.at, self.signum = at, signum

    def train_step(self, x, y, lr):
        loss = super().train_step(x, y, lr)
        if self.step + 1 == self.at:
            signal.raise_signal(self.signum)
        return loss


def scripted_val(monkeypatch, losses: dict):
    """Make evaluate() return `losses[step]`: drives early stopping and the plateau logic deterministically."""
    monkeypatch.setattr(Trainer, "evaluate", lambda self: losses[self.step])


def test_stop_at_20_and_resume_is_bit_identical_to_40_straight(make_cfg, tmp_path):
    # the cosine schedule spans the 40-step budget, so the first session is stopped (not given max_steps=20);
    # dropout exercises the RNG restore, log_every=3 a metrics window that spans the stop
    cfg = make_cfg({"model.num_layers": 2, "model.dropout": 0.3, "train.max_steps": 40, "train.schedule": "cosine",
                    "train.warmup_steps": 5, "train.log_every": 3, "train.eval_every": 8, "train.sample_length": 5})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    Trainer(cfg, straight, **QUIET).fit()

    first = SignalAt(cfg, resumed, at=20, **QUIET)
    assert first.fit()["stopped"] == "SIGINT"
    assert first.exit_code == 130
    ckpt = checkpoint.load(resumed / "last.pt")
    assert ckpt["position"]["step"] == 20
    assert summary(resumed)["stopped"] == "SIGINT"
    second = Trainer(load_config(None, base=ckpt["config"]), resumed, resume=ckpt, **QUIET)
    assert second.fit()["stopped"] == "budget" and second.exit_code == 0

    a, b = read_metrics(straight), read_metrics(resumed)
    keys = ("step", "train_loss", "grad_norm", "lr", "val_loss")
    assert [[r.get(k) for k in keys] for r in a] == [[r.get(k) for k in keys] for r in b]
    assert [r["step"] for r in b] == [3, 6, 8, 9, 12, 15, 16, 18, 21, 24, 27, 30, 32, 33, 36, 39, 40]
    wa, wb = checkpoint.load(straight / "last.pt")["model"], checkpoint.load(resumed / "last.pt")["model"]
    assert all(torch.equal(wa[n], wb[n]) for n in wa)


def test_every_logged_step_loss_matches_with_log_every_1(make_cfg, tmp_path):
    cfg = make_cfg({"model.dropout": 0.2, "train.max_steps": 12, "train.log_every": 1, "train.eval_every": 5,
                    "train.sample_length": 0})
    Trainer(cfg, tmp_path / "a", **QUIET).fit()
    SignalAt(cfg, tmp_path / "b", at=7, signum=signal.SIGTERM, **QUIET).fit()
    ckpt = checkpoint.load(tmp_path / "b" / "last.pt")
    Trainer(cfg, tmp_path / "b", resume=ckpt, **QUIET).fit()
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [(r["step"], r["train_loss"]) for r in a] == [(r["step"], r["train_loss"]) for r in b]
    assert len(b) == 12


def test_changed_training_settings_are_reported_on_resume(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(make_cfg({"train.max_steps": 4, "train.eval_every": 4, "train.sample_length": 0}), run_dir,
            **QUIET).fit()
    ckpt = checkpoint.load(run_dir / "last.pt")
    logged = []
    cfg = load_config(None, ["train.max_steps=6", "train.lr=0.005"], base=ckpt["config"])
    Trainer(cfg, run_dir, resume=ckpt, progress=False, log=logged.append).fit()
    changed = [m for m in logged if m.startswith("resume: changed")]
    assert len(changed) == 1 and "train.lr=0.005" in changed[0] and "train.max_steps=6" in changed[0]
    assert read_metrics(run_dir)[-1]["step"] == 6


def test_early_stopping_after_patience_evaluations(make_cfg, tmp_path, monkeypatch):
    scripted_val(monkeypatch, {5: 2.0, 10: 1.5, 15: 1.6, 20: 1.55, 25: 1.7, 30: 1.4})
    cfg = make_cfg({"train.max_steps": 30, "train.eval_every": 5, "train.patience": 3, "train.sample_length": 0})
    logged = []
    run_dir = tmp_path / "run"
    trainer = Trainer(cfg, run_dir, progress=False, log=logged.append)
    result = trainer.fit()
    assert result["stopped"] == "early_stopping" and result["steps"] == 25 and trainer.exit_code == 0
    assert result["best_val_loss"] == 1.5 and result["best_step"] == 10
    assert summary(run_dir)["stopped"] == "early_stopping"
    assert any(m.startswith("early stopping at step 25") for m in logged)
    assert checkpoint.load(run_dir / "best.pt")["position"]["step"] == 10
    assert checkpoint.load(run_dir / "last.pt")["position"]["step"] == 25


def test_plateau_cuts_the_lr_and_resumes_exactly(make_cfg, tmp_path, monkeypatch):
    vals = {4: 2.0, 8: 2.1, 12: 2.2, 16: 1.9, 20: 2.0, 24: 2.0, 28: 2.0}
    scripted_val(monkeypatch, vals)
    cfg = make_cfg({"train.max_steps": 28, "train.eval_every": 4, "train.log_every": 1, "train.schedule": "constant",
                    "train.warmup_steps": 0, "train.lr": 0.01, "train.plateau_patience": 2,
                    "train.plateau_factor": 0.5, "train.sample_length": 0})
    Trainer(cfg, tmp_path / "a", **QUIET).fit()
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "a")}
    # no new best at 8 and 12 -> x0.5 from step 13; best at 16 resets; none at 20, 24 -> x0.25 from step 25
    assert lrs[12] == 0.01 and lrs[13] == 0.005 and lrs[24] == 0.005 and lrs[25] == 0.0025 and lrs[28] == 0.0025

    SignalAt(cfg, tmp_path / "b", at=14, **QUIET).fit()  # stop with one cut made and a count of 0 running
    ckpt = checkpoint.load(tmp_path / "b" / "last.pt")
    assert ckpt["schedule"]["lr_scale"] == 0.5
    Trainer(cfg, tmp_path / "b", resume=ckpt, **QUIET).fit()
    assert [(r["step"], r["lr"], r["train_loss"]) for r in read_metrics(tmp_path / "a")] == \
           [(r["step"], r["lr"], r["train_loss"]) for r in read_metrics(tmp_path / "b")]


def test_best_pt_is_never_replaced_by_a_worse_one_across_resumes(make_cfg, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = make_cfg({"train.max_steps": 10, "train.eval_every": 5, "train.keep_last": 5, "train.sample_length": 0})
    scripted_val(monkeypatch, {5: 2.0, 10: 1.0})
    Trainer(cfg, run_dir, **QUIET).fit()
    assert checkpoint.load(run_dir / "best.pt")["position"]["step"] == 10
    # resume from the older step-5 file, whose own best is 2.0: 1.5 beats that but not best.pt's 1.0
    old = checkpoint.load(run_dir / "step-00000005.pt")
    assert old["metrics"]["best_val_loss"] == 2.0
    scripted_val(monkeypatch, {10: 1.5, 15: 0.5})
    logged = []
    cfg15 = load_config(None, ["train.max_steps=15"], base=old["config"])
    Trainer(cfg15, run_dir, resume=old, progress=False, log=logged.append).fit()
    best = checkpoint.load(run_dir / "best.pt")
    assert best["position"]["step"] == 15 and best["metrics"]["val_loss"] == 0.5
    assert any(m.startswith("step 10: val loss 1.5000") and "best" not in m for m in logged)


def test_best_pt_survives_a_resume_that_only_gets_worse(make_cfg, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = make_cfg({"train.max_steps": 10, "train.eval_every": 5, "train.keep_last": 5, "train.sample_length": 0})
    scripted_val(monkeypatch, {5: 2.0, 10: 1.0})
    Trainer(cfg, run_dir, **QUIET).fit()
    before = (run_dir / "best.pt").read_bytes()
    old = checkpoint.load(run_dir / "step-00000005.pt")
    scripted_val(monkeypatch, {10: 1.5, 15: 1.2})
    Trainer(load_config(None, ["train.max_steps=15"], base=old["config"]), run_dir, resume=old, **QUIET).fit()
    assert (run_dir / "best.pt").read_bytes() == before


class Diverging(Trainer):
    """A train step whose loss turns bad from step `at`: NaN, or `factor` x the real one."""

    def __init__(self, *args, at: int, factor: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.at, self.factor = at, factor

    def train_step(self, x, y, lr):
        loss = super().train_step(x, y, lr)
        return loss * self.factor if self.step + 1 >= self.at else loss


@pytest.mark.parametrize("factor, why", [(math.nan, "loss nan"), (10.0, "over 3x the first logged loss")])
def test_divergence_stops_keeps_checkpoints_and_suggests_a_lower_lr(make_cfg, tmp_path, factor, why):
    cfg = make_cfg({"train.max_steps": 30, "train.eval_every": 5, "train.log_every": 2, "train.lr": 0.01,
                    "train.sample_length": 0})
    run_dir = tmp_path / "run"
    with pytest.raises(CharrnnError) as e:
        Diverging(cfg, run_dir, at=12, factor=factor, **QUIET).fit()
    msg = str(e.value)
    assert "diverged at step 12" in msg and why in msg and "--set train.lr=0.0033" in msg and "\n" not in msg
    assert e.value.exit_code == 1
    for name in ("last.pt", "best.pt"):
        ckpt = checkpoint.load(run_dir / name)
        assert ckpt["position"]["step"] == 10  # the last good evaluation; the broken weights were not saved
        assert all(torch.isfinite(w).all() for w in ckpt["model"].values())
    assert summary(run_dir)["stopped"] == "diverged"
    assert all(math.isfinite(r["train_loss"]) for r in read_metrics(run_dir))


def test_summary_json_at_the_end(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    result = Trainer(make_cfg({"train.max_steps": 6, "train.eval_every": 3, "train.sample_length": 0}), run_dir,
                     **QUIET).fit()
    lines = (run_dir / "summary.json").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1
    s = json.loads(lines[0])
    assert s == result
    assert s["stopped"] == "budget" and s["steps"] == 6 and s["chars_seen"] == 6 * 4 * 16
    assert s["best_val_bpc"] == pytest.approx(s["best_val_loss"] / math.log(2))


def test_patience_without_a_validation_split_is_refused(make_cfg, tmp_path):
    with pytest.raises(UsageError, match="data.val_fraction"):
        Trainer(make_cfg({"train.patience": 2, "data.val_fraction": 0.0}), tmp_path / "run", **QUIET)


# --- fine-tuning ---------------------------------------------------------------------------------------------------


@pytest.fixture
def base_run(make_cfg, tmp_path):
    run_dir = tmp_path / "base"
    Trainer(make_cfg({"train.max_steps": 6, "train.eval_every": 6, "train.sample_length": 0}), run_dir,
            **QUIET).fit()
    return run_dir


def test_init_from_is_a_fresh_run_from_the_weights(make_cfg, base_run, tmp_path):
    init = checkpoint.load(base_run / "best.pt")
    trainer = Trainer(make_cfg({"train.max_steps": 4, "train.eval_every": 4}), tmp_path / "ft", init_from=init,
                      **QUIET)
    assert trainer.step == 0 and not trainer.optimizer.state
    assert all(torch.equal(v, init["model"][k]) for k, v in trainer.model.state_dict().items())
    trainer.fit()
    assert [r["step"] for r in read_metrics(tmp_path / "ft")] == [1, 2, 3, 4]


def test_init_from_refuses_new_characters_and_extend_vocab_keeps_old_rows(make_cfg, base_run, tmp_path):
    init = checkpoint.load(base_run / "best.pt")
    other = tmp_path / "other.txt"
    other.write_text("Zebras and quokkas jump! " * 200, encoding="utf-8")
    cfg = make_cfg({"train.max_steps": 3, "train.eval_every": 3, "train.sample_length": 0}, text_path=other)
    with pytest.raises(UsageError) as e:
        Trainer(cfg, tmp_path / "ft", init_from=init, **QUIET)
    assert "3 character(s)" in str(e.value) and ": ! Z j;" in str(e.value) and "--extend-vocab" in str(e.value)

    trainer = Trainer(cfg, tmp_path / "ft", init_from=init, extend_vocab=True, **QUIET)
    old = list(init["vocab"]["chars"])
    assert trainer.vocab.chars == sorted(set(old) | set("Zebras and quokkas jump!"))
    assert any(trainer.vocab.index[c] != i for i, c in enumerate(old))  # re-sorted: rows had to move
    sd = trainer.model.state_dict()
    for name in ("embed.weight", "head.weight", "head.bias"):
        for i, c in enumerate(old):
            assert torch.equal(sd[name][trainer.vocab.index[c]], init["model"][name][i]), (name, c)
    assert torch.equal(sd["rnn.weight_hh_l0"], init["model"]["rnn.weight_hh_l0"])
    trainer.fit()
    assert checkpoint.load(tmp_path / "ft" / "last.pt")["vocab"]["chars"] == "".join(trainer.vocab.chars)


def test_init_from_refuses_a_different_architecture(make_cfg, base_run, tmp_path):
    init = checkpoint.load(base_run / "best.pt")
    with pytest.raises(UsageError, match="model.hidden_size"):
        Trainer(make_cfg({"model.hidden_size": 24}), tmp_path / "ft", init_from=init, **QUIET)


def test_cli_init_from(base_run, tmp_path, write_yaml, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other.txt"
    other.write_text("Zebras jump! " * 300, encoding="utf-8")
    # the YAML leaves the model section out: it comes from the checkpoint
    (tmp_path / "ft.yaml").write_text(f"data:\n  path: {other}\ntrain:\n  max_steps: 3\n  max_epochs: 0\n"
                                      f"  n_seqs: 4\n  n_steps: 16\n  sample_length: 0\n  device: cpu\n")
    ckpt = str(base_run / "best.pt")
    assert main(["train", "--config", "ft.yaml", "--init-from", ckpt, "--no-progress"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("charrnn: error:")]
    assert len(err) == 1 and "Z" in err[0] and "--extend-vocab" in err[0]
    assert main(["train", "--config", "ft.yaml", "--init-from", ckpt, "--extend-vocab", "--no-progress"]) == 0
    ft = checkpoint.load(tmp_path / "checkpoints" / "ft" / "last.pt")
    assert ft["position"]["step"] == 3 and "Z" in ft["vocab"]["chars"] and ft["config"]["model"]["hidden_size"] == 16
    assert main(["train", "--config", "ft.yaml", "--extend-vocab", "--no-progress"]) == 2
    assert main(["train", "--config", "ft.yaml", "--init-from", ckpt, "--resume", "auto"]) == 2


def test_resuming_an_older_checkpoint_drops_the_later_metrics_and_samples(make_cfg, tmp_path):
    cfg = make_cfg({"train.max_steps": 16, "train.eval_every": 4, "train.log_every": 2, "train.checkpoint_every": 8,
                    "train.keep_last": 4, "train.sample_length": 8})
    run = tmp_path / "run"
    Trainer(cfg, run, **QUIET).fit()
    samples, metrics = (run / "samples.txt").read_text(encoding="utf-8"), read_metrics(run)
    assert samples.count("=== step ") == 4

    ckpt = checkpoint.load(run / "step-00000008.pt")
    Trainer(load_config(None, base=ckpt["config"]), run, resume=ckpt, **QUIET).fit()
    assert (run / "samples.txt").read_text(encoding="utf-8") == samples  # steps 12 and 16 once, the same
    untimed = [{k: v for k, v in r.items() if k not in ("chars_per_s", "elapsed_s")} for r in metrics]
    assert [{k: v for k, v in r.items() if k not in ("chars_per_s", "elapsed_s")} for r in read_metrics(run)] == untimed
