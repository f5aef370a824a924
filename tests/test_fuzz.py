"""Property tests (hypothesis) for the code that meets hostile input first: the vocabulary, the Gutenberg stripper,
the config loader and the batcher. Runs are derandomized and small so CI is repeatable and fast; @example pins the
minimal inputs of bugs found this way, so they stay fixed.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from charrnn import download as dl
from charrnn.config import SECTIONS, RunConfig, load_config
from charrnn.data import Batcher
from charrnn.errors import CharrnnError
from charrnn.vocab import UNK, Vocab


def fuzz(max_examples: int):
    """Repeatable settings: the same examples on every run and machine, no example database written to the tree."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    report_multiple_bugs=False, suppress_health_check=[HealthCheck.too_slow])


# Every code point, lone surrogates included: vocab.py encodes with "surrogatepass", so they must round-trip too.
ANY_CHAR = st.characters(exclude_categories=())
ANY_TEXT = st.text(ANY_CHAR, max_size=200)


# --- vocabulary ------------------------------------------------------------------------------------


@fuzz(200)
@example("")
@example("e\u0301a\u0308 \U0001f600\U00010348 \ud800 \udfff\ud83d\ude00 \x00\ufeff\ufffd")
@example("".join(map(chr, range(0x20, 0x20 + 300))))  # more than 256 characters: int16 ids
@example("".join(map(chr, range(0x20, 0x20 + 40000))))  # more than 32768: int32 ids
@given(ANY_TEXT)
def test_vocab_round_trips_any_unicode(text):
    vocab = Vocab.build(text)
    ids = vocab.encode(text)
    assert vocab.chars == sorted(set(text)) and ids.dtype == vocab.dtype and len(ids) == len(text)
    assert vocab.decode(ids) == text


@fuzz(150)
@given(st.data())
def test_vocab_encodes_text_over_its_alphabet_and_refuses_other_chars(data):
    alphabet = data.draw(st.text(ANY_CHAR, min_size=1, max_size=40), label="alphabet")
    vocab = Vocab.build(alphabet)
    text = data.draw(st.text(st.sampled_from(vocab.chars), max_size=200), label="text")
    assert vocab.decode(vocab.encode(text)) == text
    stranger = data.draw(ANY_CHAR.filter(lambda c: c not in vocab), label="stranger")
    with pytest.raises(CharrnnError, match="outside the vocabulary"):
        vocab.encode(text + stranger)


@fuzz(150)
@given(ANY_TEXT, ANY_TEXT, st.integers(0, 8))
def test_vocab_with_max_vocab_sends_every_other_char_to_unk(train, text, max_vocab):
    vocab = Vocab.build(train, max_vocab=max_vocab)
    assert max_vocab == 0 or len(vocab) <= max_vocab
    if vocab.unk:
        assert vocab.decode(vocab.encode(text)) == "".join(c if c in vocab else UNK for c in text)
    elif all(c in vocab for c in text):
        assert vocab.decode(vocab.encode(text)) == text
    else:
        with pytest.raises(CharrnnError, match="outside the vocabulary"):
            vocab.encode(text)


# --- Gutenberg stripper ----------------------------------------------------------------------------

MARKERS = [
    "*** START OF THE PROJECT GUTENBERG EBOOK X ***",
    "*** END OF THIS PROJECT GUTENBERG EBOOK",
    "*END*THE SMALL PRINT",
    "End of the Project Gutenberg",
    "\r\n",
    "\ufeff",
    "Produced by",
]


def _slice(marker: str):
    return st.tuples(st.integers(0, len(marker)), st.integers(0, len(marker))).map(lambda ij: marker[ij[0]:ij[1]])


PIECE = st.one_of(
    st.sampled_from(MARKERS),
    st.sampled_from(MARKERS).map(str.lower),
    st.sampled_from(MARKERS).flatmap(_slice),
    st.sampled_from(["\n", "\r", "\n\n", " ", "\t", "*", "***", " \n"]),
    st.text(ANY_CHAR, max_size=12),
)
GUTENBERGISH = st.lists(PIECE, max_size=30).map("".join)


def check_strip(text: str) -> None:
    body, found = dl.strip_gutenberg(text)
    assert isinstance(found, bool) and len(body) <= len(text)
    assert "\r" not in body and not body.startswith("\n") and not body.endswith("\n\n")


@fuzz(300)
@given(ANY_TEXT)
def test_strip_arbitrary_text_never_raises_or_grows(text):
    check_strip(text)


@fuzz(400)
@example("\ufeff*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\nProduced by\r\n\r\n\r\nTale\r\n\r\nEnd of the Project Gutenberg")
@example("*END*THE SMALL PRINT\rProduced by\r\r\r*** END OF THIS PROJECT GUTENBERG EBOOK")
@given(GUTENBERGISH)
def test_strip_marker_fragments_never_raise_or_grow(text):
    check_strip(text)


# --- config loader ---------------------------------------------------------------------------------

FIELDS = {section: [f for f in cls.__dataclass_fields__] for section, cls in SECTIONS.items()}
# Plain YAML scalars as a user (or a hostile file) writes them: numbers in every notation, YAML 1.1 keywords,
# timestamps, tags, flow collections, aliases, and random text.
PLAIN_SCALAR = st.one_of(
    st.integers().map(str),
    st.floats().map(repr),
    st.from_regex(r"[-+]?0[xbo][0-9a-f_]{0,3}", fullmatch=True),
    st.from_regex(r"[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}", fullmatch=True),
    st.sampled_from(["~", "null", "yes", "No", "on", ".inf", "-.inf", ".nan", "1e3", "3e-4", "1_000", "1:30",
                     "[]", "{}", "[1, 2]", "{a: 1}", "!!binary aGk=", "!!set {a}", "!!float 1", "&a [*a]", "'x'"]),
    st.text(ANY_CHAR, max_size=10),
)
DOTTED_KEY = st.one_of(
    st.sampled_from(list(FIELDS)).flatmap(lambda section: st.sampled_from(FIELDS[section]).map(f"{section}.{{}}".format)),
    st.text(ANY_CHAR, max_size=10),
)
# Minimal inputs of past bugs, written as (dotted key, plain scalar) for both the file and --set forms.
BAD_HEX = ("train.lr", "0x_")  # PyYAML's int constructor raises ValueError on "0x_" / "0b_"
BAD_DATE = ("data.path", "2001-02-30")  # PyYAML's timestamp constructor raises ValueError on an impossible date
HUGE_INT = ("train.lr", "9" * 400)  # config._coerce: float(int) raises OverflowError


def check_load(path=None, overrides=None) -> None:
    """load_config either returns a RunConfig or raises CharrnnError; any other exception is a bug."""
    try:
        config = load_config(path, overrides)
    except CharrnnError:
        return
    assert isinstance(config, RunConfig)


def yaml_file(key: str, scalar: str) -> str:
    section, _, name = key.partition(".")
    return f"{section}:\n  {name}: {scalar}\n"


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "config.yaml"


@fuzz(200)
@given(text=ANY_TEXT)
def test_config_file_arbitrary_text(config_path, text):
    config_path.write_text(text, encoding="utf-8", errors="surrogatepass")
    check_load(config_path)


@fuzz(200)
@example(items=[BAD_HEX])
@example(items=[BAD_DATE])
@example(items=[HUGE_INT])
@given(items=st.lists(st.tuples(DOTTED_KEY, PLAIN_SCALAR), max_size=6))
def test_config_file_of_yaml_scalars(config_path, items):
    config_path.write_text("".join(yaml_file(key, scalar) for key, scalar in items), encoding="utf-8",
                           errors="surrogatepass")
    check_load(config_path)


def test_config_file_deeply_nested(config_path):
    config_path.write_text("[" * 1000 + "]" * 1000, encoding="utf-8")
    check_load(config_path)


@fuzz(200)
@given(st.lists(ANY_TEXT, max_size=3))
def test_config_set_arbitrary_strings(overrides):
    check_load(None, overrides)


@fuzz(200)
@example(items=[BAD_HEX])
@example(items=[BAD_DATE])
@example(items=[HUGE_INT])
@given(items=st.lists(st.tuples(DOTTED_KEY, PLAIN_SCALAR), max_size=4))
def test_config_set_key_value(items):
    check_load(None, [f"{key}={scalar}" for key, scalar in items])


@fuzz(200)
@example(file_text="\x00", overrides=[])
@example(file_text="", overrides=["a\nb.c=1"])
@given(file_text=ANY_TEXT, overrides=st.lists(ANY_TEXT, max_size=2))
def test_config_errors_are_one_line(config_path, file_text, overrides):
    config_path.write_text(file_text, encoding="utf-8", errors="surrogatepass")
    for path, items in ((config_path, []), (None, overrides)):
        try:
            load_config(path, items)
        except CharrnnError as error:
            assert "\n" not in str(error), str(error)


# --- batcher ---------------------------------------------------------------------------------------


@fuzz(200)
@example(length=0, n_seqs=1, n_steps=1)
@example(length=3, n_seqs=2, n_steps=1)  # exactly n_seqs + 1 characters: one target per stream
@example(length=2, n_seqs=2, n_steps=5)  # one character short
@given(length=st.integers(0, 3000), n_seqs=st.integers(1, 64), n_steps=st.integers(1, 80))
def test_batcher_invariants(length, n_seqs, n_steps):
    ids = torch.arange(length)  # each id is its own position in the stream
    per_stream = (length - 1) // n_seqs
    if per_stream < 1:
        with pytest.raises(CharrnnError, match="too few"):
            Batcher(ids, n_seqs, n_steps)
        return
    batcher = Batcher(ids, n_seqs, n_steps)
    batches = list(batcher)
    assert len(batches) == len(batcher) >= 1
    for x, y in batches:
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape
        assert x.shape[0] == n_seqs and 1 <= x.shape[1] <= n_steps
        assert torch.equal(y, x + 1)  # the target is the next character of the original stream
    xs = torch.cat([x for x, _ in batches], dim=1)
    assert bool((xs[:, 1:] == xs[:, :-1] + 1).all())  # each row goes on where the previous batch left it
    targets = torch.cat([y for _, y in batches], dim=1).flatten()
    assert batcher.chars_per_epoch == n_seqs * per_stream == targets.numel()
    assert torch.equal(targets.sort().values, torch.arange(1, targets.numel() + 1))  # each target exactly once


@fuzz(60)
@given(length=st.integers(9, 600), n_seqs=st.integers(1, 8), n_steps=st.integers(1, 40),
       dtype=st.sampled_from([torch.uint8, torch.int16, torch.int32]))
def test_batcher_widens_narrow_ids(length, n_seqs, n_steps, dtype):
    wide = torch.arange(length) % 200
    narrow, reference = Batcher(wide.to(dtype), n_seqs, n_steps), Batcher(wide, n_seqs, n_steps)
    for (x, y), (x_ref, y_ref) in zip(narrow, reference, strict=True):
        assert x.dtype == torch.int64 and torch.equal(x, x_ref) and torch.equal(y, y_ref)
