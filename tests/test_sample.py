"""Sampling from a checkpoint: determinism, batch shape, vocabulary, prime validation, greedy decoding."""

import pytest

from charrnn.errors import UsageError
from charrnn.sample import Sampler


@pytest.fixture(scope="module")
def sampler(trained_ckpt):
    return Sampler.from_checkpoint(trained_ckpt, "cpu")


def test_same_seed_same_text(sampler):
    a = sampler.generate("The ", 60, temperature=1.0, seed=7)
    b = sampler.generate("The ", 60, temperature=1.0, seed=7)
    assert a == b
    others = {sampler.generate("The ", 60, temperature=1.0, seed=s)[0] for s in range(8, 12)}
    assert len(others | {a[0]}) > 1  # the seed matters


def test_temperature_zero_is_deterministic(sampler):
    a = sampler.generate("The ", 40, temperature=0.0)
    b = sampler.generate("The ", 40, temperature=0.0, seed=123)
    assert a == b


def test_num_samples_and_length(sampler):
    texts = sampler.generate("The ", 25, temperature=1.0, num_samples=4, seed=1)
    assert isinstance(texts, list) and len(texts) == 4
    assert all(isinstance(t, str) and len(t) == 25 for t in texts)


def test_samples_use_only_vocab_chars(sampler):
    texts = sampler.generate("Once ", 200, temperature=1.5, num_samples=3, seed=3)
    vocab = set(sampler.vocab.chars)
    for t in texts:
        assert set(t) <= vocab


def test_top_k_one_equals_greedy(sampler):
    greedy = sampler.generate("The s", 50, temperature=0.0, num_samples=2)
    top1 = sampler.generate("The s", 50, temperature=0.9, top_k=1, num_samples=2, seed=5)
    assert top1 == greedy


def test_batch_of_greedy_samples_are_identical(sampler):
    texts = sampler.generate("The ", 30, temperature=0.0, num_samples=3)
    assert texts[0] == texts[1] == texts[2]


def test_prime_with_unknown_chars(sampler):
    with pytest.raises(UsageError) as e:
        sampler.generate("Zürich 你", 10, seed=1)
    msg = str(e.value)
    for ch in ("Z", "ü", "你"):
        assert ch in msg
    assert "--prime" in msg


def test_default_prime_and_zero_length(sampler):
    assert sampler.default_prime() == "The "  # the run's sample.prime (see conftest)
    assert sampler.generate(None, 0, seed=1) == [""]
    assert len(sampler.generate("", 5, seed=1)[0]) == 5


def test_stream_receives_prime_then_first_sample(sampler):
    pieces = []
    texts = sampler.generate("The ", 20, temperature=0.7, seed=4, num_samples=2, stream=pieces.append)
    assert pieces[0] == "The "
    assert "".join(pieces[1:]) == texts[0]


@pytest.mark.parametrize("kwargs, word", [({"length": -1}, "--length"), ({"temperature": -0.5}, "--temperature"),
                                          ({"top_k": -1}, "--top-k"), ({"num_samples": 0}, "--num-samples")])
def test_bad_arguments(sampler, kwargs, word):
    args = {"prime": "The ", "length": 5, **kwargs}
    with pytest.raises(UsageError, match=word):
        sampler.generate(**args)
