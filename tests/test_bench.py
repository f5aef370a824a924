"""The benchmark must keep running (CI runs its quick mode here); its numbers are never asserted as timings."""

import re
from pathlib import Path

from charrnn import bench

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_flop_formula_counts_gates_and_output_layer():
    # one LSTM layer, E=2, H=3, V=5: forward 2*4*3*(2+3) + 2*3*5 = 120 + 30 = 150; training is 3x
    assert bench.train_flops_per_char("lstm", 2, 3, 1, 5) == 450
    # a second layer reads H inputs: + 2*4*3*(3+3) = 144 forward
    assert bench.train_flops_per_char("lstm", 2, 3, 2, 5) == 3 * (150 + 144)
    assert bench.train_flops_per_char("gru", 2, 3, 1, 5) == 3 * (2 * 3 * 3 * 5 + 30)


def test_write_report_replaces_only_the_generated_section(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\nnotes people wrote\n", encoding="utf-8")
    bench.write_report("| a | 1 |\n", path, "python scripts/bench.py")
    bench.write_report("| a | 2 |\n", path, "python scripts/bench.py")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks\n\nnotes people wrote\n")
    assert "| a | 2 |" in text and "| a | 1 |" not in text
    assert text.count("<!-- bench:start -->") == 1


def test_quick_run_measures_every_path():
    report = bench.run(quick=True, configs_dir=str(CONFIGS))
    for needle in ("fp32 matmul", "| tiny |", "| 2x128 grid |", "| andersen |", "| anna |", "encode 1 MB",
                   "RSS per corpus character"):
        assert needle in report, needle
    rows = [r for r in report.splitlines() if r.startswith("| andersen | 2x256")]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    chars_s, naive = (float(cells[i].replace(",", "")) for i in (3, 6))
    assert chars_s > 0 and naive > 0
    assert re.search(r"\| andersen \| 64 \| [\d,]+ \|", report)
