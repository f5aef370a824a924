"""Config: defaults < YAML < --set, key and value validation, YAML errors, and the shipped configs."""

from pathlib import Path

import pytest

from charrnn.config import RunConfig, load_config
from charrnn.errors import UsageError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, body: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return path


def test_defaults_without_file_or_overrides():
    cfg = load_config()
    assert cfg == RunConfig()


def test_precedence_defaults_yaml_set(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.01\n  n_seqs: 7\nmodel:\n  hidden_size: 48\n")
    cfg = load_config(path, ["train.lr=0.5"])
    assert cfg.train.lr == 0.5  # --set beats YAML
    assert cfg.train.n_seqs == 7  # YAML beats defaults
    assert cfg.model.hidden_size == 48
    assert cfg.train.n_steps == RunConfig().train.n_steps  # untouched keys keep their defaults


def test_base_layer_is_below_yaml_and_set(tmp_path):
    base = {"train": {"lr": 0.2, "n_seqs": 3, "n_steps": 5}}
    path = write(tmp_path, "train:\n  n_seqs: 9\n")
    cfg = load_config(path, ["train.n_steps=11"], base=base)
    assert (cfg.train.lr, cfg.train.n_seqs, cfg.train.n_steps) == (0.2, 9, 11)


def test_scientific_notation_in_yaml_is_a_float(tmp_path):
    path = write(tmp_path, "train:\n  lr: 3e-4\n")
    cfg = load_config(path)
    assert isinstance(cfg.train.lr, float)
    assert cfg.train.lr == pytest.approx(3e-4)


def test_set_values_are_typed():
    cfg = load_config(None, ["train.n_seqs=5", "data.ascii=true", "train.lr=1e-3", "sample.prime=Anna"])
    assert cfg.train.n_seqs == 5 and isinstance(cfg.train.n_seqs, int)
    assert cfg.data.ascii is True
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.sample.prime == "Anna"


def test_unknown_key_suggests_nearest():
    with pytest.raises(UsageError) as e:
        load_config(None, ["train.lrr=0.1"])
    assert "train.lrr" in str(e.value)
    assert "train.lr'" in str(e.value)


def test_unknown_key_in_yaml_suggests_nearest(tmp_path):
    path = write(tmp_path, "model:\n  hiden_size: 32\n")
    with pytest.raises(UsageError, match=r"model\.hidden_size"):
        load_config(path)


def test_unknown_section(tmp_path):
    path = write(tmp_path, "trian:\n  lr: 0.1\n")
    with pytest.raises(UsageError) as e:
        load_config(path)
    assert "trian" in str(e.value)
    assert "train" in str(e.value).replace("trian", "")


@pytest.mark.parametrize("item, key", [
    ("train.lr=-0.1", "train.lr"),
    ("train.lr=0", "train.lr"),
    ("model.dropout=1.0", "model.dropout"),
    ("model.dropout=1.5", "model.dropout"),
    ("model.num_layers=0", "model.num_layers"),
    ("model.hidden_size=0", "model.hidden_size"),
    ("train.n_seqs=abc", "train.n_seqs"),
    ("train.n_seqs=true", "train.n_seqs"),
    ("train.lr=true", "train.lr"),
    ("model.cell=transformer", "model.cell"),
    ("data.val_fraction=1", "data.val_fraction"),
])
def test_bad_values_name_the_key(item, key):
    with pytest.raises(UsageError) as e:
        load_config(None, [item])
    assert key in str(e.value)


def test_bool_for_int_in_yaml_is_rejected(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: true\n")
    with pytest.raises(UsageError, match=r"train\.max_steps"):
        load_config(path)


def test_set_without_equals_sign():
    with pytest.raises(UsageError) as e:
        load_config(None, ["train.lr"])
    assert "train.lr" in str(e.value)
    assert "=" in str(e.value)


def test_set_key_without_section():
    with pytest.raises(UsageError, match="section.key"):
        load_config(None, ["lr=0.1"])


def test_yaml_syntax_error_gives_line_and_column(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.1\n  n_seqs: [1, 2\nmodel:\n  cell: lstm\n")
    with pytest.raises(UsageError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "line" in msg and "column" in msg
    assert "\n" not in msg


def test_yaml_syntax_error_line_number_is_right(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.1\n  n_seqs: : 3\n")
    with pytest.raises(UsageError, match="line 3"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_empty_yaml_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == RunConfig()


def test_a_run_needs_a_budget():
    with pytest.raises(UsageError, match="budget"):
        load_config(None, ["train.max_steps=0", "train.max_epochs=0", "train.max_minutes=0"])


def test_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "sample.prime=Once upon", "model.cell=gru"])
    path = write(tmp_path, cfg.to_yaml())
    assert load_config(path) == cfg


def test_every_shipped_config_loads():
    files = sorted(CONFIGS.glob("*.yaml"))  # globbed at run time: configs may be added while the suite runs
    assert files, "configs/ holds no YAML files"
    for path in files:
        cfg = load_config(path)
        assert isinstance(cfg, RunConfig), path
        assert cfg.train.lr > 0
