"""The Python API: `charrnn.train` and `charrnn.load` (generate, evaluate), and `import charrnn` staying light."""

import subprocess
import sys

import pytest
import yaml

import charrnn
from charrnn.config import build_config
from charrnn.errors import UsageError
from conftest import tiny_tree


def test_import_is_light():
    proc = subprocess.run([sys.executable, "-c", "import sys, charrnn; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "False"


def test_train_load_generate_evaluate(tmp_path, text_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_tree(text_file)), encoding="utf-8")
    run_dir = charrnn.train(config, progress=False, train__max_steps=4,
                            **{"train.eval_every": 2, "sample.prime": "Once "})
    assert run_dir.resolve() == tmp_path / "checkpoints" / "tiny" and (run_dir / "best.pt").is_file()
    from charrnn.train import Trainer  # importing the Trainer's module keeps the API function in place

    assert callable(charrnn.train) and sys.modules["charrnn.train"].Trainer is Trainer
    model = charrnn.load(run_dir / "best.pt", device="cpu")
    assert model.config.train.max_steps == 4 and model.settings.prime == "Once "  # overrides used as given
    texts = model.generate(prime="The ", length=50, temperature=0.5, top_k=5, num_samples=3, seed=1)
    assert len(texts) == 3 and all(isinstance(t, str) and len(t) == 50 for t in texts)
    assert model.generate(prime="The ", length=50, temperature=0.5, top_k=5, num_samples=3, seed=1) == texts
    metrics = model.evaluate(text_file.read_text(encoding="utf-8"))
    assert set(metrics) == {"loss", "bpc", "perplexity", "chars", "oov", "oov_chars"} and metrics["loss"] > 0


def test_train_with_a_run_config(tmp_path, text_file):
    cfg = build_config(tiny_tree(text_file))
    run_dir = charrnn.train(cfg, tmp_path / "run", progress=False, train__max_steps=2, train__sample_length=0)
    assert (run_dir / "last.pt").is_file()
    with pytest.raises(UsageError, match="run_dir"):
        charrnn.train(cfg)


def test_train_refuses_unknown_override(tmp_path, text_file):
    with pytest.raises(UsageError, match="train.max_steps"):
        charrnn.train(build_config(tiny_tree(text_file)), tmp_path / "run", train__max_step=3)
