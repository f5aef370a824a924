"""`charrnn eval` and `.evaluate`: the val split reproduces the trainer's val loss, whole files are scored, and
characters outside the vocabulary are counted, not a crash."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from charrnn.cli import main
from charrnn.config import build_config
from charrnn.evaluate import evaluate_split, evaluate_text
from charrnn.sample import Sampler
from charrnn.train import Trainer
from conftest import apply_dotted, make_text, tiny_tree


@pytest.fixture(scope="module")
def sampler(trained_ckpt):
    return Sampler.from_checkpoint(trained_ckpt, "cpu")


def test_split_val_matches_the_trainers_val_loss(sampler, trained_ckpt):
    recorded = torch.load(trained_ckpt, weights_only=True)["metrics"]["val_loss"]
    m = evaluate_split(sampler.model, sampler.vocab, sampler.config, sampler.device)
    assert m["loss"] == pytest.approx(recorded, abs=1e-5)
    assert m["bpc"] == pytest.approx(m["loss"] / math.log(2))
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))


def test_whole_text_equals_a_direct_computation(sampler):
    """One stream (n_seqs=1) over a text is plain next-character cross-entropy from a zero state."""
    text = make_text(600)
    cfg = build_config(apply_dotted(sampler.config.to_dict(), {"train.n_seqs": 1, "train.n_steps": 50}))
    m = evaluate_text(sampler.model, sampler.vocab, text, cfg, sampler.device)
    ids = sampler.vocab.encode(text).long().unsqueeze(0)
    with torch.no_grad():
        logits, _ = sampler.model(ids[:, :-1])
    direct = F.cross_entropy(logits[0], ids[0, 1:]).item()
    assert m["chars"] == len(text) - 1 and m["loss"] == pytest.approx(direct, abs=1e-5)


def test_out_of_vocabulary_characters_are_counted_and_skipped(sampler):
    text = make_text(800)
    plain = sampler.evaluate(text)
    noisy = sampler.evaluate(text[:300] + "Zü你好" + text[300:] + "ß")
    assert noisy["oov"] == 5 and sorted(noisy["oov_chars"]) == sorted("Zü你好ß")
    assert plain["oov"] == 0
    assert noisy["loss"] == pytest.approx(plain["loss"], abs=1e-6)  # skipped: the rest scores as before


def test_unk_vocabulary_scores_unknown_characters(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(make_text(3000) + "xxx", encoding="utf-8")  # x: rarer than min_freq
    cfg = build_config(apply_dotted(tiny_tree(path), {"data.min_freq": 4, "train.max_steps": 2,
                                                      "train.sample_length": 0}))
    Trainer(cfg, tmp_path / "run", progress=False, log=lambda msg: None).fit()
    s = Sampler.from_checkpoint(tmp_path / "run" / "last.pt", "cpu")
    assert s.vocab.unk
    m = s.evaluate(make_text(500)[:500] + "你")
    assert m["oov"] == 1 and m["chars"] == 500  # 4 streams over 501 characters; skipping it would leave 496


def test_eval_cli(trained_ckpt, trained_run, capsys):
    assert main(["eval", "--checkpoint", str(trained_ckpt), "--split", "val", "--no-progress"]) == 0
    out = capsys.readouterr().out
    loss = float(re.search(r"loss ([\d.]+) nats/char", out).group(1))
    trainer = float(re.search(r"the trainer's val loss for this checkpoint: ([\d.]+)", out).group(1))
    assert abs(loss - trainer) < 0.01 and "bits/char" in out and "perplexity" in out
    text = trained_run.parent / "other.txt"
    text.write_text("The snow queen, Zoë.\n" * 20, encoding="utf-8")
    assert main(["eval", "--checkpoint", str(trained_ckpt), "--text", str(text)]) == 0
    captured = capsys.readouterr()
    assert "40 character(s) outside the vocabulary (Z ë) were skipped" in captured.out
    assert "eval" in captured.err  # the progress bar


@pytest.mark.parametrize("args, code, word", [([], 2, "--text"), (["--text", "nope.txt"], 1, "nope.txt")])
def test_eval_cli_errors(trained_ckpt, capsys, args, code, word):
    assert main(["eval", "--checkpoint", str(trained_ckpt), *args]) == code
    err = capsys.readouterr().err
    assert word in err and "Traceback" not in err


def test_andersen_checkpoint_matches_its_val_loss():
    """The acceptance check on a real run, when one is at /tmp/acc (skipped otherwise; it takes a few seconds)."""
    from pathlib import Path

    ckpt = Path("/tmp/acc/checkpoints/andersen/best.pt")
    if not ckpt.exists() or not Path("/tmp/acc/data/andersen.txt").exists():
        pytest.skip("no Andersen run at /tmp/acc")
    s = Sampler.from_checkpoint(ckpt, "cpu")
    cfg = build_config(apply_dotted(s.config.to_dict(), {"data.path": "/tmp/acc/data/andersen.txt"}))
    recorded = torch.load(ckpt, weights_only=True)["metrics"]["val_loss"]
    assert evaluate_split(s.model, s.vocab, cfg, s.device)["loss"] == pytest.approx(recorded, abs=0.01)
