"""Run configuration: a typed dataclass schema with defaults in code, YAML files, and `--set key=value` overrides.

Precedence is defaults < YAML file < `--set`. Every value is coerced by its field's annotation (PyYAML reads `3e-4`
as a string and `bool` is an `int`, so both are checked), and an unknown key is an error naming the nearest valid one.
Derived values (the vocabulary size) never live here: they go in the checkpoint's model args.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UsageError


def _known_encoding(name: str) -> bool:
    try:
        "\n".encode(name)  # a LookupError for unknown names and for bytes-to-bytes codecs (base64)
    except LookupError:
        return False
    except UnicodeError:  # a text encoding that has no newline
        pass
    return True


@dataclass(frozen=True)
class DataConfig:
    path: str = "data/andersen.txt"  # the training text
    gutenberg: str = ""  # the Gutenberg book that provides `path` (for the `charrnn download` hint)
    val_fraction: float = 0.1  # the last fraction of the text is the validation split (independent of batch size)
    ascii: bool = False  # transliterate the text to ASCII with unidecode before building the vocabulary
    max_vocab: int = 0  # keep only the most frequent characters (0: all); the rest become one unknown symbol
    min_freq: int = 1  # characters seen fewer times become the unknown symbol
    encoding: str = "utf-8"  # how the text file is decoded
    mode: str = "text"  # text: one running text | lines: one item per line (a name), each between two newlines
    skip_lines: int = 0  # lines at the top of the file to drop first (a header)

    def __post_init__(self):
        _check(0.0 <= self.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1)", self.val_fraction)
        _check(self.mode in ("text", "lines"), "data.mode", "must be text or lines", self.mode)
        _check(self.skip_lines >= 0, "data.skip_lines", "must be >= 0", self.skip_lines)
        _check(self.max_vocab >= 0, "data.max_vocab", "must be >= 0", self.max_vocab)
        _check(self.min_freq >= 1, "data.min_freq", "must be >= 1", self.min_freq)
        _check(bool(self.path), "data.path", "must name a text file", self.path)
        _check(_known_encoding(self.encoding), "data.encoding", "must be a text encoding Python knows, e.g. utf-8 or "
               "latin-1", self.encoding)


@dataclass(frozen=True)
class ModelConfig:
    cell: str = "lstm"  # lstm | gru | rnn
    embed_size: int = 64  # character embedding width
    hidden_size: int = 256  # units per recurrent layer
    num_layers: int = 2  # stacked recurrent layers
    dropout: float = 0.0  # dropout between layers and before the output layer

    def __post_init__(self):
        _check(self.cell in ("lstm", "gru", "rnn"), "model.cell", "must be one of lstm, gru, rnn", self.cell)
        _check(self.embed_size >= 1, "model.embed_size", "must be >= 1", self.embed_size)
        _check(self.hidden_size >= 1, "model.hidden_size", "must be >= 1", self.hidden_size)
        _check(self.num_layers >= 1, "model.num_layers", "must be >= 1", self.num_layers)
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)", self.dropout)


@dataclass(frozen=True)
class TrainConfig:
    n_seqs: int = 32  # parallel streams per batch (B)
    n_steps: int = 64  # characters per stream per batch: the truncated-BPTT length (T)
    lr: float = 2e-3  # peak learning rate
    optimizer: str = "adamw"  # adam | adamw
    weight_decay: float = 0.0  # decoupled weight decay (adamw) or L2 (adam)
    schedule: str = "cosine"  # cosine | step | constant, after warm-up
    warmup_steps: int = 50  # linear warm-up from lr/warmup_steps to lr
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the end of the budget
    lr_decay: float = 0.5  # step schedule: multiply the lr by this ...
    lr_decay_steps: int = 1000  # ... every this many steps
    grad_clip: float = 5.0  # clip the global gradient norm (0: off)
    max_steps: int = 0  # stop after this many optimizer steps (0: no limit)
    max_epochs: float = 10.0  # stop after this many passes over the training split (0: no limit)
    max_minutes: float = 0.0  # stop after this much wall time (0: no limit)
    eval_every: int = 200  # evaluate on the validation split every this many steps
    log_every: int = 10  # write a metrics line every this many steps
    sample_length: int = 200  # characters of the sample printed at each evaluation (0: none)
    checkpoint_every: int = 0  # also save last.pt every this many steps (0: at evaluations, interrupts and the end)
    checkpoint_minutes: float = 5.0  # also save last.pt when this many minutes passed since the last save (0: off)
    keep_last: int = 0  # keep the newest this many step-numbered copies of last.pt, step-00001200.pt (0: none)
    patience: int = 0  # early stopping: stop after this many evaluations without a new best val loss (0: off)
    plateau_patience: int = 0  # multiply the lr by plateau_factor after this many evaluations without one (0: off)
    plateau_factor: float = 0.5  # the reduce-on-plateau factor
    diverge_factor: float = 3.0  # stop when a logged train loss is NaN/inf or this many times the first (0: NaN/inf)
    tensorboard: bool = False  # also log the metrics to <run dir>/tensorboard (needs the tensorboard package)
    seed: int = 1337  # seeds torch and python RNGs: the same seed gives the same run
    device: str = "auto"  # auto | cpu | cuda | mps (auto: cuda, then mps, then cpu)
    precision: str = "fp32"  # fp32 | bf16: bf16 computes the steps in bfloat16 over fp32 master weights
    kernel: str = "auto"  # auto | torch: auto runs an fp32 LSTM on an AVX-512 CPU with charrnn's kernel where faster

    def __post_init__(self):
        _check(self.n_seqs >= 1, "train.n_seqs", "must be >= 1", self.n_seqs)
        _check(self.n_steps >= 1, "train.n_steps", "must be >= 1", self.n_steps)
        _check(self.lr > 0 and math.isfinite(self.lr), "train.lr", "must be a positive number", self.lr)
        _check(self.optimizer in ("adam", "adamw"), "train.optimizer", "must be adam or adamw", self.optimizer)
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0", self.weight_decay)
        _check(self.schedule in ("cosine", "step", "constant"), "train.schedule",
               "must be one of cosine, step, constant", self.schedule)
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0", self.warmup_steps)
        _check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        _check(0 < self.lr_decay <= 1, "train.lr_decay", "must be in (0, 1]", self.lr_decay)
        _check(self.lr_decay_steps >= 1, "train.lr_decay_steps", "must be >= 1", self.lr_decay_steps)
        _check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0", self.grad_clip)
        _check(self.max_steps >= 0, "train.max_steps", "must be >= 0", self.max_steps)
        _check(self.max_epochs >= 0, "train.max_epochs", "must be >= 0", self.max_epochs)
        _check(self.max_minutes >= 0, "train.max_minutes", "must be >= 0", self.max_minutes)
        _check(self.max_steps or self.max_epochs or self.max_minutes, "train.max_steps",
               "a run needs a budget: set train.max_steps, train.max_epochs or train.max_minutes above 0", 0)
        _check(self.eval_every >= 1, "train.eval_every", "must be >= 1", self.eval_every)
        _check(self.log_every >= 1, "train.log_every", "must be >= 1", self.log_every)
        _check(self.sample_length >= 0, "train.sample_length", "must be >= 0", self.sample_length)
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0", self.checkpoint_every)
        _check(self.checkpoint_minutes >= 0, "train.checkpoint_minutes", "must be >= 0", self.checkpoint_minutes)
        _check(self.keep_last >= 0, "train.keep_last", "must be >= 0", self.keep_last)
        _check(self.patience >= 0, "train.patience", "must be >= 0", self.patience)
        _check(self.plateau_patience >= 0, "train.plateau_patience", "must be >= 0", self.plateau_patience)
        _check(0 < self.plateau_factor < 1, "train.plateau_factor", "must be in (0, 1)", self.plateau_factor)
        _check(self.diverge_factor == 0 or self.diverge_factor > 1, "train.diverge_factor", "must be 0 or above 1",
               self.diverge_factor)
        _check(self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:"), "train.device",
               "must be auto, cpu, cuda, cuda:N or mps", self.device)
        _check(self.precision in ("fp32", "bf16"), "train.precision", "must be fp32 or bf16", self.precision)
        _check(self.kernel in ("auto", "torch"), "train.kernel", "must be auto or torch", self.kernel)


@dataclass(frozen=True)
class SampleConfig:
    prime: str = "\n"  # text that warms the state before generating (`charrnn sample` defaults come from here)
    length: int = 500  # characters to generate per sample
    temperature: float = 0.8  # softmax temperature (0: greedy)
    top_k: int = 0  # sample among the k most likely characters (0: all)
    top_p: float = 1.0  # sample among the most likely characters that hold this much probability (1: all)
    repetition_penalty: float = 1.0  # shrink the logits of characters among the last 32 (1: off)
    num_samples: int = 1  # samples generated together as one batch

    def __post_init__(self):
        _check(self.length >= 0, "sample.length", "must be >= 0", self.length)
        _check(self.temperature >= 0 and math.isfinite(self.temperature), "sample.temperature",
               "must be >= 0", self.temperature)
        _check(self.top_k >= 0, "sample.top_k", "must be >= 0", self.top_k)
        _check(0 < self.top_p <= 1, "sample.top_p", "must be in (0, 1]", self.top_p)
        _check(1 <= self.repetition_penalty < math.inf, "sample.repetition_penalty", "must be >= 1",
               self.repetition_penalty)
        _check(self.num_samples >= 1, "sample.num_samples", "must be >= 1", self.num_samples)


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


SECTIONS: dict[str, type] = typing.get_type_hints(RunConfig)


def _check(ok, key: str, rule: str, value) -> None:
    if not ok:
        raise UsageError(f"config {key} {rule} (got {value!r})")


def _nearest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(options)}"


def _coerce(key: str, value, typ):
    """Coerce one value to its field's type, refusing what is only accidentally compatible (bool for int)."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif typ is float:
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                return float(value.strip())
        except (ValueError, OverflowError):
            pass
    elif typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise UsageError(f"config {key} must be {typ.__name__} (got {value!r})")


def _check_keys(tree: dict, where: str) -> None:
    if not isinstance(tree, dict):
        raise UsageError(f"{where} must be a mapping of sections ({', '.join(SECTIONS)}), got {type(tree).__name__}")
    for section, values in tree.items():
        if section not in SECTIONS:
            raise UsageError(f"unknown config section '{section}' in {where}{_nearest(str(section), SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise UsageError(f"config section '{section}' in {where} must be a mapping of keys to values")
        names = [f.name for f in dataclasses.fields(SECTIONS[section])]
        for key in values:
            if key not in names:
                dotted = [f"{section}.{n}" for n in names]
                raise UsageError(f"unknown config key '{section}.{key}' in {where}"
                                 f"{_nearest(f'{section}.{key}', dotted)}")


def read_yaml(path: str | Path) -> dict:
    """Read a config file into a nested dict, turning YAML and file errors into one-line messages."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} not found: pass --config with a file from configs/")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"config file {path} is not valid YAML{where}: {e.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError, OSError, ValueError, RecursionError) as e:
        raise UsageError(f"config file {path} could not be read as YAML ({type(e).__name__}): "
                         f"fix the file or start from one in configs/") from None
    tree = tree or {}
    _check_keys(tree, str(path))
    return tree


def parse_overrides(items: list[str]) -> dict:
    """Turn `section.key=value` strings into a nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set {item!r} needs the form section.key=value, e.g. --set train.lr=1e-3")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key.count(".") != 1:
            raise UsageError(f"--set {item!r}: the key must be section.key, e.g. train.lr")
        section, name = key.split(".")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, ValueError, RecursionError):  # PyYAML raises ValueError for e.g. 0x_ or 2001-02-30
            value = raw
        if isinstance(value, (dict, list)) or value is None:
            value = raw
        tree.setdefault(section, {})[name] = value
    _check_keys(tree, "--set")
    return tree


def mapping_overrides(values: dict) -> dict:
    """Python overrides for the API, `{"train.max_steps": 100}` or `train__max_steps=100`, as a nested dict: the
    values are used as they are (no YAML parsing, so a prime like "The " keeps its space)."""
    tree: dict = {}
    for key, value in values.items():
        dotted = key.replace("__", ".")
        if dotted.count(".") != 1:
            raise UsageError(f"override {key!r}: the key must be section.key or section__key, e.g. train__lr")
        section, name = dotted.split(".")
        tree.setdefault(section, {})[name] = value
    _check_keys(tree, "overrides")
    return tree


def build_config(*layers: dict) -> RunConfig:
    """Merge nested dicts over the defaults (later layers win) into a validated RunConfig."""
    sections = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        values = {}
        for layer in layers:
            for key, value in (layer.get(section) or {}).items():
                values[key] = _coerce(f"{section}.{key}", value, hints[key])
        sections[section] = cls(**values)
    return RunConfig(**sections)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> RunConfig:
    """defaults < `base` (a checkpoint's config, on resume) < YAML file at `path` < `--set` overrides."""
    layers = []
    if base:
        _check_keys(base, "checkpoint config")
        layers.append(base)
    if path:
        layers.append(read_yaml(path))
    layers.append(parse_overrides(overrides or []))
    return build_config(*layers)


def config_from_dict(tree: dict) -> RunConfig:
    """Rebuild a RunConfig stored in a checkpoint (keys the schema no longer has are an error)."""
    _check_keys(tree, "checkpoint config")
    return build_config(tree)
