"""Interrupts and crash safety: SIGINT/SIGTERM on a real `charrnn train` process, a second signal, stale temp files,
failed checkpoint writes (disk full, read-only), and the SIGKILL crash test (scripts/crashtest.py)."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from charrnn import checkpoint
from charrnn.cli import main
from charrnn.errors import CharrnnError
from charrnn.train import Interrupted, Trainer

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"progress": False, "log": lambda msg: None}


def read_steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def temp_files(run_dir):
    return [p.name for p in run_dir.iterdir() if checkpoint.TEMP_FILE.fullmatch(p.name)]


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if len(read_steps(run_dir)) >= step:
                return
        except (OSError, ValueError):
            pass  # not written yet, or a line half written
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no progress in {timeout}s")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_prints_the_resume_command_and_resume_auto_finishes(tmp_path, write_yaml, monkeypatch,
                                                                          signum, code):
    monkeypatch.chdir(tmp_path)
    config = write_yaml("tiny.yaml", {"train.max_steps": 100_000, "train.log_every": 1, "train.eval_every": 50,
                                      "train.sample_length": 0})
    run_dir = tmp_path / "checkpoints" / "tiny"
    proc = subprocess.Popen([sys.executable, "-m", "charrnn", "train", "--config", str(config), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(run_dir, proc, 5)
    proc.send_signal(signum)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == code, err
    assert f"resume with: charrnn train --resume {Path('checkpoints/tiny/last.pt')}" in err
    assert "Traceback" not in err
    step = checkpoint.load(run_dir / "last.pt")["position"]["step"]
    assert step >= 5 and f"(step {step})" in err
    assert json.loads((run_dir / "summary.json").read_text())["stopped"] == signal.Signals(signum).name
    assert not temp_files(run_dir)

    assert main(["train", "--config", str(config), "--resume", "auto", "--no-progress",
                 "--set", f"train.max_steps={step + 5}"]) == 0
    assert checkpoint.load(run_dir / "last.pt")["position"]["step"] == step + 5
    assert read_steps(run_dir) == list(range(1, step + 6))
    assert json.loads((run_dir / "summary.json").read_text())["stopped"] == "budget"


def test_second_signal_stops_at_once_and_leaves_files_whole(make_cfg, tmp_path, monkeypatch):
    """Ctrl-C during a step, then again while the stop's checkpoint is being written: the write is abandoned
    (its temp file removed), and last.pt keeps the earlier checkpoint."""
    real_replace = os.replace

    class CtrlC(Trainer):
        def train_step(self, x, y, lr):
            loss = super().train_step(x, y, lr)
            if self.step + 1 == 7:
                signal.raise_signal(signal.SIGINT)
                monkeypatch.setattr(os, "replace", again)
            return loss

    def again(src, dst):
        signal.raise_signal(signal.SIGINT)
        return real_replace(src, dst)

    run_dir = tmp_path / "run"
    cfg = make_cfg({"train.max_steps": 50, "train.eval_every": 5, "train.sample_length": 0})
    with pytest.raises(Interrupted) as e:
        CtrlC(cfg, run_dir, **QUIET).fit()
    assert e.value.exit_code == 130 and "SIGINT again" in str(e.value)
    monkeypatch.setattr(os, "replace", real_replace)
    assert checkpoint.load(run_dir / "last.pt")["position"]["step"] == 5
    assert not temp_files(run_dir)


def test_stale_temp_files_are_removed_and_never_used(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_cfg({"train.max_steps": 4, "train.eval_every": 2, "train.sample_length": 0})
    Trainer(cfg, run_dir, **QUIET).fit()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    stale = [run_dir / f".last.pt.tmp-{dead.pid}", run_dir / f".best.pt.tmp-{os.getpid()}"]
    live = run_dir / f".best.pt.tmp-{os.getppid()}"  # a live process's save in progress: not ours to delete
    for p in stale + [live]:
        p.write_bytes(b"torn")
    ckpt = checkpoint.load(run_dir / "last.pt")
    logged = []
    Trainer(make_cfg({"train.max_steps": 6, "train.eval_every": 2, "train.sample_length": 0}), run_dir,
            resume=ckpt, progress=False, log=logged.append).fit()
    assert not any(p.exists() for p in stale) and live.exists()
    assert any(m.startswith("removed 2 temp file(s)") for m in logged)
    assert checkpoint.load(run_dir / "last.pt")["position"]["step"] == 6


def test_torn_metrics_line_from_a_kill_is_dropped_on_resume(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(make_cfg({"train.max_steps": 4, "train.eval_every": 4, "train.sample_length": 0}), run_dir,
            **QUIET).fit()
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 5, "train_lo')
    ckpt = checkpoint.load(run_dir / "last.pt")
    Trainer(make_cfg({"train.max_steps": 6, "train.eval_every": 2, "train.sample_length": 0}), run_dir,
            resume=ckpt, **QUIET).fit()
    assert read_steps(run_dir) == [1, 2, 3, 4, 5, 6]


class FailingDisk:
    """os.replace that fails with `err` for .pt files while `on` is set, as a full or read-only disk would."""

    def __init__(self, monkeypatch, err=errno.ENOSPC):
        self.on, self.err, self.real = False, err, os.replace
        monkeypatch.setattr(os, "replace", self)

    def __call__(self, src, dst):
        if self.on and str(dst).endswith(".pt"):
            raise OSError(self.err, os.strerror(self.err))
        return self.real(src, dst)


def test_failed_saves_are_reported_and_training_goes_on(make_cfg, tmp_path, monkeypatch):
    disk = FailingDisk(monkeypatch)
    logged = []

    def log(msg):
        logged.append(msg)
        disk.on = msg.startswith("step 5:")  # only the save at step 10 fails

    run_dir = tmp_path / "run"
    cfg = make_cfg({"train.max_steps": 20, "train.eval_every": 5, "train.sample_length": 0})
    Trainer(cfg, run_dir, progress=False, log=log).fit()
    warnings = [m for m in logged if m.startswith("warning:")]
    assert len(warnings) == 1 and "step 10" in warnings[0] and "No space left on device" in warnings[0]
    assert "last.pt holds step 5" in warnings[0] and "training goes on" in warnings[0]
    assert checkpoint.load(run_dir / "last.pt")["position"]["step"] == 20
    assert not temp_files(run_dir)


def test_saves_failing_in_a_row_stop_the_run_with_one_line(tmp_path, write_yaml, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_yaml("tiny.yaml", {"train.max_steps": 40, "train.eval_every": 5, "train.sample_length": 0})
    disk = FailingDisk(monkeypatch, errno.EROFS)
    real_save = checkpoint.RunCheckpoints.save

    def then_read_only(*args, **kwargs):  # the disk turns read-only once step 5 is saved
        result = real_save(*args, **kwargs)
        disk.on = True
        return result

    monkeypatch.setattr(checkpoint.RunCheckpoints, "save", then_read_only)
    assert main(["train", "--config", "tiny.yaml", "--no-progress"]) == 1
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("charrnn: error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "step 20" in errors[0] and "3 saves in a row" in errors[0] and "Read-only file system" in errors[0]
    assert err.count("warning: could not save") == 2  # steps 10 and 15
    disk.on = False
    run_dir = tmp_path / "checkpoints" / "tiny"
    assert checkpoint.load(run_dir / "last.pt")["position"]["step"] == 5
    assert checkpoint.load(run_dir / "best.pt")["position"]["step"] == 5
    assert not temp_files(run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["stopped"] == "error"


def test_first_save_failing_stops_at_once(make_cfg, tmp_path, monkeypatch):
    FailingDisk(monkeypatch).on = True
    with pytest.raises(CharrnnError, match="the first save failed"):
        Trainer(make_cfg({"train.max_steps": 20, "train.eval_every": 5}), tmp_path / "run", **QUIET).fit()
    assert not (tmp_path / "run" / "last.pt").exists()


def test_read_only_run_directory_mid_run(make_cfg, tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir(mode=0o555)
    try:
        (probe / "x").touch()
        pytest.skip("directory permissions are not enforced here (root)")
    except PermissionError:
        pass
    run_dir = tmp_path / "run"

    def log(msg):
        if msg.startswith("step 5:"):
            run_dir.chmod(0o555)

    try:
        with pytest.raises(CharrnnError, match="Permission denied"):
            Trainer(make_cfg({"train.max_steps": 40, "train.eval_every": 5, "train.sample_length": 0}), run_dir,
                    progress=False, log=log).fit()
    finally:
        run_dir.chmod(0o755)
    assert checkpoint.load(run_dir / "last.pt")["position"]["step"] == 5
    assert not temp_files(run_dir)


def test_keep_last_step_files(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_cfg({"train.max_steps": 20, "train.eval_every": 10, "train.checkpoint_every": 3,
                    "train.keep_last": 2, "train.sample_length": 0})
    Trainer(cfg, run_dir, **QUIET).fit()
    steps = sorted(p.name for p in run_dir.glob("step-*.pt"))
    assert steps == ["step-00000018.pt", "step-00000020.pt"]
    assert [checkpoint.load(run_dir / n)["position"]["step"] for n in steps] == [18, 20]
    Trainer(make_cfg({"train.max_steps": 20, "train.checkpoint_every": 3, "train.sample_length": 0}),
            tmp_path / "none", **QUIET).fit()  # keep_last 0: last.pt only
    assert not list((tmp_path / "none").glob("step-*.pt"))


def test_crashtest_script_with_3_kills():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "crashtest.py"), "--kills", "3", "--steps", "80"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 kills" in proc.stdout and "OK:" in proc.stdout
