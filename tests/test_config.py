import pytest

from aiinfra.config import Config, ConfigError, load_config


def test_defaults_are_the_tiny_embedded_model() -> None:
    config = load_config()
    assert config.model.preset == "tiny" and config.data.corpus == "stdlib"


def test_toml_file_and_overrides(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[model]\npreset = "small"\nn_layers = 2\n[train]\nlr = 1e-3\n')
    config = load_config(path, ["train.lr=5e-4", "run.sample_prompt=class", "train.compile=true"])
    assert config.model.dim == 512 and config.model.n_layers == 2
    assert config.train.lr == 5e-4 and config.run.sample_prompt == "class" and config.train.compile is True


def test_resolved_config_round_trips_through_toml(tmp_path) -> None:
    import tomli_w

    config = load_config(None, ["model.n_layers=3", "train.steps=7"])
    path = tmp_path / "resolved.toml"
    path.write_text(tomli_w.dumps(config.to_dict()))
    assert load_config(path) == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lr=abc"], "--set train.lr=abc: train.lr: Input should be a valid number"),
        (["train.learning_rate=1"], "--set train.learning_rate=1: train.learning_rate: unknown key"),
        (["nosection.x=1"], "nosection: unknown key"),
        (["model.n_layers=-1"], "model.n_layers: Input should be greater than or equal to 1"),
        (["model.preset=nope"], "--set model.preset=nope: model: unknown preset 'nope'"),
        (["train.seq_len=4096"], "train.seq_len=4096 exceeds model.max_seq_len=256"),
        (["lr"], "--set lr: expected section.key=value"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value)


def test_bad_file_is_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    bad.write_text("[train]\nsteps = 'many'\n")
    with pytest.raises(ConfigError, match=f"{bad}: train.steps"):
        load_config(bad)


def test_config_is_validated_on_assignment() -> None:
    config = Config()
    with pytest.raises(ValueError):
        config.train.steps = 0


def test_node_local_checkpoint_settings_are_checked() -> None:
    assert load_config(None, ["checkpoint.storage=local", "checkpoint.dir=/disk/ckpt-{rank}"]).checkpoint.dir
    with pytest.raises(ConfigError, match="checkpoint.storage=\"local\""):
        load_config(None, ["checkpoint.dir=/disk/ckpt-{rank}"])
    with pytest.raises(ConfigError, match="the only placeholder allowed is {rank}"):
        load_config(None, ["checkpoint.storage=local", "checkpoint.dir=/disk/{node}"])
    with pytest.raises(ConfigError, match="checkpoint.storage"):
        load_config(None, ["checkpoint.storage=nfs"])
