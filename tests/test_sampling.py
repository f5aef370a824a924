"""Sampling controls: top-k / top-p / greedy equivalences, the repetition penalty, stop strings, log-probabilities,
beam search, Unicode primes, and the `charrnn sample` options built on them."""

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from charrnn.cli import main
from charrnn.config import build_config
from charrnn.errors import UsageError
from charrnn.model import CharRNN, ModelArgs, beam_search, draw, penalize, pick_next, recent_window
from charrnn.sample import Sampler
from charrnn.train import Trainer
from conftest import apply_dotted, make_text, tiny_tree


@pytest.fixture(scope="module")
def sampler(trained_ckpt):
    return Sampler.from_checkpoint(trained_ckpt, "cpu")


@pytest.fixture(scope="module")
def unicode_sampler(tmp_path_factory):
    """A tiny model whose vocabulary holds accented and Chinese characters."""
    root = tmp_path_factory.mktemp("unicode")
    text = root / "text.txt"
    text.write_text(make_text(2000) + "Zürich, café, 你好世界。\n" * 20, encoding="utf-8")
    cfg = build_config(apply_dotted(tiny_tree(text), {"train.max_steps": 4, "train.sample_length": 0}))
    Trainer(cfg, root / "run", progress=False, log=lambda msg: None).fit()
    return Sampler.from_checkpoint(root / "run" / "last.pt", "cpu")


def test_draw_follows_the_distribution_and_never_picks_zero():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0]).repeat(40000, 1)
    ids = draw(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=5).double() / len(ids)
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, probs[0].double(), atol=0.01)
    unnormalised = draw(torch.tensor([[0.0, 3.0, 1.0]]).repeat(20000, 1), torch.Generator().manual_seed(1))
    assert abs((unnormalised == 1).double().mean().item() - 0.75) < 0.01 and (unnormalised != 0).all()


def test_top_k_one_equals_greedy(sampler):
    greedy = sampler.generate("The s", 60, temperature=0.0, num_samples=2)
    assert sampler.generate("The s", 60, temperature=1.3, top_k=1, num_samples=2, seed=5) == greedy


def test_top_p_one_equals_plain_sampling(sampler):
    plain = sampler.generate("The ", 80, temperature=1.2, num_samples=3, seed=11)
    assert sampler.generate("The ", 80, temperature=1.2, top_p=1.0, num_samples=3, seed=11) == plain
    assert sampler.generate("The ", 80, temperature=1.2, top_p=0.5, num_samples=3, seed=11) != plain


def test_tiny_top_p_equals_greedy(sampler):
    greedy = sampler.generate("Once ", 60, temperature=0.0, num_samples=2)
    assert sampler.generate("Once ", 60, temperature=1.5, top_p=1e-6, num_samples=2, seed=2) == greedy


def test_pick_next_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(pick_next(logits, 1.0, 0, gen, top_p=0.5).tolist()) == {0}  # 0.5 alone reaches 0.5
    assert set(pick_next(logits, 1.0, 0, gen, top_p=0.7).tolist()) == {0, 1}
    assert set(pick_next(logits, 1.0, 0, gen, top_p=0.9).tolist()) == {0, 1, 2}
    assert set(pick_next(logits, 1.0, 0, gen, top_p=1.0).tolist()) == {0, 1, 2, 3}


def test_penalize_and_window():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5]])
    recent = recent_window(torch.tensor([[1, 0]]), 4)  # empty slots hold id 4
    assert recent.shape[1] == 32 and recent[0, -2:].tolist() == [1, 0] and (recent[0, :-2] == 4).all()
    assert penalize(logits, recent, 2.0).tolist() == [[1.0, -2.0, 3.0, 0.5]]


def test_repetition_penalty_changes_greedy_text(sampler):
    plain = sampler.generate("The ", 120, temperature=0.0)[0]
    penalized = sampler.generate("The ", 120, temperature=0.0, repetition_penalty=3.0)[0]
    assert penalized != plain and set(penalized) <= set(sampler.vocab.chars)


def test_every_character_is_in_the_vocabulary(sampler):
    vocab = set(sampler.vocab.chars)
    for kwargs in ({"top_k": 5}, {"top_p": 0.8}, {"repetition_penalty": 1.5}, {"top_k": 3, "top_p": 0.9}):
        for text in sampler.generate("The ", 150, temperature=1.5, num_samples=3, seed=4, **kwargs):
            assert set(text) <= vocab


@pytest.mark.parametrize("stop", [".", "e ", "\n"])
def test_stop_cuts_at_the_first_occurrence(sampler, stop):
    full = sampler.generate("The ", 200, temperature=1.0, num_samples=4, seed=9)
    cut = sampler.samples("The ", 200, temperature=1.0, num_samples=4, seed=9, stop=stop)
    assert any(s.stopped for s in cut)
    for whole, s in zip(full, cut):
        at = whole.find(stop)
        assert s.stopped == (at >= 0)
        assert s.text == (whole[:at + len(stop)] if at >= 0 else whole)  # the stop string is kept


def test_stop_refuses_empty_and_unknown(sampler):
    with pytest.raises(UsageError, match="--stop"):
        sampler.generate("The ", 10, stop="")
    with pytest.raises(UsageError, match="你"):
        sampler.generate("The ", 10, stop=["s", "你"])


@pytest.mark.parametrize("length, stop", [(40, None), (150, None), (150, "e")])
def test_mean_logprob_matches_scoring_the_text(sampler, length, stop):
    """The per-character log-probability gathered while sampling (scored in chunks of steps, the characters after
    a stop left out) equals scoring prime + text in one pass."""
    samples = sampler.samples("The ", length, temperature=0.9, top_k=4, num_samples=3, seed=6, stop=stop or ())
    assert stop is None or any(s.stopped for s in samples)
    for s in samples:
        ids = sampler.vocab.encode(s.prime + s.text).long().unsqueeze(0)
        with torch.no_grad():
            logits, _ = sampler.model(ids[:, :-1])
        logp = F.log_softmax(logits.double(), -1)[0, 3:].gather(1, ids[0, 4:, None]).mean()
        assert s.mean_logprob == pytest.approx(float(logp), abs=1e-4)


def test_unicode_prime(unicode_sampler):
    texts = unicode_sampler.generate("Zürich 你好", 30, temperature=1.0, num_samples=2, seed=1)
    assert len(texts) == 2 and all(len(t) == 30 for t in texts)
    with pytest.raises(UsageError) as e:
        unicode_sampler.generate("Straße 你们", 5)
    assert "ß" in str(e.value) and "们" in str(e.value) and "你" not in str(e.value)


def _exhaustive_best(model, prime, length, vocab_size):
    best, best_score = None, -float("inf")
    for seq in itertools.product(range(vocab_size), repeat=length):
        ids = torch.tensor([prime + list(seq)])
        with torch.no_grad():
            logits, _ = model(ids[:, :-1])
        score = F.log_softmax(logits.double(), -1)[0, len(prime) - 1:].gather(1, ids[0, len(prime):, None]).sum()
        if score > best_score:
            best, best_score = list(seq), float(score)
    return best, best_score


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_beam_search_finds_the_likeliest_continuation(cell):
    torch.manual_seed(3)
    model = CharRNN(ModelArgs(vocab_size=4, cell=cell, embed_size=4, hidden_size=8, num_layers=2)).eval()
    prime = [1, 2]
    best, score = _exhaustive_best(model, prime, 3, 4)
    found = beam_search(model, torch.tensor([prime]), 3, beam=16)  # 16 = every 2-character prefix: exact
    assert found.ids[0].tolist() == best
    assert float(found.logprob[0]) == pytest.approx(score, abs=1e-6)


def test_beam_one_is_greedy_and_beam_refuses_sampling_options(sampler):
    assert sampler.generate("The ", 50, beam=1) == sampler.generate("The ", 50, temperature=0.0)
    with pytest.raises(UsageError, match="--temperature"):
        sampler.generate("The ", 10, temperature=0.5, beam=3)
    with pytest.raises(UsageError, match="--num-samples"):
        sampler.generate("The ", 10, num_samples=2, beam=3)


@pytest.mark.parametrize("kwargs, flag", [({"top_p": 0.0}, "--top-p"), ({"top_p": 1.5}, "--top-p"),
                                          ({"repetition_penalty": 0.5}, "--repetition-penalty"),
                                          ({"temperature": float("nan")}, "--temperature"),
                                          ({"beam": -1}, "--beam")])
def test_bad_settings(sampler, kwargs, flag):
    with pytest.raises(UsageError, match=flag):
        sampler.generate("The ", 5, **kwargs)


# --- the command ------------------------------------------------------------------------------------------------


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["sample", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_batched_samples_repeat_with_the_seed(in_tmp, trained_ckpt, capsys):
    args = ("--checkpoint", trained_ckpt, "--num-samples", 4, "--seed", 3, "--length", 60, "--prime", "The ")
    code, first, _ = run(capsys, *args)
    assert code == 0 and first.count("=== sample") == 4
    assert run(capsys, *args)[1] == first
    bodies = first.split("=== sample")[1:]
    assert len(set(bodies)) > 1


def test_stop_with_escapes_and_jsonl(in_tmp, trained_ckpt, capsys):
    code, out, _ = run(capsys, "--checkpoint", trained_ckpt, "--num-samples", 3, "--seed", 1, "--length", 300,
                       "--stop", r"\n", "--format", "jsonl", "--top-p", "0.95")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert set(row) == {"prime", "text", "settings", "mean_logprob", "stopped"}
        assert row["settings"]["stop"] == ["\n"] and row["settings"]["top_p"] == 0.95
        assert row["text"].count("\n") == int(row["stopped"]) and row["text"].endswith("\n") == row["stopped"]
        assert row["mean_logprob"] < 0


def test_temperature_sheet(in_tmp, trained_ckpt, capsys):
    code, out, _ = run(capsys, "--checkpoint", trained_ckpt, "--temperature", "0,0.5,1.0", "--length", 30,
                       "--seed", 2, "--prime", "The ")
    assert code == 0
    assert [line for line in out.splitlines() if line.startswith("===")] == \
        ["=== temperature 0 ===", "=== temperature 0.5 ===", "=== temperature 1 ==="]
    greedy = run(capsys, "--checkpoint", trained_ckpt, "--temperature", "0", "--length", 30, "--prime", "The ")[1]
    assert out.split("\n=== temperature 0.5")[0] == "=== temperature 0 ===\n" + greedy.rstrip("\n")


def test_output_file_refuses_to_overwrite(in_tmp, trained_ckpt, capsys):
    args = ("--checkpoint", trained_ckpt, "--length", 20, "--seed", 1, "--output", "out.txt")
    assert run(capsys, *args)[:2] == (0, "")
    text = (in_tmp / "out.txt").read_text(encoding="utf-8")
    assert len(text) == len("The ") + 20 + 1
    code, _, err = run(capsys, *args)
    assert code == 2 and "--force" in err
    assert run(capsys, *args, "--force", "--seed", 2)[0] == 0
    assert (in_tmp / "out.txt").read_text(encoding="utf-8") != text


def test_prime_file(in_tmp, trained_ckpt, capsys):
    (in_tmp / "prime.txt").write_text("\ufeffOnce upon", encoding="utf-8")
    code, out, _ = run(capsys, "--checkpoint", trained_ckpt, "--prime-file", "prime.txt", "--length", 10)
    assert code == 0 and out.startswith("Once upon") and len(out) == 9 + 10 + 1
    code, _, err = run(capsys, "--checkpoint", trained_ckpt, "--prime-file", "missing.txt")
    assert code == 1 and "missing.txt" in err


@pytest.mark.parametrize("args, word", [(["--temperature", "hot"], "--temperature"),
                                        (["--novel"], "--lines"),
                                        (["--beam", "3", "--top-k", "2"], "--top-k"),
                                        (["--stop", "\\"], "escape")])
def test_bad_sample_options(in_tmp, trained_ckpt, capsys, args, word):
    code, out, err = run(capsys, "--checkpoint", trained_ckpt, "--length", 5, *args)
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("charrnn: error:")]
    assert len(lines) == 1 and word in lines[0]
