"""Metrics and plots: grad_norm in metrics.jsonl, `charrnn plot` (matplotlib optional), optional TensorBoard."""

import json
import sys
import types

import pytest

from charrnn.cli import main
from charrnn.errors import CharrnnError
from charrnn.plot import make_figure, read_metrics
from charrnn.train import Trainer

QUIET = {"progress": False, "log": lambda msg: None}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run_dir(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(make_cfg({"train.max_steps": 12, "train.eval_every": 4, "train.log_every": 2, "train.sample_length": 0}),
            run_dir, **QUIET).fit()
    return run_dir


def test_metrics_carry_grad_norm_before_clipping(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(make_cfg({"train.max_steps": 6, "train.eval_every": 3, "train.grad_clip": 0.01, "train.log_every": 1,
                      "train.sample_length": 0}), run_dir, **QUIET).fit()
    records = read_metrics(run_dir)
    assert len(records) == 6
    for r in records:
        assert {"step", "train_loss", "lr", "grad_norm", "chars_per_s", "elapsed_s"} <= r.keys()
        assert r["grad_norm"] > 0.01  # the norm before clipping to 0.01
    assert len({r["grad_norm"] for r in records}) > 1


def test_plot_writes_a_png_with_both_curves_in_both_panels(run_dir, capsys):
    pytest.importorskip("matplotlib")
    assert main(["plot", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run_dir / 'loss.png'}"
    assert (run_dir / "loss.png").read_bytes().startswith(PNG)

    records = read_metrics(run_dir)
    fig = make_figure(records)
    by_step, by_time = fig.axes[:2]
    for ax, key in ((by_step, "step"), (by_time, "elapsed_s")):
        train, val = ax.get_lines()
        assert train.get_label() == "train loss" and val.get_label() == "val loss"
        assert list(train.get_ydata()) == [r["train_loss"] for r in records]
        assert list(val.get_ydata()) == [r["val_loss"] for r in records if "val_loss" in r]
        assert list(val.get_xdata()) == [r[key] for r in records if "val_loss" in r]  # seconds: a short run
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8, 12]


def test_plot_skips_a_torn_last_line(run_dir):
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 13, "tra')
    assert len(read_metrics(run_dir)) == 6


def test_plot_without_matplotlib_is_one_line(run_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["plot", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'charrnn[plot]'" in err and "Traceback" not in err
    assert not (run_dir / "loss.png").exists()


def test_plot_of_a_directory_without_metrics(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("charrnn: error:") and "metrics.jsonl not found" in err and err.count("\n") == 1
    (tmp_path / "metrics.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(CharrnnError, match="no metrics yet"):
        read_metrics(tmp_path)


def test_tensorboard_asked_for_but_missing_is_a_clear_error(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(CharrnnError, match="pip install tensorboard"):
        Trainer(make_cfg({"train.tensorboard": True}), tmp_path / "run", **QUIET)


def test_tensorboard_gets_the_metrics(make_cfg, tmp_path, monkeypatch):
    writers = []

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
            writers.append(self)

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, step, value))

        def close(self):
            self.closed = True

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    run_dir = tmp_path / "run"
    Trainer(make_cfg({"train.max_steps": 4, "train.eval_every": 2, "train.log_every": 1, "train.tensorboard": True,
                      "train.sample_length": 0}), run_dir, **QUIET).fit()
    (w,) = writers
    assert w.log_dir == str(run_dir / "tensorboard") and w.purge_step is None and w.closed
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(s, v) for tag, s, v in w.scalars if tag == "train_loss"] == [(r["step"], r["train_loss"]) for r in records]
    assert [s for tag, s, _ in w.scalars if tag == "val_loss"] == [2, 4]
    assert {tag for tag, _, _ in w.scalars} == {"train_loss", "val_loss", "val_bpc", "lr", "grad_norm", "chars_per_s"}
