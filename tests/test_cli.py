"""The `charrnn` command, called in-process: exit codes, one-line errors, and the files and text it produces."""

import json
import subprocess
import sys

import pytest

from charrnn.cli import main


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("charrnn: error:")]


def test_train_writes_run_dir(in_tmp, write_yaml, capsys):
    write_yaml("tiny.yaml", {"train.max_steps": 6, "train.eval_every": 3})
    assert main(["train", "--config", "tiny.yaml", "--no-progress"]) == 0
    run_dir = in_tmp / "checkpoints" / "tiny"
    for name in ("last.pt", "best.pt", "metrics.jsonl", "config.yaml", "samples.txt"):
        assert (run_dir / name).is_file(), name
    err = capsys.readouterr().err
    assert "resolved config" in err
    assert not error_lines(err)


def test_train_set_overrides_and_resume_auto(in_tmp, write_yaml, capsys):
    write_yaml("tiny.yaml", {"train.max_steps": 4, "train.eval_every": 2, "train.sample_length": 0})
    assert main(["train", "--config", "tiny.yaml", "--no-progress", "--set", "train.max_steps=3"]) == 0
    run_dir = in_tmp / "checkpoints" / "tiny"
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert main(["train", "--config", "tiny.yaml", "--no-progress"]) == 2  # the run exists: no overwrite
    assert "--overwrite" in error_lines(capsys.readouterr().err)[0]
    assert main(["train", "--config", "tiny.yaml", "--no-progress", "--resume", "auto",
                 "--set", "train.max_steps=5"]) == 0
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_sample_same_seed_same_output(in_tmp, trained_ckpt, capsys):
    args = ["sample", "--checkpoint", str(trained_ckpt), "--seed", "7", "--length", "80", "--temperature", "1.0"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    second = capsys.readouterr().out
    assert first == second
    assert first.startswith("The ")  # the default prime is the run's sample.prime
    assert len(first) == 4 + 80 + 1


def test_sample_prime_is_printed(in_tmp, trained_ckpt, capsys):
    assert main(["sample", "--checkpoint", str(trained_ckpt), "--prime", "The ", "--length", "20", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The ") and len(out) == 4 + 20 + 1


def test_sample_num_samples(in_tmp, trained_ckpt, capsys):
    assert main(["sample", "--checkpoint", str(trained_ckpt), "--num-samples", "3", "--length", "30",
                 "--seed", "2", "--prime", "The "]) == 0
    out = capsys.readouterr().out
    assert out.count("=== sample") == 3
    for i in (1, 2, 3):
        assert f"=== sample {i} ===" in out


def test_sample_temperature_zero_is_repeatable(in_tmp, trained_ckpt, capsys):
    args = ["sample", "--checkpoint", str(trained_ckpt), "--temperature", "0", "--length", "50"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0  # no seed: greedy decoding needs none
    assert capsys.readouterr().out == first


def test_sample_prime_outside_vocab(in_tmp, trained_ckpt, capsys):
    assert main(["sample", "--checkpoint", str(trained_ckpt), "--prime", "你好", "--length", "5"]) == 2
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert len(lines) == 1 and "你" in lines[0]
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_sample_missing_checkpoint(in_tmp, capsys):
    assert main(["sample", "--checkpoint", "nope.pt"]) == 1
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "nope.pt" in err


def test_missing_text_file_hint(in_tmp, write_yaml, capsys):
    write_yaml("tiny.yaml", {"data.gutenberg": "andersen"}, text_path="data/andersen.txt")
    assert main(["train", "--config", "tiny.yaml", "--no-progress"]) == 1
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1
    assert "charrnn download --gutenberg andersen" in lines[0]
    assert "Traceback" not in err


def test_unknown_config_key(in_tmp, write_yaml, capsys):
    write_yaml("tiny.yaml")
    assert main(["train", "--config", "tiny.yaml", "--set", "train.lrr=0.1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and "train.lr'" in lines[0]
    assert not (in_tmp / "checkpoints").exists()


def test_bad_yaml_config(in_tmp, capsys):
    (in_tmp / "bad.yaml").write_text("train:\n  lr: [1\n", encoding="utf-8")
    assert main(["train", "--config", "bad.yaml"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "line" in error_lines(err)[0]


def test_train_without_config(in_tmp, capsys):
    assert main(["train"]) == 2
    assert "--config" in error_lines(capsys.readouterr().err)[0]


def test_python_m_help():
    proc = subprocess.run([sys.executable, "-m", "charrnn", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for word in ("train", "sample", "download"):
        assert word in proc.stdout
