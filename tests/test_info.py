"""`charrnn info`, `charrnn env` and `charrnn export`: what a checkpoint holds, what the machine offers, a
TorchScript file that samples in a process that never imports charrnn, and a safetensors file that charrnn reads
like a checkpoint."""

import json
import subprocess
import sys

import pytest
import torch

from charrnn import checkpoint
from charrnn.cli import main
from charrnn.sample import Sampler


def test_info_text_and_json(trained_ckpt, capsys):
    ckpt = checkpoint.load(trained_ckpt)
    model, vocab = checkpoint.restore_model(ckpt)
    assert main(["info", "--checkpoint", str(trained_ckpt)]) == 0
    text = capsys.readouterr().out
    assert f"{model.num_params():,} parameters" in text
    assert f"{len(vocab)} characters" in text and "lstm, 1 layer(s) x 32 units" in text
    assert f"{ckpt['position']['step']:,} steps" in text and f"best {ckpt['metrics']['best_val_loss']:.4f}" in text
    assert f"with torch {torch.__version__}" in text and "config:" in text
    assert main(["info", "--checkpoint", str(trained_ckpt), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"]["parameters"] == model.num_params() and d["vocab"]["chars"] == "".join(vocab.chars)
    assert d["training"]["steps"] == 20 and d["training"]["chars_seen"] == ckpt["position"]["chars_seen"]
    assert d["val_loss"]["best"] == ckpt["metrics"]["best_val_loss"] and d["device"] == "cpu"
    assert d["config"]["model"]["hidden_size"] == 32 and d["data"]["known_items"] is None


def test_info_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["info", "--checkpoint", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "x.pt" in err and "Traceback" not in err


def test_env(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"torch    {torch.__version__}" in out
    assert ("cuda     available" in out) == torch.cuda.is_available()
    assert f"{torch.get_num_threads()} torch threads" in out
    for key in ("cudnn", "mps"):
        assert f"\n{key}" in out


def test_export_samples_without_charrnn(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "model.ts"
    assert main(["export", "--checkpoint", str(trained_ckpt), "--format", "torchscript", "--output", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    script = ("import sys, torch\n"
              f"m = torch.jit.load({str(out)!r})\n"
              "print(repr(m('The ', 60, 0.0, 0, 1)))\n"
              "a, b = m('The ', 40, 1.0, 5, 7), m('The ', 40, 1.0, 5, 7)\n"
              "assert a == b and len(a) == 40\n"
              "assert 'charrnn' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    greedy = Sampler.from_checkpoint(trained_ckpt, "cpu").generate("The ", 60, temperature=0.0)[0]
    assert proc.stdout.strip() == repr(greedy)
    assert main(["export", "--checkpoint", str(trained_ckpt), "--output", str(out)]) == 2  # exists
    assert "--force" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(trained_ckpt), "--output", str(out), "--force"]) == 0


def test_export_rejects_unknown_prime(trained_ckpt, tmp_path):
    out = tmp_path / "m.ts"
    assert main(["export", "--checkpoint", str(trained_ckpt), "--output", str(out)]) == 0
    with pytest.raises(Exception, match="outside the model's vocabulary"):
        torch.jit.load(str(out))("你", 5, 0.0, 0, 0)


def test_export_gru(tmp_path, make_cfg):
    from charrnn.train import Trainer

    Trainer(make_cfg({"model.cell": "gru", "model.num_layers": 2, "train.max_steps": 3, "train.sample_length": 0}),
            tmp_path / "run", progress=False, log=lambda msg: None).fit()
    out = tmp_path / "gru.ts"
    assert main(["export", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--output", str(out)]) == 0
    greedy = Sampler.from_checkpoint(tmp_path / "run" / "last.pt", "cpu").generate("The ", 30, temperature=0.0)[0]
    assert torch.jit.load(str(out))("The ", 30, 0.0, 0, 0) == greedy


def test_safetensors_export_samples_evaluates_and_fine_tunes(trained_best, tmp_path, monkeypatch, capsys):
    pytest.importorskip("safetensors")
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--checkpoint", str(trained_best), "--format", "safetensors", "--output", "m.safetensors"]
                ) == 0
    assert "wrote m.safetensors" in capsys.readouterr().out
    assert open("m.safetensors", "rb").read(9)[8:] == b"{" and not list(tmp_path.glob(".*tmp*"))  # a JSON header
    outputs = []
    for path in (str(trained_best), "m.safetensors"):
        for argv in (["sample", "--checkpoint", path, "--seed", "5", "--length", "80"],
                     ["eval", "--checkpoint", path, "--split", "val"], ["info", "--checkpoint", path, "--json"]):
            assert main(argv) == 0
            outputs.append(capsys.readouterr().out)
    for original, exported in zip(outputs[:2], outputs[3:5]):
        assert original == exported and original  # the same text for the same seed; the same val loss
    info, exported = json.loads(outputs[2]), json.loads(outputs[5])
    assert exported == {**info, "checkpoint": "m.safetensors"}
    assert main(["export", "--checkpoint", str(trained_best), "--format", "safetensors", "--output", "m.safetensors"]
                ) == 2  # exists: --force
    tune = {**info["config"], "train": {**info["config"]["train"], "max_steps": 2, "eval_every": 2}}
    (tmp_path / "tune.yaml").write_text(json.dumps(tune), encoding="utf-8")  # JSON is YAML
    assert main(["train", "--config", "tune.yaml", "--init-from", "m.safetensors", "--no-progress"]) == 0
    assert checkpoint.load(tmp_path / "checkpoints" / "tune" / "last.pt")["position"]["step"] == 2


def test_safetensors_without_the_package(trained_best, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import fails as if it were not installed
    out = tmp_path / "m.safetensors"
    assert main(["export", "--checkpoint", str(trained_best), "--format", "safetensors", "--output", str(out)]) == 1
    assert capsys.readouterr().err == ("charrnn: error: safetensors files need the safetensors package: "
                                       "pip install 'charrnn[safetensors]'\n")
    assert not out.exists()
