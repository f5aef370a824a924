"""Is train.precision=bf16 worth it here? Trains one config twice from the same seed, fp32 then bf16, for the same
number of steps on the same text, and prints the val loss and chars/s of each and their difference and ratio.

    python scripts/precision_check.py                       # anna config on ../shared/corpora/anna.txt, 200 steps
    python scripts/precision_check.py --config configs/andersen.yaml --text data/andersen.txt --steps 1000

The val loss is measured the same way for both: the fp32 weights over the whole validation split. chars/s is the
median of the metrics lines' training speed (evaluation excluded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from charrnn.config import load_config  # noqa: E402
from charrnn.train import Trainer  # noqa: E402


def train_once(config: str, text: str, steps: int, precision: str, run_dir: Path) -> dict:
    cfg = load_config(config, [f"data.path={text}", f"train.precision={precision}", f"train.max_steps={steps}",
                               "train.max_epochs=0", "train.max_minutes=0", f"train.eval_every={steps}",
                               "train.sample_length=0", "train.device=cpu", "train.checkpoint_minutes=0"])
    trainer = Trainer(cfg, run_dir, progress=False, log=lambda msg: None)
    t0 = time.perf_counter()
    summary = trainer.fit()
    seconds = time.perf_counter() - t0
    windows = [json.loads(line)["chars_per_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"precision": precision, "val_loss": summary["best_val_loss"], "seconds": seconds,
            "chars_s": statistics.median(windows)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "anna.yaml"))
    p.add_argument("--text", default=str(ROOT.parent / "shared" / "corpora" / "anna.txt"))
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    if not Path(args.text).is_file():
        print(f"precision_check: {args.text} not found: pass --text FILE", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        rows = [train_once(args.config, args.text, args.steps, prec, Path(tmp) / prec) for prec in ("fp32", "bf16")]
    print(f"{Path(args.config).name} on {Path(args.text).name}, {args.steps} steps each, same seed\n")
    print("| precision | val loss (nats/char) | chars/s | wall s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['val_loss']:.4f} | {r['chars_s']:,.0f} | {r['seconds']:.0f} |")
    fp32, bf16 = rows
    print(f"\nbf16 - fp32 val loss: {bf16['val_loss'] - fp32['val_loss']:+.4f} nats; "
          f"bf16 / fp32 chars/s: {bf16['chars_s'] / fp32['chars_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
