"""charrnn: train character-level LSTM language models on any text and sample new text from them.

The Python API; the `charrnn` command is a thin layer over it. `import charrnn` is light: torch loads on first use.

    import charrnn
    run_dir = charrnn.train("configs/tiny.yaml", train__max_steps=100)  # or **{"train.max_steps": 100}
    model = charrnn.load(run_dir / "best.pt")
    model.generate(prime="The ", length=200, temperature=0.5, top_k=5, num_samples=3, seed=1)  # three strings
    model.evaluate(text)  # {"loss": nats/char, "bpc": bits/char, "perplexity": ..., "chars": ..., "oov": ...}
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

__version__ = "0.1.0"


def load(path: str | Path, device: str = "auto"):
    """A checkpoint as a `charrnn.sample.Sampler`: `.generate`, `.samples`, `.lines` (lines mode), `.evaluate`."""
    from .sample import Sampler

    return Sampler.from_checkpoint(path, device)


def train(config, run_dir: str | Path | None = None, *, overwrite: bool = False, progress: bool = True,
          **overrides) -> Path:
    """Train a run to the end of its budget and return its directory (best.pt, last.pt, metrics.jsonl, ...).

    `config` is a YAML file or a `charrnn.config.RunConfig`; keyword overrides are `section__key=value`, or
    `**{"section.key": value}`, used as given. `run_dir` defaults to checkpoints/<config file stem>, as in the CLI.
    """
    from .config import RunConfig, build_config, mapping_overrides, read_yaml
    from .errors import UsageError
    from .train import Trainer

    if isinstance(config, RunConfig):
        if run_dir is None:
            raise UsageError("charrnn.train with a RunConfig needs run_dir=...: there is no file name to derive it")
        base = config.to_dict()
    else:
        base = read_yaml(config)
        run_dir = run_dir if run_dir is not None else Path("checkpoints") / Path(config).stem
    cfg = build_config(base, mapping_overrides(overrides))
    Trainer(cfg, run_dir, overwrite=overwrite, progress=progress).fit()
    return Path(run_dir)


class _Package(types.ModuleType):
    """Keeps `charrnn.train` the function above: importing the submodule charrnn.train (the Trainer) would
    otherwise replace the package attribute of the same name. The submodule stays importable by its full name."""

    def __setattr__(self, name, value):
        if not (name == "train" and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
