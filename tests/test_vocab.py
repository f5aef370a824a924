"""Vocab: Unicode round trips, deterministic order, narrow id dtypes, UNK folding, errors, and large texts."""

import pytest
import torch

from charrnn.errors import CharrnnError
from charrnn.vocab import CHUNK, UNK, Vocab

UNICODE_TEXT = "Café naïve Ærø — 你好，世界！ Ünïcödé 🎈\nSchön ça?"


def test_unicode_round_trip():
    vocab = Vocab.build(UNICODE_TEXT)
    ids = vocab.encode(UNICODE_TEXT)
    assert ids.ndim == 1 and len(ids) == len(UNICODE_TEXT)
    assert vocab.decode(ids) == UNICODE_TEXT
    assert vocab.decode(ids.tolist()) == UNICODE_TEXT
    assert set(vocab.chars) == set(UNICODE_TEXT)
    assert not vocab.unk


def test_chars_sorted_and_deterministic():
    a = Vocab.build(UNICODE_TEXT)
    b = Vocab.build(UNICODE_TEXT[::-1] + UNICODE_TEXT)
    assert a.chars == sorted(set(UNICODE_TEXT))
    assert a.chars == b.chars
    assert torch.equal(a.encode(UNICODE_TEXT), b.encode(UNICODE_TEXT))


def test_ids_follow_sorted_order():
    vocab = Vocab.build("cab")
    assert vocab.encode("abc").tolist() == [0, 1, 2]


def test_dtype_uint8_up_to_256_chars():
    text = "".join(chr(0x100 + i) for i in range(256))  # code points above 255, ids below 256
    vocab = Vocab.build(text)
    assert len(vocab) == 256
    ids = vocab.encode(text)
    assert ids.dtype == torch.uint8
    assert ids.tolist() == list(range(256))
    assert vocab.decode(ids) == text


def test_dtype_int16_above_256_chars():
    text = "".join(chr(0x4E00 + i) for i in range(300))
    vocab = Vocab.build(text)
    ids = vocab.encode(text)
    assert ids.dtype == torch.int16
    assert ids.tolist() == list(range(300))
    assert vocab.decode(ids) == text


def test_small_vocab_is_uint8():
    assert Vocab.build("hello").encode("hello").dtype == torch.uint8


def test_max_vocab_folds_rare_chars_into_unk():
    text = "a" * 10 + "b" * 8 + "c" * 6 + "x" + "y" + "z"
    vocab = Vocab.build(text, max_vocab=4)
    assert len(vocab) == 4
    assert vocab.unk and UNK in vocab
    assert {"a", "b", "c"} <= set(vocab.chars)
    assert not {"x", "y", "z"} & set(vocab.chars)
    ids = vocab.encode("axyzb")
    assert ids.tolist()[1:4] == [vocab.unk_id] * 3
    assert vocab.decode(ids) == "a" + UNK * 3 + "b"


def test_min_freq_folds_rare_chars_into_unk():
    text = "aaa bbb c d"
    vocab = Vocab.build(text, min_freq=2)
    assert vocab.unk
    assert set(vocab.chars) == {"a", "b", " ", UNK}
    assert vocab.decode(vocab.encode(text)) == "aaa bbb " + UNK + " " + UNK


def test_unk_vocab_encodes_unseen_chars_as_unk():
    vocab = Vocab.build("aaaab", min_freq=2)
    assert vocab.encode("a\u00e9\u4e2d").tolist() == [vocab.index["a"], vocab.unk_id, vocab.unk_id]


def test_no_folding_when_everything_is_kept():
    vocab = Vocab.build("abcabc", max_vocab=10, min_freq=1)
    assert not vocab.unk and UNK not in vocab and vocab.unk_id is None


def test_max_vocab_equal_to_char_count_keeps_every_char():
    text = "aaaabbbcc"
    vocab = Vocab.build(text, max_vocab=3)
    assert vocab.decode(vocab.encode(text)) == text


def test_unknown_chars_raise_naming_them():
    vocab = Vocab.build("hello world")
    with pytest.raises(CharrnnError) as e:
        vocab.encode("hello Zürich")
    listed = str(e.value).rsplit(": ", 1)[1].split()
    assert sorted(listed) == sorted(["Z", "ü", "i", "c"])  # only the characters the vocabulary lacks


def test_unknown_chars_listed_exactly():
    vocab = Vocab.build("abc")
    assert vocab.unknown("abxcy好") == ["x", "y", "好"]
    with pytest.raises(CharrnnError, match="3 character"):
        vocab.encode("abxcy好")


def test_unknown_char_above_every_vocab_code_point():
    vocab = Vocab.build("abc")
    with pytest.raises(CharrnnError, match="🎈"):
        vocab.encode("a🎈")


def test_to_dict_from_dict_round_trip():
    for vocab in (Vocab.build(UNICODE_TEXT), Vocab.build("aaab c", min_freq=2)):
        d = vocab.to_dict()
        again = Vocab.from_dict(d)
        assert again.chars == vocab.chars
        assert again.unk == vocab.unk
        assert again.unk_id == vocab.unk_id
        text = "aaa b" if vocab.unk else UNICODE_TEXT
        assert torch.equal(again.encode(text), vocab.encode(text))


def test_duplicate_chars_rejected():
    with pytest.raises(CharrnnError):
        Vocab(["a", "a"])


def test_large_text_encodes_and_matches_slow_reference():
    base = "The stork flew over Ærø and 你好 — said the queen.\n"
    text = base * (5_000_000 // len(base) + 1)  # ~5 M characters: more than one encoding chunk
    assert len(text) > CHUNK
    vocab = Vocab.build(text)
    ids = vocab.encode(text)
    assert len(ids) == len(text)
    assert ids.dtype == torch.uint8
    for start in (0, CHUNK - 300, len(text) - 600):
        piece = text[start:start + 600]
        slow = [vocab.chars.index(c) for c in piece]
        assert ids[start:start + len(piece)].tolist() == slow
    assert int(ids.max()) == len(vocab) - 1


def test_large_text_with_unk_across_chunks():
    text = ("ab" * (CHUNK // 2)) + "zc" + "ab" * 100
    vocab = Vocab.build(text, min_freq=2)  # z and c are rare
    ids = vocab.encode(text)
    tail = ids[CHUNK:CHUNK + 4].tolist()
    assert tail == [vocab.unk_id, vocab.unk_id, vocab.index["a"], vocab.index["b"]]
