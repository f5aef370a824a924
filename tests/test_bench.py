"""The benchmark must keep running (CI runs its quick mode here); its numbers are never asserted as timings."""

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from charrnn import bench, cpu_lstm
from charrnn.model import native_bf16
from conftest import make_text

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def test_flop_formula_counts_gates_and_output_layer():
    # one LSTM layer, E=2, H=3, V=5: forward 2*4*3*(2+3) + 2*3*5 = 120 + 30 = 150; training is 3x
    assert bench.train_flops_per_char("lstm", 2, 3, 1, 5) == 450
    # a second layer reads H inputs: + 2*4*3*(3+3) = 144 forward
    assert bench.train_flops_per_char("lstm", 2, 3, 2, 5) == 3 * (150 + 144)
    assert bench.train_flops_per_char("gru", 2, 3, 1, 5) == 3 * (2 * 3 * 3 * 5 + 30)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_layer_products_do_the_formulas_flops(cell):
    # E=6, H=8, 2 layers, B=3, T=5: the products a kernel cannot avoid are exactly the layers' training FLOPs
    m = SimpleNamespace(cell=cell, embed_size=6, hidden_size=8, num_layers=2)
    t = SimpleNamespace(n_seqs=3, n_steps=5)
    with FlopCounterMode(display=False) as counter:
        bench.layer_products(m, t, torch.float32)()
    assert counter.get_total_flops() == bench.train_flops_per_char(cell, 6, 8, 2, 0) * 3 * 5


def test_products_bound_replaces_the_layers_time_by_the_products_time():
    # a step of 10 us per char, 6 of them in layers that do 3e5 FLOPs per char (50 GFLOP/s); at the products' 100
    # GFLOP/s they would take 3 us: 7 us per char; against a loop of 20,000 chars/s that is a 7.14x lead
    row = {"chars_s": 1e5, "layer_flops": 3e5, "layers_gflops": 50.0, "products_gflops": 100.0,
           "naive_module_chars_s": 2e4}
    assert bench.products_bound(row) == pytest.approx(1 / 7e-6 / 2e4)


def test_write_report_replaces_only_the_generated_section(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\nnotes people wrote\n", encoding="utf-8")
    bench.write_report("| a | 1 |\n", path, "python scripts/bench.py")
    bench.write_report("| a | 2 |\n", path, "python scripts/bench.py")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks\n\nnotes people wrote\n")
    assert "| a | 2 |" in text and "| a | 1 |" not in text
    assert text.count("<!-- bench:start -->") == 1
    # a GPU run writes its own section and leaves the CPU table alone
    bench.write_report("| g | 3 |\n", path, "python scripts/bench.py --device cuda", "bench-cuda")
    text = path.read_text(encoding="utf-8")
    assert "| a | 2 |" in text and "| g | 3 |" in text
    assert text.index("<!-- bench:end -->") < text.index("<!-- bench-cuda:start -->")


def test_quick_run_measures_every_path():
    report = bench.run(quick=True, configs_dir=str(CONFIGS), grid=True)
    for needle in ("fp32 matmul", "| tiny |", "| 2x128 grid |", "| 2x128 grid, train.kernel=torch | fp32 | "
                   "2x128 B4 T8 | torch |", "| andersen |", "| anna |", "encode 1 MB", "RSS per corpus character"):
        assert needle in report, needle
    tiny = next(r for r in report.splitlines() if r.startswith("| tiny |"))
    assert tiny.split("|")[4].strip() == ("torch" if cpu_lstm.unavailable() else "charrnn")  # 1x32 B8: 4 rows
    rows = {p: r for r in report.splitlines() for p in ("fp32", "bf16") if r.startswith(f"| andersen | {p} |")}
    assert set(rows) == ({"fp32", "bf16"} if native_bf16(torch.device("cpu")) else {"fp32"})
    for row in rows.values():
        cells = [c.strip() for c in row.strip("|").split("|")]
        chars_s, peak, naive_module, naive_cell = (float(cells[i].replace(",", "")) for i in (5, 7, 11, 13))
        layers_alone, products_alone = (float(cells[i].rstrip("%")) for i in (9, 10))
        assert chars_s > 0 and peak > 0 and layers_alone > 0 and products_alone > 0
        assert naive_module > 0 and naive_cell > 0
    assert re.search(r"which charrnn.s CPU kernel is not: 2x128 grid fp32 \d+\.\d\dx", report)
    assert ("train.precision=bf16 over fp32" in report) == ("bf16" in rows)
    for sampled in ("andersen", "2x256", "anna"):
        assert re.search(rf"\| {sampled} \| 2x\d+ \| 64 \| [\d,]+ \|", report), sampled
    # torch-rnn's grid: a row per layer count and precision, ms per iteration for hidden 128, 256 and 512
    for precision in {"fp32", "bf16"} if "bf16" in rows else {"fp32"}:
        for layers in ("1 layer", "2 layers", "3 layers"):
            assert re.search(rf"\| {layers} \| {precision} \| \d+\.\d \| \d+\.\d \| \d+\.\d \|", report), layers


def test_a_device_this_machine_lacks_is_a_one_line_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert bench.main(["--quick", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err and "--device cpu" in err and "Traceback" not in err


def test_precision_check_script_trains_both_ways(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(make_text(6000), encoding="utf-8")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "precision_check.py"), "--config",
                          str(CONFIGS / "tiny.yaml"), "--text", str(text), "--steps", "3"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = re.findall(r"^\| (fp32|bf16) \| (\d+\.\d+) \|", out.stdout, re.MULTILINE)
    assert [p for p, _ in rows] == ["fp32", "bf16"] and all(0 < float(v) < 10 for _, v in rows)
    assert "bf16 - fp32 val loss:" in out.stdout
    missing = subprocess.run([sys.executable, str(ROOT / "scripts" / "precision_check.py"), "--text",
                              str(tmp_path / "none.txt")], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and "not found" in missing.stderr
