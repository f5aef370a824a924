"""Data: reading texts, the contiguous train/val split, and (B, T) batches whose streams continue."""

import pytest
import torch

from charrnn import data
from charrnn.config import DataConfig
from charrnn.data import Batcher, Corpus, iter_text, read_text, split_ids
from charrnn.errors import CharrnnError
from charrnn.train import Trainer
from charrnn.vocab import Vocab


@pytest.mark.parametrize("n, B, T", [(101, 4, 5), (200, 3, 7), (50, 1, 10), (64, 8, 4)])
def test_batch_shapes_and_shift(n, B, T):
    ids = torch.arange(n)
    b = Batcher(ids, B, T)
    L = (n - 1) // B
    assert len(b) == -(-L // T)
    seen = 0
    for i, (x, y) in enumerate(b):
        assert x.dtype == torch.int64 and y.dtype == torch.int64
        assert x.shape == y.shape
        assert x.shape[0] == B
        assert x.shape[1] == (T if i < len(b) - 1 else L - T * (len(b) - 1))
        assert torch.equal(y, x + 1)  # ids are positions: the target is the next character of the stream
        seen += x.numel()
    assert seen == b.chars_per_epoch == B * L


def test_streams_continue_across_batches():
    ids = torch.arange(1000) * 7 % 1009  # distinct, non-monotonic ids
    pos = {int(v): i for i, v in enumerate(ids)}
    b = Batcher(ids, 5, 6)
    batches = list(b)
    for i in range(len(batches) - 1):
        x0, x1 = batches[i][0], batches[i + 1][0]
        for row in range(5):
            assert pos[int(x1[row, 0])] == pos[int(x0[row, -1])] + 1
            # within a batch a row is contiguous too
            assert [pos[int(v)] for v in x0[row]] == list(range(pos[int(x0[row, 0])], pos[int(x0[row, 0])] + 6))


def test_targets_are_the_original_stream_shifted():
    ids = torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(0))
    b = Batcher(ids, 4, 9)
    L = (len(ids) - 1) // 4
    xs = torch.cat([x for x, _ in b], dim=1)
    ys = torch.cat([y for _, y in b], dim=1)
    for row in range(4):
        assert torch.equal(xs[row], ids[row * L:(row + 1) * L])
        assert torch.equal(ys[row], ids[row * L + 1:(row + 1) * L + 1])


def test_docstring_example_layout():
    b = Batcher(torch.arange(13), 2, 3)
    (x0, y0), (x1, y1) = list(b)
    assert x0.tolist() == [[0, 1, 2], [6, 7, 8]]
    assert y1.tolist() == [[4, 5, 6], [10, 11, 12]]


def test_last_partial_batch():
    b = Batcher(torch.arange(23), 2, 4)  # 11 characters per stream: batches of 4, 4, 3
    shapes = [tuple(x.shape) for x, _ in b]
    assert shapes == [(2, 4), (2, 4), (2, 3)]
    x, y = b.batch(2)
    assert x.tolist() == [[8, 9, 10], [19, 20, 21]]
    assert y.tolist() == [[9, 10, 11], [20, 21, 22]]


def test_narrow_ids_are_widened():
    b = Batcher(torch.arange(40, dtype=torch.uint8), 2, 5)
    x, y = b.batch(0)
    assert x.dtype == torch.int64 and y.dtype == torch.int64


def test_too_few_chars_for_streams():
    with pytest.raises(CharrnnError, match="n_seqs"):
        Batcher(torch.arange(4), 8, 2)


def test_split_is_contiguous():
    ids = torch.arange(1000)
    train, val = split_ids(ids, 0.1)
    assert len(val) == 100
    assert torch.equal(torch.cat([train, val]), ids)
    assert torch.equal(val, ids[-100:])


def test_split_without_validation():
    ids = torch.arange(10)
    train, val = split_ids(ids, 0.0)
    assert torch.equal(train, ids) and len(val) == 0


@pytest.mark.parametrize("n_seqs, n_steps", [(2, 4), (4, 16), (7, 3)])
def test_val_split_independent_of_batch_shape(make_cfg, tmp_path, text_file, n_seqs, n_steps):
    cfg = make_cfg({"train.n_seqs": n_seqs, "train.n_steps": n_steps, "data.val_fraction": 0.2})
    trainer = Trainer(cfg, tmp_path / f"run{n_seqs}", progress=False, log=lambda m: None)
    ids = trainer.vocab.encode(read_text(text_file))
    n_val = int(len(ids) * 0.2)
    # the validation stream starts at the same character whatever the batch shape, and training data never reach it
    assert int(trainer.val_data.x[0, 0]) == int(ids[len(ids) - n_val])
    assert torch.equal(trainer.val_data.x[0, :10], ids[len(ids) - n_val:len(ids) - n_val + 10].long())
    assert trainer.train_data.chars_per_epoch <= len(ids) - n_val - 1


def test_read_text_strips_bom_and_normalizes_newlines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffone\r\ntwo\rthree\nfour\r\n".encode("utf-8"))
    assert read_text(path) == "one\ntwo\nthree\nfour\n"


def test_read_text_keeps_unicode(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Ærø 你好\n", encoding="utf-8")
    assert read_text(path) == "Ærø 你好\n"


def test_read_text_other_encoding(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("café\n".encode("latin-1"))
    assert read_text(path, encoding="latin-1") == "café\n"


def test_missing_file_with_download_hint(tmp_path):
    with pytest.raises(CharrnnError) as e:
        read_text(tmp_path / "data" / "andersen.txt", download_hint="andersen")
    assert "charrnn download --gutenberg andersen" in str(e.value)
    assert "andersen.txt" in str(e.value)


def test_missing_file_without_hint(tmp_path):
    with pytest.raises(CharrnnError, match="not found"):
        read_text(tmp_path / "nope.txt")


def test_directory_is_an_error(tmp_path):
    with pytest.raises(CharrnnError, match="directory"):
        read_text(tmp_path)


def test_non_utf8_file_mentions_data_encoding(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(CharrnnError) as e:
        read_text(path)
    assert "data.encoding" in str(e.value)
    assert not isinstance(e.value, UnicodeDecodeError)


def test_unknown_encoding_name(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abc", encoding="utf-8")
    with pytest.raises(CharrnnError, match="encoding"):
        read_text(path, encoding="no-such-codec")


# --- reading in chunks: the same text whatever the chunk size --------------------------------------------------

MESSY = "\ufeffAb\r\ncd\re\u00e9\r\n\r\n\u4f60\U0001f600\r\rx\r\ny\r"  # BOM, CRLF, CR, 2-4 byte characters


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 1 << 20])
def test_chunked_reading_matches_whole_file(tmp_path, monkeypatch, chunk):
    path = tmp_path / "t.txt"
    path.write_bytes(MESSY.encode("utf-8"))
    monkeypatch.setattr(data, "CHUNK_BYTES", chunk)
    chunks = list(iter_text(path))
    assert "".join(chunks) == "Ab\ncd\ne\u00e9\n\n\u4f60\U0001f600\n\nx\ny\n"
    assert len(chunks) > 1 or chunk > 100


@pytest.mark.parametrize("chunk", [1, 2, 4, 1 << 20])
def test_corpus_streams_the_same_ids(tmp_path, monkeypatch, chunk):
    path = tmp_path / "t.txt"
    path.write_bytes(("head 1\r\nhead 2\r\n" + MESSY * 3).encode("utf-8"))
    expected = read_text(path).split("\n", 2)[2]
    monkeypatch.setattr(data, "CHUNK_BYTES", chunk)
    corpus = Corpus(DataConfig(path=str(path), skip_lines=2))
    vocab = Vocab.from_counts(corpus.counts)
    assert corpus.text is None and corpus.length == len(expected) and vocab.chars == Vocab.build(expected).chars
    ids = corpus.encode(vocab)
    assert ids.dtype == torch.uint8 and torch.equal(ids, vocab.encode(expected))


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
def test_decode_error_names_the_byte_across_chunks(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(data, "CHUNK_BYTES", chunk)
    path = tmp_path / "t.txt"
    for content, byte in ((b"ab\xc3\xa9cd\xffgh", 6), (b"ab\xc3\xa9cd\xc3", 6)):  # a bad byte; a torn last char
        path.write_bytes(content)
        with pytest.raises(CharrnnError, match=f"not valid utf-8 \\(byte {byte}\\)"):
            read_text(path)


def test_nul_in_a_wide_encoding(tmp_path):
    """UTF-16 text is full of NUL bytes and reads fine; a NUL character in it is refused."""
    ok, bad = tmp_path / "ok.txt", tmp_path / "bad.txt"
    ok.write_bytes("abc".encode("utf-16"))
    bad.write_bytes("ab\x00c".encode("utf-16"))
    assert read_text(ok, "utf-16") == "abc"
    with pytest.raises(CharrnnError, match=r"holds a NUL character \(character 2\)"):
        read_text(bad, "utf-16")


def test_text_changed_between_the_passes(tmp_path):
    path = tmp_path / "t.txt"
    for after in ("abcdefgh" * 10, "abc"):
        path.write_text("abcdefgh" * 5, encoding="utf-8")
        corpus = Corpus(DataConfig(path=str(path)))
        path.write_text(after, encoding="utf-8")
        with pytest.raises(CharrnnError, match="changed while it was read"):
            corpus.encode(Vocab.from_counts(corpus.counts))
