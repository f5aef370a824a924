#!/usr/bin/env python
"""Crash test: SIGKILL a training run at random moments, resume it each time with `--resume auto`, then check that
nothing was lost or corrupted.

Each kill lands during start-up (loading, cleaning up after the last crash), as soon as a checkpoint's temp file
appears (inside an atomic write), or after a random number of steps plus a random delay (inside a step, an
evaluation or a save). At the end the run must have finished
(summary.json says budget, last.pt holds max_steps), metrics.jsonl must hold every log point exactly once in order,
every checkpoint must load, no temp file may remain, and the losses and final weights must equal those of the same
run trained without interruption.

    python scripts/crashtest.py              # 20 kills
    python scripts/crashtest.py --kills 3 --steps 120
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml

from charrnn import checkpoint
from charrnn.config import load_config
from charrnn.train import Trainer

SENTENCES = [
    "The little fir tree stood in the forest, and the sun shone on it.\n",
    "Once upon a time there was a stork who lived on the roof of a house.\n",
    "The snow queen came over the lake, and the children ran home to supper.\n",
    "She sang a song of the sea, and the old king listened by the fire.\n",
]
LOG_EVERY, EVAL_EVERY, CHECKPOINT_EVERY, KEEP_LAST = 3, 40, 7, 3
SESSION_TIMEOUT = 120  # seconds a session may take before the test gives up on it


def write_config(root: Path, steps: int) -> Path:
    text = root / "text.txt"
    text.write_text("".join(SENTENCES[i % 4] for i in range(300)), encoding="utf-8")
    tree = {"data": {"path": str(text), "val_fraction": 0.1},
            "model": {"cell": "lstm", "embed_size": 16, "hidden_size": 32, "num_layers": 2, "dropout": 0.2},
            "train": {"n_seqs": 8, "n_steps": 32, "lr": 1e-2, "warmup_steps": 5, "max_steps": steps,
                      "max_epochs": 0, "eval_every": EVAL_EVERY, "log_every": LOG_EVERY,
                      "checkpoint_every": CHECKPOINT_EVERY, "keep_last": KEEP_LAST, "sample_length": 20,
                      "seed": 3, "device": "cpu"}}
    path = root / "crash.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


class Session:
    """One `charrnn train` process; `started` is set once training begins (the "model:" line on stderr)."""

    all: list[Session] = []

    def __init__(self, config: Path, run_dir: Path, resume: bool):
        Session.all.append(self)
        cmd = [sys.executable, "-m", "charrnn", "train", "--config", str(config), "--run-dir", str(run_dir),
               "--no-progress"] + (["--resume", "auto"] if resume else [])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.started = threading.Event()
        self.err: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.err.append(line)
            if line.startswith("model: "):  # the log line, not the config YAML's "model:" section
                self.started.set()

    def wait(self) -> int:
        rc = self.proc.wait(SESSION_TIMEOUT)
        time.sleep(0.05)  # let the reader thread drain stderr
        return rc


def last_logged_step(run_dir: Path) -> int:
    try:
        with open(run_dir / "metrics.jsonl", "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 400))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def saved_step(run_dir: Path) -> int:
    return checkpoint.load(run_dir / "last.pt")["position"]["step"] if (run_dir / "last.pt").exists() else 0


def kill_loop(config: Path, run_dir: Path, kills: int, steps: int, rng: random.Random) -> dict:
    """Start, kill, resume `kills` times; returns counts of where the kills landed."""
    landed = {"startup": 0, "write": 0, "training": 0}
    startup_s = 3.0  # refined from the first session
    for k in range(kills):
        start = saved_step(run_dir)
        t0 = time.monotonic()
        s = Session(config, run_dir, resume=k > 0)
        mode = rng.random()
        if mode < 0.2:
            time.sleep(rng.uniform(0, startup_s))
            where = "startup" if not s.started.is_set() else "training"
        elif mode < 0.45 and s.started.wait(SESSION_TIMEOUT):  # aim for the inside of a checkpoint write
            deadline = time.monotonic() + 10
            while not (temps := [n for n in os.listdir(run_dir) if checkpoint.TEMP_FILE.fullmatch(n)]) and \
                    time.monotonic() < deadline and s.proc.poll() is None:
                pass
            where = f"write {temps[0] if temps else '(none seen)'}"
        else:
            if not s.started.wait(SESSION_TIMEOUT):
                raise SystemExit(f"session {k + 1} never started:\n{''.join(s.err)}")
            startup_s = time.monotonic() - t0
            target = start + rng.randint(1, max(1, 2 * (steps - start) // (kills - k + 1)))
            target = min(target, steps - 20)  # leave room: the session must still be running when killed
            while last_logged_step(run_dir) < target and s.proc.poll() is None:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.03))
            where = "training"
        if s.proc.poll() is not None:
            raise SystemExit(f"session {k + 1} ended before its kill (rc {s.proc.returncode}):\n{''.join(s.err)}")
        s.proc.send_signal(signal.SIGKILL)
        s.wait()
        landed[where.split()[0]] += 1
        print(f"kill {k + 1:2d}/{kills}: {where:34s} resumed at step {start:4d}, killed near step "
              f"{last_logged_step(run_dir):4d}; last.pt now holds step {saved_step(run_dir)}", flush=True)
    return landed


def run_to_end(config: Path, run_dir: Path, resume: bool) -> None:
    """The last session, left to finish."""
    s = Session(config, run_dir, resume=resume)
    rc = s.wait()
    if rc != 0:
        raise SystemExit(f"the run in {run_dir} failed (rc {rc}):\n{''.join(s.err)}")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def verify(run_dir: Path, reference: Path, steps: int) -> list[str]:
    """Everything a crash could have broken; returns the failures (empty: all good)."""
    bad = []
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    if summary["stopped"] != "budget" or summary["steps"] != steps:
        bad.append(f"summary.json: {summary}")
    got = metrics(run_dir)
    expected = sorted(set(range(LOG_EVERY, steps + 1, LOG_EVERY)) | set(range(EVAL_EVERY, steps + 1, EVAL_EVERY))
                      | {steps})
    if [r["step"] for r in got] != expected:
        bad.append(f"metrics.jsonl steps {[r['step'] for r in got]} != the log points {expected}")
    evals = [r["step"] for r in got if "val_loss" in r]
    if evals != sorted(set(range(EVAL_EVERY, steps + 1, EVAL_EVERY)) | {steps}):
        bad.append(f"evaluations at {evals}")
    ref = metrics(reference)
    keys = ("step", "train_loss", "grad_norm", "lr", "val_loss")
    diff = [r["step"] for r, q in zip(got, ref) if [r.get(k) for k in keys] != [q.get(k) for k in keys]]
    if diff or len(got) != len(ref):
        bad.append(f"losses differ from the uninterrupted run at steps {diff[:10]}")
    pts = sorted(run_dir.glob("*.pt"))
    for p in pts:
        try:
            ckpt = checkpoint.load(p)
        except Exception as e:  # any failure to load is the finding
            bad.append(f"{p.name} does not load: {e}")
            continue
        m = checkpoint.STEP_FILE.fullmatch(p.name)
        if m and int(m.group(1)) != ckpt["position"]["step"]:
            bad.append(f"{p.name} holds step {ckpt['position']['step']}")
    step_files = [p.name for p in pts if checkpoint.STEP_FILE.fullmatch(p.name)]
    if len(step_files) != KEEP_LAST:
        bad.append(f"step files {step_files}, expected the newest {KEEP_LAST}")
    last = checkpoint.load(run_dir / "last.pt")
    if last["position"]["step"] != steps:
        bad.append(f"last.pt holds step {last['position']['step']}")
    ref_last = checkpoint.load(reference / "last.pt")
    if any(not torch.equal(last["model"][n], ref_last["model"][n]) for n in ref_last["model"]):
        bad.append("final weights differ from the uninterrupted run")
    best = checkpoint.load(run_dir / "best.pt")["metrics"]["val_loss"]
    if abs(best - min(r["val_loss"] for r in got if "val_loss" in r)) > 1e-4:
        bad.append(f"best.pt holds val loss {best}, not the best one logged")
    temps = [p.name for p in run_dir.iterdir() if checkpoint.TEMP_FILE.fullmatch(p.name)]
    if temps:
        bad.append(f"temp files left: {temps}")
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs to deliver (default 20)")
    ap.add_argument("--steps", type=int, default=400, help="the run's max_steps (default 400)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temp dir, removed)")
    args = ap.parse_args()
    if args.kills < 0 or args.steps < 40:
        ap.error("need --kills >= 0 and --steps >= 40")
    root = Path(args.keep or tempfile.mkdtemp(prefix="charrnn-crashtest-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        config = write_config(root, args.steps)
        run_dir, reference = root / "run", root / "reference"
        for d in (run_dir, reference):
            shutil.rmtree(d, ignore_errors=True)
        landed = kill_loop(config, run_dir, args.kills, args.steps, random.Random(args.seed))
        run_to_end(config, run_dir, resume=args.kills > 0)
        Trainer(load_config(config), reference, progress=False, log=lambda msg: None).fit()  # no start-up to pay
        bad = verify(run_dir, reference, args.steps)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    cleanups = sum(any(line.startswith("removed") for line in s.err) for s in Session.all)
    print(f"{args.kills} kills ({landed['startup']} in start-up, {landed['write']} aimed at a checkpoint write, "
          f"{landed['training']} while training; {cleanups} left a temp file, removed by the next start), "
          f"{args.steps} steps, {time.monotonic() - t0:.0f}s")
    for line in bad:
        print(f"FAIL: {line}")
    if not bad:
        print("OK: every resume succeeded; all steps accounted for, every checkpoint loads, no temp files, "
              "losses and weights identical to the uninterrupted run")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
