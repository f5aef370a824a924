"""Checkpoints: save/load round trips, safe loading, atomic writes, and clear errors for bad files."""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from charrnn import checkpoint
from charrnn.errors import CharrnnError
from charrnn.model import CharRNN, ModelArgs
from charrnn.vocab import Vocab

class Evil:
    """Unpickling this would create a file: loading must refuse it without running it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def tiny_ckpt(seed: int = 0) -> tuple[dict, CharRNN, torch.optim.Optimizer, Vocab]:
    torch.manual_seed(seed)
    vocab = Vocab.build("hello world, the quick brown fox")
    model = CharRNN(ModelArgs(vocab_size=len(vocab), cell="lstm", embed_size=8, hidden_size=16, num_layers=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = batch(vocab)
    for _ in range(3):  # give the optimizer some state
        loss = F.cross_entropy(model(x)[0].reshape(-1, len(vocab)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = {"model_args": model.args.to_dict(), "model": model.state_dict(), "vocab": vocab.to_dict(),
            "optimizer": opt.state_dict(), "config": {}, "hidden": [torch.zeros(1, 2, 16)]}
    return ckpt, model, opt, vocab


def batch(vocab: Vocab):
    ids = vocab.encode("the quick brown fox, hello world").long()
    return ids[:-1].view(1, -1), ids[1:].view(1, -1)


def step_loss(model, opt, x, y) -> tuple[float, float]:
    """Loss before and after one optimizer step on (x, y)."""
    model.train()
    loss = F.cross_entropy(model(x)[0].reshape(-1, model.args.vocab_size), y.reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = F.cross_entropy(model(x)[0].reshape(-1, model.args.vocab_size), y.reshape(-1))
    return loss.item(), after.item()


def test_round_trip_identical_weights_and_next_step(tmp_path):
    ckpt, model, opt, vocab = tiny_ckpt()
    path = checkpoint.save(ckpt, tmp_path / "c.pt")
    loaded = checkpoint.load(path)
    model2, vocab2 = checkpoint.restore_model(loaded)
    assert vocab2.chars == vocab.chars
    assert not model2.training
    sd1, sd2 = model.state_dict(), model2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(loaded["optimizer"])
    x, y = batch(vocab)
    assert step_loss(model, opt, x, y) == step_loss(model2, opt2, x, y)


def test_loaded_tensors_are_on_cpu(tmp_path):
    ckpt, *_ = tiny_ckpt()
    loaded = checkpoint.load(checkpoint.save(ckpt, tmp_path / "c.pt"))

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v)

    found = list(tensors(loaded))
    assert found
    assert all(t.device.type == "cpu" for t in found)


def test_saved_file_is_marked(tmp_path):
    loaded = checkpoint.load(checkpoint.save({"x": 1}, tmp_path / "c.pt"))
    assert loaded["format"] == checkpoint.FORMAT
    assert loaded["format_version"] == checkpoint.FORMAT_VERSION
    assert loaded["x"] == 1


def test_trainer_checkpoint_loads_and_restores(trained_ckpt):
    """A file written by the Trainer passes the weights_only loader (regression: torch.__version__ used to be
    stored as a TorchVersion object, which weights_only refuses)."""
    ckpt = checkpoint.load(trained_ckpt)
    assert isinstance(ckpt["torch_version"], str)
    model, vocab = checkpoint.restore_model(ckpt)
    assert model.args.vocab_size == len(vocab)
    assert set(ckpt) >= {"model", "model_args", "vocab", "config", "optimizer", "position", "rng"}


def test_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "format_version": 1, "payload": Evil(marker)}, path)
    with pytest.raises(CharrnnError) as e:
        checkpoint.load(path)
    assert "refused" in str(e.value) or "not plain data" in str(e.value)
    assert not marker.exists()


def test_atomic_save_leaves_no_temp_files(tmp_path):
    ckpt, *_ = tiny_ckpt()
    checkpoint.save(ckpt, tmp_path / "run" / "last.pt")
    checkpoint.save(ckpt, tmp_path / "run" / "last.pt")  # overwrite
    assert sorted(os.listdir(tmp_path / "run")) == ["last.pt"]


def test_failed_save_keeps_old_file_and_no_temp(tmp_path):
    path = checkpoint.save({"v": 1}, tmp_path / "last.pt")
    with pytest.raises(Exception):
        checkpoint.save({"v": 2, "bad": lambda: None}, path)  # a lambda cannot be pickled
    assert os.listdir(tmp_path) == ["last.pt"]
    assert checkpoint.load(path)["v"] == 1


def test_truncated_file(tmp_path):
    ckpt, *_ = tiny_ckpt()
    path = checkpoint.save(ckpt, tmp_path / "c.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CharrnnError, match="corrupt or truncated"):
        checkpoint.load(path)


def test_empty_file(tmp_path):
    path = tmp_path / "c.pt"
    path.write_bytes(b"")
    with pytest.raises(CharrnnError):
        checkpoint.load(path)


@pytest.mark.parametrize("content", [b"train:\n  lr: 1\n", b"hello"], ids=["yaml", "hello"])
def test_text_file_as_checkpoint(tmp_path, content):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(CharrnnError):
        checkpoint.load(path)


def test_non_checkpoint_torch_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(CharrnnError, match="not a charrnn checkpoint"):
        checkpoint.load(path)


def test_plain_tensor_file(tmp_path):
    path = tmp_path / "t.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CharrnnError, match="not a charrnn checkpoint"):
        checkpoint.load(path)


def test_newer_format_version(tmp_path):
    path = tmp_path / "new.pt"
    torch.save({"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION + 1}, path)
    with pytest.raises(CharrnnError) as e:
        checkpoint.load(path)
    assert "version" in str(e.value) and "upgrade" in str(e.value)


def test_missing_and_directory(tmp_path):
    with pytest.raises(CharrnnError, match="not found"):
        checkpoint.load(tmp_path / "nope.pt")
    with pytest.raises(CharrnnError, match="directory"):
        checkpoint.load(tmp_path)


def test_restore_model_from_incomplete_checkpoint(tmp_path):
    path = checkpoint.save({"vocab": {"chars": "abc"}}, tmp_path / "c.pt")
    with pytest.raises(CharrnnError, match="does not describe"):
        checkpoint.restore_model(checkpoint.load(path))
