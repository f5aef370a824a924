"""Lines mode (names): the boundary layout, header and blank lines, the hashed training items in the checkpoint, and
`charrnn sample --lines N --novel --unique`."""

import hashlib

import pytest
import torch

from charrnn.cli import main
from charrnn.config import build_config
from charrnn.data import BOUNDARY, hash_items, item_hash, line_items, read_corpus
from charrnn.errors import UsageError
from charrnn.sample import Sampler
from charrnn.train import Trainer
from conftest import apply_dotted, tiny_tree

NAMES = ["emma", "olivia", "ava", "isabella", "sophia", "mia", "amelia", "harper", "evelyn", "abigail", "emily",
         "ella", "elizabeth", "camila", "luna", "sofia", "avery", "mila", "aria", "scarlett", "penelope", "layla"]


def names_tree(path, **overrides):
    return apply_dotted(tiny_tree(path), {"data.mode": "lines", "sample.prime": "\n", "train.sample_length": 0,
                                          **overrides})


@pytest.fixture(scope="module")
def names_run(tmp_path_factory):
    """A tiny lines-mode run over a names file written with a BOM, CRLF, a 2-line header and blank lines."""
    root = tmp_path_factory.mktemp("names")
    path = root / "names.txt"
    body = "\r\n".join(["By@header", "2020.12.13", ""] + [n for n in NAMES * 12] + ["", "  "])
    path.write_bytes(("\ufeff" + body).encode("utf-8"))
    cfg = build_config(names_tree(path, **{"data.skip_lines": 2, "model.hidden_size": 32, "train.max_steps": 60,
                                           "train.eval_every": 30, "train.lr": 2e-2}))
    Trainer(cfg, root / "run", progress=False, log=lambda msg: None).fit()
    return root / "run"


def test_lines_layout(tmp_path):
    path = tmp_path / "n.txt"
    path.write_bytes("\ufeffHEADER\r\nemma\r\n\r\n  olivia \r\nava".encode("utf-8"))  # no final newline
    data = build_config(names_tree(path, **{"data.skip_lines": 1})).data
    text = read_corpus(data)
    assert text.startswith(BOUNDARY) and text.endswith(BOUNDARY)
    assert sorted(text.strip("\n").split("\n")) == ["ava", "emma", "olivia"]  # header and blank lines gone
    assert "\n\n" not in text
    assert read_corpus(data) == text  # the shuffle is the same every time
    assert line_items(text) == text.strip("\n").split("\n")


def test_text_mode_skip_lines_keeps_the_rest(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("header\nsecond\nbody line\n\nmore\n", encoding="utf-8")
    data = build_config(apply_dotted(tiny_tree(path), {"data.skip_lines": 2})).data
    assert read_corpus(data) == "body line\n\nmore\n"


def test_item_hashes_are_stable_blake2b():
    digest = hashlib.blake2b("emma".encode(), digest_size=8).digest()
    assert item_hash("emma") == int.from_bytes(digest, "little", signed=True)
    hashes = hash_items(["b", "a", "b", "你好"])
    assert hashes.dtype == torch.int64 and len(hashes) == 3
    assert hashes.tolist() == sorted(hashes.tolist())


@pytest.mark.parametrize("key, value", [("data.mode", "words"), ("data.skip_lines", -1)])
def test_bad_data_config(tmp_path, key, value):
    with pytest.raises(UsageError, match=key):
        build_config(apply_dotted(tiny_tree(tmp_path / "x.txt"), {key: value}))


def test_checkpoint_keeps_the_hashed_items(names_run):
    ckpt = torch.load(names_run / "best.pt", weights_only=True)  # plain data
    known = ckpt["known_items"]
    assert known.dtype == torch.int64 and known.tolist() == sorted(item_hash(n) for n in set(NAMES))
    assert ckpt["vocab"]["chars"][0] == "\n"


def test_lines_are_complete_novel_and_unique(names_run):
    sampler = Sampler.from_checkpoint(names_run / "best.pt", "cpu")
    vocab = set(sampler.vocab.chars) - {"\n"}
    every = sampler.lines(300, temperature=1.0, seed=1)
    assert every.generated == 300 and 0 < every.complete == len(every.items) <= 300
    items = [s.prime + s.text for s in every.items]
    assert all(item and set(item) <= vocab for item in items)
    assert every.novel == sum(item not in NAMES for item in items)
    assert every.unique == len(set(items))
    assert 0 < every.novel < every.complete  # a tiny model both copies and invents
    kept = sampler.lines(300, temperature=1.0, seed=1, novel=True, unique=True)
    kept_items = [s.prime + s.text for s in kept.items]
    assert (kept.generated, kept.complete, kept.novel, kept.unique) == \
           (every.generated, every.complete, every.novel, every.unique)
    assert len(kept_items) == len(set(kept_items)) and not set(kept_items) & set(NAMES)
    assert set(kept_items) == set(items) - set(NAMES)


def test_lines_with_a_prime_share_their_start(names_run):
    result = Sampler.from_checkpoint(names_run / "best.pt", "cpu").lines(50, prime="em", seed=2)
    assert result.items and all((s.prime + s.text).startswith("em") for s in result.items)


def test_lines_cli_prints_items_and_summary(names_run, capsys):
    code = main(["sample", "--checkpoint", str(names_run / "best.pt"), "--lines", "200", "--novel", "--unique",
                 "--seed", "3", "--temperature", "1.5"])
    out, err = capsys.readouterr()
    assert code == 0
    lines = out.splitlines()
    assert lines and len(lines) == len(set(lines)) and not set(lines) & set(NAMES)
    assert all(line.isalpha() for line in lines)
    summary = [line for line in err.splitlines() if line.startswith("lines:")]
    assert len(summary) == 1 and summary[0].startswith("lines: 200 generated,")
    assert summary[0].endswith(f"; {len(lines)} kept")


def test_lines_needs_a_lines_checkpoint(trained_ckpt, names_run, capsys):
    assert main(["sample", "--checkpoint", str(trained_ckpt), "--lines", "5"]) == 2
    assert "data.mode: lines" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(names_run / "best.pt"), "--lines", "5", "--num-samples", "2"]) == 2
    assert "--num-samples" in capsys.readouterr().err


def test_real_names_list_layout():
    """configs/names.yaml and configs/chinese-names.yaml read the shared lists as items (skipped without them)."""
    from pathlib import Path

    from charrnn.config import load_config

    root = Path(__file__).resolve().parent.parent
    for name, first_items in (("names", {"emma", "olivia"}), ("chinese-names", {"阿八哈", "阿巴雅"})):
        cfg = load_config(root / "configs" / f"{name}.yaml")
        path = root / cfg.data.path
        if not path.exists():
            pytest.skip(f"{path} is absent")
        items = set(line_items(read_corpus(cfg.data, path)))
        assert first_items <= items
        assert not {"By@萌名NameMoe", "2020.12.13", ""} & items
        assert len(hash_items(items)) == len(items)  # no two items share a hash
