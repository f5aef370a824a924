"""Hostile and broken input through the `charrnn` command: each case exits 1 (runtime failure) or 2 (usage or config
error) with one `charrnn: error:` line that names the file or field and the fix, prints no traceback, and leaves the
user's files as they were. docs/errors.md lists the same cases with their messages.

The unit tests of the pieces live beside them (test_checkpoint.py, test_config.py, test_data.py, test_sampling.py);
here every case goes through `charrnn.cli.main` in-process, as a user meets it.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
import time

import pytest
import torch
import yaml

from charrnn import checkpoint, data
from charrnn.cli import main
from conftest import apply_dotted, make_text, tiny_tree
from test_checkpoint import Evil
from test_interrupt import FailingDisk

QUICK = {"train.max_steps": 2, "train.eval_every": 2, "train.sample_length": 0}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fails(capsys, argv: list[str], code: int, *needles: str, alone: bool = False) -> str:
    """Run the command; assert its exit code, exactly one error line holding every needle, and no traceback (with
    `alone`, nothing else on stderr either). Returns the error line."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("charrnn: error:")]
    assert rc == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not alone or err.splitlines() == lines, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def config(path: str = "tiny.yaml", text="text.txt", **overrides) -> str:
    """Write a tiny config over `text` (default: a 4 KB text written as text.txt) to `path`."""
    if text == "text.txt" and not os.path.exists(text):
        with open(text, "w", encoding="utf-8") as f:
            f.write(make_text(4000))
    tree = apply_dotted(tiny_tree(text), {**QUICK, **overrides})
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(tree, f)
    return path


def train(*extra: str) -> list[str]:
    return ["train", "--config", "tiny.yaml", "--no-progress", *extra]


# --- checkpoints: every command that loads one ---------------------------------------------------------------

LOADERS = {
    "sample": ["sample", "--checkpoint", "{ckpt}", "--length", "5"],
    "eval": ["eval", "--checkpoint", "{ckpt}", "--split", "val"],
    "info": ["info", "--checkpoint", "{ckpt}"],
    "export": ["export", "--checkpoint", "{ckpt}", "--output", "out.ts"],
    "export-safetensors": ["export", "--checkpoint", "{ckpt}", "--format", "safetensors"],
    "train-resume": ["train", "--resume", "{ckpt}", "--no-progress"],
    "train-resume-auto": ["train", "--config", "tiny.yaml", "--resume", "auto", "--no-progress"],
    "train-init-from": ["train", "--config", "tiny.yaml", "--init-from", "{ckpt}", "--no-progress"],
}
CKPT = "checkpoints/tiny/last.pt"  # where --resume auto looks for tiny.yaml's run


def evil_pickles(marker) -> dict[str, bytes]:
    """Files whose unpickling would create `marker`: in a charrnn-looking dict, as the whole file, in torch's legacy
    format, and as a bare pickle."""
    def saved(obj, **kw) -> bytes:
        path = marker.with_name("evil.tmp")
        torch.save(obj, path, **kw)
        return path.read_bytes()

    return {"in-dict": saved({"format": checkpoint.FORMAT, "format_version": 1, "payload": Evil(marker)}),
            "whole-file": saved(Evil(marker)),
            "legacy-format": saved(Evil(marker), _use_new_zipfile_serialization=False),
            "bare-pickle": pickle.dumps(Evil(marker), protocol=4)}


def test_evil_pickles_are_live(tmp_path):
    """The control: an unsafe load of each payload does create the marker, so the refusals below mean something."""
    marker = tmp_path / "MARKER"
    for name, content in evil_pickles(marker).items():
        (tmp_path / "e.pt").write_bytes(content)
        try:
            torch.load(tmp_path / "e.pt", weights_only=False)
        except Exception:  # the bare pickle fails torch's magic-number check, after running the payload
            pass
        assert marker.exists(), name
        marker.unlink()


@pytest.mark.parametrize("loader", LOADERS)
def test_malicious_pickle_is_never_run(in_tmp, capsys, loader):
    config()
    marker = in_tmp / "MARKER"
    os.makedirs("checkpoints/tiny")
    for name, content in evil_pickles(marker).items():
        with open(CKPT, "wb") as f:
            f.write(content)
        argv = [a.format(ckpt=CKPT) for a in LOADERS[loader]]
        fails(capsys, argv, 1, CKPT, "refused", "not plain data", "only load checkpoints written by charrnn",
              alone=True)
        assert not marker.exists(), name
        assert open(CKPT, "rb").read() == content  # the file is left as it was
    assert sorted(os.listdir("checkpoints/tiny")) == ["last.pt"] and not os.path.exists("out.ts")


def test_malicious_best_pt_on_resume_is_not_run(in_tmp, capsys, trained_run):
    """Resuming reads best.pt's val loss too: a planted best.pt is refused (with a warning) and replaced."""
    run = in_tmp / "run"
    run.mkdir()
    for name in ("last.pt", "config.yaml", "metrics.jsonl"):
        (run / name).write_bytes((trained_run / name).read_bytes())
    marker = in_tmp / "MARKER"
    (run / "best.pt").write_bytes(evil_pickles(marker)["in-dict"])
    assert main(["train", "--resume", "run/last.pt", "--set", "train.max_steps=21", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert not marker.exists() and "best.pt is unreadable" in err and "refused" in err
    assert checkpoint.load(run / "best.pt")["position"]["step"] == 21


def _bad_files(trained: bytes) -> dict[str, tuple[bytes, str]]:
    def saved(obj) -> bytes:
        torch.save(obj, "x.tmp")
        with open("x.tmp", "rb") as f:
            return f.read()

    return {
        "foreign-torch-file": (saved({"weights": torch.zeros(2)}), "is not a charrnn checkpoint"),
        "truncated": (trained[: len(trained) // 2], "corrupt or truncated"),
        "text-file": (b"train:\n  lr: 0.1\n", "corrupt or truncated"),
        "empty": (b"", "corrupt or truncated"),
        "newer-format": (saved({"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION + 1}),
                         "newer than this charrnn reads (1): upgrade charrnn"),
    }


@pytest.mark.parametrize("loader", LOADERS)
def test_broken_checkpoints(in_tmp, capsys, trained_ckpt, loader):
    config()
    os.makedirs("checkpoints/tiny")
    for name, (content, message) in _bad_files(trained_ckpt.read_bytes()).items():
        with open(CKPT, "wb") as f:
            f.write(content)
        fails(capsys, [a.format(ckpt=CKPT) for a in LOADERS[loader]], 1, CKPT, message, alone=True)
        assert open(CKPT, "rb").read() == content, name


@pytest.mark.parametrize("loader", ["sample", "eval", "info", "export", "train-resume", "train-init-from"])
def test_missing_checkpoint(in_tmp, capsys, loader):
    config()
    fails(capsys, [a.format(ckpt="nope.pt") for a in LOADERS[loader]], 1, "checkpoint nope.pt not found",
          "written by `charrnn train`", alone=True)


def test_broken_safetensors(in_tmp, capsys, trained_best):
    st = pytest.importorskip("safetensors.torch")
    assert main(["export", "--checkpoint", str(trained_best), "--format", "safetensors", "--output", "m.safetensors"]
                ) == 0
    good = open("m.safetensors", "rb").read()
    st.save_file({"w": torch.zeros(2)}, "foreign.safetensors", metadata={"format": "pt"})
    cases = {"m.safetensors": (good[: len(good) // 2], "corrupt or truncated"),
             "foreign.safetensors": (None, "is not a charrnn checkpoint")}
    for path, (content, message) in cases.items():
        if content is not None:
            open(path, "wb").write(content)
        for argv in (["sample", "--checkpoint", path], ["info", "--checkpoint", path]):
            fails(capsys, argv, 1, path, message, alone=True)


def test_safetensors_cannot_resume(in_tmp, capsys, trained_best):
    pytest.importorskip("safetensors")
    assert main(["export", "--checkpoint", str(trained_best), "--format", "safetensors", "--output", "m.safetensors"]
                ) == 0
    fails(capsys, ["train", "--resume", "m.safetensors"], 2, "no training state", "last.pt", "--init-from")


# --- the training text -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, code, needles", [
    (None, 1, ["text file missing.txt not found", "point data.path at a text file"]),
    (b"", 1, ["text file text.txt is empty", "point data.path"]),
    (b" \n\t\r\n  \n", 1, ["text file text.txt holds only whitespace (7 characters)", "point data.path"]),
    (bytes(range(256)) * 40, 1, ["text file text.txt looks binary, not text (a NUL byte at offset 0): use a plain "
                                 "text file (or, if it is UTF-16 text, set data.encoding=utf-16)"]),
    (b"\x01\x02\x03\x04abc" * 2000, 1, ["text file text.txt looks binary, not text (4,682 of its first 8,192 bytes "
                                      "are control characters): use a plain text file"]),
    (make_text(9000).encode() + b"\x00" + make_text(100).encode(), 1,
     ["text file text.txt holds a NUL character (character 9", "plain text file"]),
    (make_text(500).encode("utf-16"), 1, ["text file text.txt is UTF-16 text", "set data.encoding=utf-16"]),
    (b"plain ascii line\n" * 10 + "caf\xe9\n".encode("latin-1"), 1,
     ["text file text.txt is not valid utf-8 (byte 173)", "set data.encoding", "--set data.encoding=latin-1"]),
], ids=["missing", "empty", "whitespace", "binary-nul", "binary-control", "nul-after-head", "utf16", "latin1"])
def test_bad_text_file(in_tmp, capsys, content, code, needles):
    if content is None:
        config(text="missing.txt")
    else:
        open("text.txt", "wb").write(content)
        config()
    fails(capsys, train(), code, *needles)
    assert content is None or open("text.txt", "rb").read() == content
    assert not os.path.exists("checkpoints")


def test_text_is_a_directory(in_tmp, capsys):
    os.mkdir("corpus")
    config(text="corpus")
    fails(capsys, train(), 1, "text file corpus is a directory", "point data.path at a text file")


def test_unreadable_text(in_tmp, capsys, monkeypatch):
    config()

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(data, "open", denied, raising=False)  # the reader's open(): chmod 000 does not bind root
    fails(capsys, train(), 1, "text file text.txt could not be read (Permission denied)", "check its permissions")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads a chmod 000 file")
def test_unreadable_text_chmod(in_tmp, capsys):
    config()
    os.chmod("text.txt", 0)
    try:
        fails(capsys, train(), 1, "text file text.txt could not be read (Permission denied)")
    finally:
        os.chmod("text.txt", 0o644)


@pytest.mark.parametrize("text, encoding", [(make_text(2000), "utf-16"), ("caf\xe9 au lait\n" * 100, "latin-1")])
def test_wrong_encodings_train_once_set(in_tmp, capsys, text, encoding):
    """The fixes the messages above suggest do work."""
    open("text.txt", "wb").write(text.encode(encoding))
    config()
    assert main(train("--set", f"data.encoding={encoding}")) == 0
    assert checkpoint.load(CKPT)["vocab"]["chars"] == "".join(sorted(set(text)))
    capsys.readouterr()


def test_unknown_encoding_name(in_tmp, capsys):
    config()
    fails(capsys, train("--set", "data.encoding=klingon"), 2, "config data.encoding must be a text encoding",
          "utf-8", "'klingon'")


def test_text_shorter_than_one_batch(in_tmp, capsys):
    """Refused with the characters one batch needs and a batch shape that fits, which then trains."""
    open("text.txt", "w").write(make_text(1)[:45])  # 41 training characters after val_fraction 0.1
    config()
    line = fails(capsys, train(), 1, "text file text.txt is too short: 41 training characters after "
                 "data.val_fraction 0.1", "4 x 16 needs 65", "--set train.n_steps=10")
    assert main(train("--set", line.rsplit("--set ", 1)[1])) == 0
    open("text.txt", "w").write("abcd")
    config()
    fails(capsys, train("--overwrite"), 1, "4 training characters", "--set train.n_seqs=1 --set train.n_steps=3")


def test_mixed_line_endings_and_bom_train(in_tmp, capsys):
    text = make_text(3000)
    mixed = "".join(line + ("\r\n", "\r", "\n")[i % 3] for i, line in enumerate(text.splitlines()))
    open("text.txt", "wb").write(("\ufeff" + mixed).encode("utf-8"))
    config()
    assert main(train()) == 0
    assert checkpoint.load(CKPT)["vocab"]["chars"] == "".join(sorted(set(text)))  # no "\r", no BOM
    capsys.readouterr()


def test_eval_of_a_binary_file(in_tmp, capsys, trained_ckpt):
    open("blob.bin", "wb").write(trained_ckpt.read_bytes())
    fails(capsys, ["eval", "--checkpoint", str(trained_ckpt), "--text", "blob.bin"], 1,
          "text file blob.bin looks binary", "a NUL byte at offset")


# --- config ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, needles", [
    (["--set", "train.lrr=1"], ["unknown config key 'train.lrr' in --set", "did you mean 'train.lr'?"]),
    (["--set", "train.n_seqs=many"], ["config train.n_seqs must be int (got 'many')"]),
    (["--set", "train.lr=-0.1"], ["config train.lr must be a positive number (got -0.1)"]),
    (["--set", "model.dropout=1"], ["config model.dropout must be in [0, 1) (got 1.0)"]),
    (["--set", "model.num_layers=0"], ["config model.num_layers must be >= 1 (got 0)"]),
    (["--set", "model.hidden_size=0"], ["config model.hidden_size must be >= 1 (got 0)"]),
    (["--set", "train.lr"], ["--set 'train.lr' needs the form section.key=value"]),
    (["--set", "lr=0.1"], ["--set 'lr=0.1': the key must be section.key"]),
], ids=["unknown-key", "wrong-type", "negative-lr", "dropout-1", "zero-layers", "hidden-0", "set-without-eq",
        "set-without-section"])
def test_bad_config_values(in_tmp, capsys, extra, needles):
    config()
    fails(capsys, train(*extra), 2, *needles, alone=True)


@pytest.mark.parametrize("content, needles", [
    ("model:\n  hiden_size: 8\n", ["unknown config key 'model.hiden_size' in bad.yaml", "did you mean "
                                   "'model.hidden_size'?"]),
    ("train:\n  lr: [0.1\n  n_seqs: 2\n", ["config file bad.yaml is not valid YAML at line 3, column 9"]),
    ("train:\n\tlr: 0.1\n", ["config file bad.yaml is not valid YAML at line 2, column 1"]),
    ("- 1\n- 2\n", ["bad.yaml must be a mapping of sections"]),
], ids=["unknown-key", "unclosed-bracket", "tab", "list"])
def test_bad_config_file(in_tmp, capsys, content, needles):
    open("bad.yaml", "w").write(content)
    fails(capsys, ["train", "--config", "bad.yaml"], 2, *needles, alone=True)


def test_missing_config_file(in_tmp, capsys):
    fails(capsys, ["train", "--config", "nope.yaml"], 2, "config file nope.yaml not found", alone=True)


# --- sample -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, needles", [
    (["--temperature", "-1"], ["--temperature must be >= 0 (0: greedy) (got -1.0)"]),
    (["--temperature", "hot"], ["--temperature 'hot' must be a number"]),
    (["--top-k", "-1"], ["--top-k must be >= 0 (0: all characters) (got -1)"]),
    (["--top-p", "0"], ["--top-p must be in (0, 1] (1: all characters) (got 0.0)"]),
    (["--top-p", "1.5"], ["--top-p must be in (0, 1] (1: all characters) (got 1.5)"]),
    (["--length", "-1"], ["--length must be >= 0 (got -1)"]),
    (["--prime", "Zj\u20ac"], ["--prime has 3 character(s) the model's vocabulary lacks: Z j \u20ac"]),
], ids=["temperature-negative", "temperature-text", "top-k-negative", "top-p-0", "top-p-above-1", "length-negative",
        "prime-unknown"])
def test_bad_sample_options(in_tmp, capsys, trained_ckpt, extra, needles):
    fails(capsys, ["sample", "--checkpoint", str(trained_ckpt), *extra], 2, *needles, alone=True)
    assert os.listdir(".") == []


def test_top_k_above_vocab_is_clamped_with_a_note(in_tmp, capsys, trained_ckpt):
    base = ["sample", "--checkpoint", str(trained_ckpt), "--length", "60", "--seed", "3", "--format", "jsonl"]
    assert main(base + ["--top-k", "0"]) == 0
    all_chars = json.loads(capsys.readouterr().out)
    assert main(base + ["--top-k", "1000"]) == 0
    out, err = capsys.readouterr()
    vocab = len(checkpoint.load(trained_ckpt)["vocab"]["chars"])
    assert err == f"note: --top-k 1000 is more than the model's {vocab} characters: sampling among all of them\n"
    clamped = json.loads(out)
    assert clamped["text"] == all_chars["text"] and clamped["settings"]["top_k"] == vocab


# --- device -----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(in_tmp, capsys, trained_ckpt):
    config()
    fails(capsys, train("--device", "cuda"), 2, "--device cuda: no CUDA device is available", "--device cpu")
    fails(capsys, ["sample", "--checkpoint", str(trained_ckpt), "--device", "cuda"], 2,
          "--device cuda: no CUDA device is available", "--device cpu", alone=True)
    assert not os.path.exists("checkpoints")


@pytest.mark.skipif(getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
                    reason="this machine has MPS")
def test_mps_off_a_mac(in_tmp, capsys, trained_ckpt):
    config()
    fails(capsys, train("--device", "mps"), 2, "--device mps: Apple's MPS backend is not available here",
          "--device cpu")
    fails(capsys, ["sample", "--checkpoint", str(trained_ckpt), "--device", "mps"], 2,
          "--device mps: Apple's MPS backend is not available here", alone=True)


def test_unknown_device(in_tmp, capsys, trained_ckpt):
    config()
    fails(capsys, train("--device", "tpu"), 2, "config train.device must be auto, cpu, cuda, cuda:N or mps")
    fails(capsys, ["sample", "--checkpoint", str(trained_ckpt), "--device", "tpu"], 2,
          "--device 'tpu' is not a device", alone=True)


# --- output -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("err", [errno.EROFS, errno.ENOSPC], ids=["read-only", "disk-full"])
def test_checkpoint_cannot_be_written(in_tmp, capsys, monkeypatch, err):
    config()
    FailingDisk(monkeypatch, err).on = True
    fails(capsys, train("--set", "train.max_steps=4"), 1,
          f"could not save the checkpoint of step 2 to {CKPT} ({os.strerror(err)})",
          "the first save failed, so training stops", "free disk space or fix the directory's permissions")
    assert not [p for p in os.listdir("checkpoints/tiny") if p.endswith(".pt") or ".tmp-" in p]


def test_run_dir_cannot_be_created(in_tmp, capsys):
    config()
    open("taken", "w").write("a file, not a directory")
    fails(capsys, train("--run-dir", "taken/run"), 1, "cannot write to run directory taken/run",
          "check its permissions and free space, or pass --run-dir")
    assert open("taken").read() == "a file, not a directory"


def test_run_dir_holding_another_run(in_tmp, capsys):
    config()
    assert main(train()) == 0
    before = {p: open(f"checkpoints/tiny/{p}", "rb").read() for p in os.listdir("checkpoints/tiny")}
    fails(capsys, train(), 2, "run directory checkpoints/tiny already holds a run", "--resume auto", "--overwrite",
          "--run-dir")
    config(**{"model.hidden_size": 32})  # a different run's config in the same place
    fails(capsys, train("--resume", "auto"), 2, "config model.hidden_size=32 contradicts the checkpoint (16)",
          alone=True)
    assert {p: open(f"checkpoints/tiny/{p}", "rb").read() for p in os.listdir("checkpoints/tiny")} == before


def test_sample_output_exists(in_tmp, capsys, trained_ckpt):
    open("out.txt", "w").write("mine")
    fails(capsys, ["sample", "--checkpoint", str(trained_ckpt), "--output", "out.txt"], 2,
          "--output out.txt already exists: pass --force", alone=True)
    assert open("out.txt").read() == "mine"


# --- a very large text --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CHARRNN_SLOW") != "1", reason="writes 1 GB of text: set CHARRNN_SLOW=1")
def test_1gb_text_trains_in_bounded_memory(tmp_path):
    """1 GiB of text (CRLF line endings) trains 2 steps in a child process whose peak RSS stays near one byte per
    character: the text is streamed, never held as a Python string."""
    path = tmp_path / "big.txt"
    text = make_text(1 << 20)  # whole lines, a little over 1 MiB once written with CRLF
    block = text.replace("\n", "\r\n").encode("utf-8")
    with open(path, "wb") as f:
        for _ in range(1024):
            f.write(block)
    chars = 1024 * len(text)
    tree = apply_dotted(tiny_tree(path), {**QUICK, "data.val_fraction": 1e-4})
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(tree), encoding="utf-8")
    code = ("import resource, sys; from charrnn.cli import main; rc = main(sys.argv[1:]); "
            "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, "train", "--config", str(tmp_path / "big.yaml"), "--run-dir",
                           str(tmp_path / "run"), "--no-progress"], capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = int(proc.stderr.rsplit("peak_rss_kb", 1)[1].split()[0]) * 1024
    report = f"1 GiB text ({chars:,} characters): 2 steps in {wall:.0f} s, peak RSS {peak / 2**20:,.0f} MiB"
    print(report)
    n_train = chars - int(chars * 1e-4)
    assert f"train {(n_train - 1) // 4 * 4:,} chars" in proc.stderr  # every character read, CRLF as one
    assert peak < chars + (768 << 20), report  # the ids (1 byte each) and torch; a str copy alone is 1 GiB more
