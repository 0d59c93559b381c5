"""Training config: TOML + CLI overrides with type conversion; every bad key/type/range is named up front."""
import json
import tomllib
from pathlib import Path

import pytest

from sonar_train.config import ConfigError, RunConfig, load_config, parse_overrides, save_config, to_toml, validate

REPO = Path(__file__).resolve().parent.parent


def _write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_toml_then_cli_overrides_with_types(tmp_path, monkeypatch):
    (tmp_path / "shards").mkdir()
    (tmp_path / "dec.pt").write_bytes(b"x")  # the default family (SONAR-LLM) needs a findable SONAR decoder
    monkeypatch.setenv("SONAR_DECODER", str(tmp_path / "dec.pt"))
    p = _write(tmp_path, f'[data]\npath = "{tmp_path / "shards"}"\n[optim]\nlr = 1\n[train]\nsteps = 7\n')
    cfg = load_config(p, ["--optim.lr=3e-4", "--train.grad_accum", "4", "--train.compile=true",
                          "--optim.betas=0.8,0.9", "--model.overrides.num_layers=3", "--model.overrides.name=x"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7 and cfg.train.grad_accum == 4 and cfg.train.compile is True
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.model.overrides == {"num_layers": 3, "name": "x"}
    # an int in TOML for a float field is converted
    assert isinstance(load_config(p, check_paths=False).optim.lr, float)


@pytest.mark.parametrize("override, message", [
    ("--optim.lr=abc", "optim.lr: expected float, got 'abc'"),
    ("--optim.lr=-1", "optim.lr: expected float > 0, got -1.0"),
    ("--train.steps=1.5", "train.steps: expected int, got '1.5'"),
    ("--train.steps=0", "train.steps: expected int > 0"),
    ("--train.precision=fp8", "train.precision: expected one of bf16, fp32, fp16"),
    ("--train.activation_checkpointing=some", "train.activation_checkpointing"),
    ("--train.compile=maybe", "train.compile: expected bool"),
    ("--optim.betas=0.9", "optim.betas: expected two floats"),
    ("--parallel.decoder_placement=cpu", "parallel.decoder_placement"),
    ("--train.stepz=3", "train.stepz: unknown key in [train]"),
    ("--trian.steps=3", "trian.steps: unknown section 'trian'"),
    ("--optim.min_lr_ratio=2", "optim.min_lr_ratio: expected float in [0, 1]"),
])
def test_bad_cli_values_are_named(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override], check_paths=False)
    assert message in str(e.value)


def test_bad_toml_keys_and_types_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"optim.weight_decay: expected float, got 'big'"):
        load_config(_write(tmp_path, '[optim]\nweight_decay = "big"\n'), check_paths=False)
    with pytest.raises(ConfigError, match=r"data.shards: unknown key"):
        load_config(_write(tmp_path, '[data]\nshards = 3\n'), check_paths=False)
    with pytest.raises(ConfigError, match=r"extra: unknown section"):
        load_config(_write(tmp_path, '[extra]\na = 1\n'), check_paths=False)
    with pytest.raises(ConfigError, match=r"train.steps: expected int, got True"):
        load_config(_write(tmp_path, '[train]\nsteps = true\n'), check_paths=False)
    with pytest.raises(ConfigError, match=r"invalid TOML"):
        load_config(_write(tmp_path, '[train\n'), check_paths=False)


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="data.path: expected a shard directory"):
        load_config(None, [])
    with pytest.raises(FileNotFoundError, match=r"data.path: path does not exist: .*missing"):
        load_config(None, [f"--data.path={tmp_path / 'missing'}"])
    with pytest.raises(FileNotFoundError, match=r"sonar.decoder: path does not exist"):
        load_config(None, [f"--data.path={tmp_path}", f"--sonar.decoder={tmp_path / 'dec.pt'}"])


def test_malformed_override_syntax():
    with pytest.raises(ConfigError, match="expected --section.key=value"):
        parse_overrides(["steps=3"])
    with pytest.raises(ConfigError, match="missing value"):
        parse_overrides(["--train.steps"])


def test_programmatic_wrong_type_caught_by_validate():
    cfg = RunConfig()
    cfg.train.steps = "10"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="train.steps: expected int"):
        validate(cfg, check_paths=False)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--optim.lr=0.00123", "--model.overrides.n=2", "--train.out_dir=x y"], check_paths=False)
    save_config(cfg, tmp_path / "run")
    again = load_config(tmp_path / "run" / "config.toml", check_paths=False)
    assert again == cfg
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == cfg.to_dict()
    assert tomllib.loads(to_toml(cfg))["optim"]["lr"] == 0.00123


def test_shipped_configs_are_valid():
    files = sorted((REPO / "configs").glob("*.toml"))
    assert any(f.name == "default.toml" for f in files)
    from sonar_llm.models.family import FAMILIES
    from sonar_llm.models.presets import PRESETS

    for f in files:
        cfg = load_config(f, check_paths=False)  # raises on any unknown key / bad value
        assert cfg.model.family in FAMILIES and cfg.model.preset in PRESETS, f.name
        if f.name != "default.toml":
            assert f.stem == f"{cfg.model.family}_{cfg.model.preset.lower()}"
