"""`charrnn plot`: a run's metrics.jsonl -> loss.png, train and val loss against steps and against wall time.

matplotlib is an optional extra (`pip install 'charrnn[plot]'`): training never needs it, so it is imported only
here, and its absence is a one-line error. The figure is drawn with the object API (no pyplot), so no display or
GUI backend is touched.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from . import checkpoint
from .errors import CharrnnError

LN2 = math.log(2)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The run's metrics records; a torn last line (a run killed mid-write, or still running) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise CharrnnError(f"{path} not found: pass a run directory written by `charrnn train`")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and {"step", "train_loss", "elapsed_s"} <= rec.keys():
            records.append(rec)
    if not records:
        raise CharrnnError(f"{path} holds no metrics yet: train for at least train.log_every steps first")
    return records


def make_figure(records: list[dict], title: str = ""):
    """Two panels, loss against steps and against wall time; each shows the train and the val curve."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise CharrnnError("charrnn plot needs matplotlib: pip install 'charrnn[plot]' (or pip install matplotlib)") \
            from None
    val = [r for r in records if r.get("val_loss") is not None]
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    panels = fig.subplots(1, 2, sharey=True)
    wall = records[-1].get("elapsed_s", 0)
    unit, per = ("hours", 3600) if wall > 7200 else ("minutes", 60) if wall > 120 else ("seconds", 1)
    axes = ((panels[0], "step", 1, "step"), (panels[1], "elapsed_s", per, f"wall time ({unit})"))
    for ax, key, scale, label in axes:
        ax.plot([r[key] / scale for r in records], [r["train_loss"] for r in records], label="train loss",
                color="tab:blue", linewidth=1)
        ax.plot([r[key] / scale for r in val], [r["val_loss"] for r in val], label="val loss", color="tab:orange",
                marker="o", markersize=3, linewidth=1.5)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    panels[0].set_ylabel("loss (nats/char)")
    panels[1].secondary_yaxis("right", functions=(lambda n: n / LN2, lambda b: b * LN2)).set_ylabel("bits/char")
    if val:
        best = min(val, key=lambda r: r["val_loss"])
        title += f"  best val {best['val_loss']:.4f} nats/char ({best['val_loss'] / LN2:.4f} bits/char) " \
                 f"at step {best['step']}"
    fig.suptitle(title.strip())
    return fig


def plot_run(run_dir: str | Path) -> Path:
    """Write `<run_dir>/loss.png` (replacing an older plot) and return its path."""
    run_dir = Path(run_dir)
    fig = make_figure(read_metrics(run_dir), title=run_dir.name)
    out = run_dir / "loss.png"
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    try:
        checkpoint.write_atomic(out, png.getvalue())
    except OSError as e:
        raise CharrnnError(f"could not write {out} ({e.strerror or e}): check the directory's permissions") from None
    return out
