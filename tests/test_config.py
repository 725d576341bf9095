"""Configuration: YAML to typed dataclasses, with errors that name the key and the valid choices."""

import pytest

from gspo_engine.config import ConfigError, dump_config, load_config


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_and_yaml_values(tmp_path):
    config = load_config(write(tmp_path, "optim:\n  learning_rate: 1e-5\n  betas: [0.9, 0.95]\ngspo:\n  level: token\n"))
    assert config.optim.learning_rate == 1e-5 and config.optim.betas == (0.9, 0.95)
    assert config.gspo.level == "token" and config.gspo.eps_low == 3e-4 and config.gspo.num_minibatches == 4


def test_overrides_take_precedence(tmp_path):
    config = load_config(write(tmp_path, "rollout:\n  group_size: 4\n"), ["rollout.group_size=6", "train.steps=3"])
    assert config.rollout.group_size == 6 and config.train.steps == 3


def test_rewards_are_typed(tmp_path):
    config = load_config(write(tmp_path, "rewards:\n  - function: exact_match\n    weight: 2\n    options: {}\n"))
    assert config.rewards[0].function == "exact_match" and config.rewards[0].weight == 2.0


@pytest.mark.parametrize(
    "text, message",
    [
        ("rollout:\n  groupsize: 4\n", "unknown key rollout.groupsize; valid keys of rollout: prompts_per_step, group_size"),
        ("training:\n  steps: 4\n", "unknown key training; valid keys: model, data"),
        ("gspo:\n  level: tokens\n", "gspo.level: 'tokens' is not valid; choose one of 'sequence', 'sequence_token', 'token'"),
        ("train:\n  steps: many\n", "train.steps: expected int, got str 'many'"),
        ("train:\n  steps: 0\n", "train.steps: 0 is not valid; expected an integer >= 1"),
        ("rollout:\n  group_size: 1\n", "rollout.group_size: 1 is not valid"),
        ("optim:\n  betas: [0.9]\n", "optim.betas: expected a list of 2 values"),
        ("model:\n  activation_checkpointing: 1\n", "model.activation_checkpointing: expected true or false"),
        ("rewards:\n  - weight: 1\n", "rewards\\[0\\].function is required"),
        ("data:\n  builtin:\n    tasks: [copy, add]\n", "data.builtin.tasks: .* choose some of copy, reverse, sort"),
        ("data:\n  builtin:\n    min_length: 5\n    max_length: 3\n", "data.builtin.max_length: 3 is below"),
        ("gspo:\n  num_minibatches: 100\nrollout:\n  prompts_per_step: 2\n  group_size: 4\n", "gspo.num_minibatches: 100 minibatches for 8"),
        ("data:\n  dataset: my.jsonl\n", "rewards: a dataset other than a built-in task needs at least one reward"),
        ("- a\n- b\n", "must hold a mapping of sections"),
        ("gspo:\n  old_logps: rollout\nrollout:\n  top_p: 0.9\n", "gspo.old_logps: rollout takes the sampler's"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["rollout.group_size"])


def test_dump_round_trips(tmp_path):
    config = load_config(None, ["gspo.level=sequence_token", "optim.learning_rate=3e-5"])
    again = load_config(write(tmp_path, dump_config(config)))
    assert again == config
