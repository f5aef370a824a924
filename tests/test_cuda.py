"""The CUDA paths, run where torch sees a GPU (`bash scripts/gpu_check.sh` runs them there) and skipped elsewhere:
training in fp32 and bf16 with the corpus on the device, checkpoints that load on a CPU, exact resume, sampling,
and the benchmark."""

import math

import pytest
import torch

import charrnn
from charrnn import bench, checkpoint
from charrnn.config import load_config
from charrnn.plot import read_metrics
from charrnn.train import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

QUIET = {"progress": False, "log": lambda m: None}
COMMON = {"train.device": "cuda", "model.num_layers": 2, "model.hidden_size": 32, "model.dropout": 0.3,
          "train.log_every": 1, "train.eval_every": 10, "train.sample_length": 10}


def losses(run_dir):
    return [r["train_loss"] for r in read_metrics(run_dir)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trains_on_the_gpu_and_its_checkpoint_loads_on_a_cpu(make_cfg, tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    run = tmp_path / "run"
    t = Trainer(make_cfg({**COMMON, "train.precision": precision, "train.max_steps": 40}), run, **QUIET)
    assert t.device.type == "cuda" and t.train_data.x.is_cuda and next(t.model.parameters()).is_cuda
    t.fit()
    seen = losses(run)
    assert all(math.isfinite(v) for v in seen) and sum(seen[-5:]) < sum(seen[:5])
    raw = torch.load(run / "last.pt", map_location="cpu", weights_only=True)  # no pickled objects
    assert {w.device.type for w in raw["model"].values()} == {"cpu"}
    ckpt = checkpoint.load(run / "last.pt")
    assert {w.dtype for w in ckpt["model"].values()} == {torch.float32}
    cpu_text = charrnn.load(run / "best.pt", device="cpu").generate("The ", length=30, seed=3)
    gpu_text = charrnn.load(run / "best.pt", device="cuda").generate("The ", length=30, num_samples=64, seed=3)
    assert len(cpu_text) == 1 and len(cpu_text[0]) == 30
    assert len(gpu_text) == 64 and all(len(s) == 30 for s in gpu_text)


def test_resume_on_the_gpu_continues_the_run(make_cfg, tmp_path):
    """Dropout masks come from the restored CUDA generator: a resumed run follows the straight one (to the last bit
    where cuDNN is deterministic; a tolerance covers its atomics)."""
    n, k = 20, 8
    common = {**COMMON, "train.schedule": "step", "train.lr_decay_steps": 5, "train.lr_decay": 0.7}  # not max_steps
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    Trainer(make_cfg({**common, "train.max_steps": n}), straight, **QUIET).fit()
    Trainer(make_cfg({**common, "train.max_steps": k}), resumed, **QUIET).fit()
    ckpt = checkpoint.load(resumed / "last.pt")
    assert "cuda" in ckpt["rng"]
    Trainer(load_config(None, [f"train.max_steps={n}"], base=ckpt["config"]), resumed, resume=ckpt, **QUIET).fit()
    assert losses(resumed) == pytest.approx(losses(straight), abs=1e-4)


def test_bench_runs_on_the_gpu():
    report = bench.run(quick=True, device="cuda", grid=True)
    assert "device cuda" in report and "peak CUDA memory MB" in report and "| 3 layers | fp32 |" in report
