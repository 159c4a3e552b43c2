"""The TOML config: strict keys with suggestions, types, values, --set, resolved output."""

import tomllib

import pytest

from fasttune.config import ConfigError, SFTConfig, load_config, parse_config, resolved_toml


def write(tmp_path, text):
    p = tmp_path / "run.toml"
    p.write_text(text)
    return p


def test_defaults_and_values(tmp_path):
    cfg = load_config(write(tmp_path, '[train]\nlearning_rate = 1e-4\nmax_steps = 5\n[data]\ntrain = "a.jsonl"\n'))
    assert cfg.train.learning_rate == 1e-4 and cfg.train.max_steps == 5 and cfg.data.train == "a.jsonl"
    assert cfg.model.path == "builtin:tiny-llama" and cfg.lora.target_modules == "all-linear"
    assert cfg.data.roles == {} and SFTConfig().data.roles is not cfg.data.roles


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    p = write(tmp_path, '[train]\nseed = 1\nlerning_rate = 1e-4\n')
    with pytest.raises(ConfigError, match=r"run\.toml:3: \[train\] lerning_rate is not a known key; did you mean 'learning_rate'"):
        load_config(p)


def test_misplaced_key_says_where_it_belongs(tmp_path):
    with pytest.raises(ConfigError, match=r":2: \[model\] learning_rate is not a \[model\] key: it belongs in \[train\]"):
        load_config(write(tmp_path, "[model]\nlearning_rate = 1e-4\n"))
    with pytest.raises(ConfigError, match=r"'max_steps' belongs in \[train\]"):
        load_config(write(tmp_path, "max_steps = 3\n"))


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section \[trian\]; did you mean 'train'"):
        load_config(write(tmp_path, "[trian]\nseed = 1\n"))


def test_wrong_type_and_bad_choice(tmp_path):
    with pytest.raises(ConfigError, match=r":2: \[train\] grad_accum must be int, got str"):
        load_config(write(tmp_path, '[train]\ngrad_accum = "4"\n'))
    with pytest.raises(ConfigError, match=r"\[data\] overlong = 'trunc' is not one of .*choose from 'truncate'|did you mean 'truncate'"):
        load_config(write(tmp_path, '[data]\noverlong = "trunc"\n'))
    with pytest.raises(ConfigError, match=r"\[train\] micro_batch_size must be >= 1"):
        load_config(write(tmp_path, "[train]\nmicro_batch_size = 0\n"))
    with pytest.raises(ConfigError, match="must be bool"):
        load_config(write(tmp_path, "[data]\npacking = 1\n"))


def test_int_accepted_for_float(tmp_path):
    assert load_config(write(tmp_path, "[train]\nlearning_rate = 1\n")).train.learning_rate == 1.0


def test_overrides(tmp_path):
    p = write(tmp_path, "[train]\nmax_steps = 5\n")
    cfg = load_config(p, ["train.max_steps=7", "data.train=x.json", 'lora.target_modules=["q_proj", "v_proj"]'])
    assert cfg.train.max_steps == 7 and cfg.data.train == "x.json" and cfg.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(p, ["max_steps=3"])
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        load_config(p, ["train.max_step=3"])


def test_missing_and_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[train\nx = 1\n"))


def test_resolved_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, '[data]\nroles = { narrator = "assistant" }\ntrainable_roles = ["narrator"]\n'))
    again = parse_config(tomllib.loads(resolved_toml(cfg)))
    assert again == cfg


def test_readme_reference_is_current():
    """The README's configuration tables are generated from the config's own docs: keep them in sync."""
    from pathlib import Path

    from fasttune.config import (dpo_reference_markdown, grpo_reference_markdown, kto_reference_markdown,
                                 reference_markdown, reward_reference_markdown)

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert reference_markdown() in readme, "run: python -m fasttune.config and paste it into the README"
    assert dpo_reference_markdown() in readme, "run: python -m fasttune.config and paste it into the README"
    assert grpo_reference_markdown() in readme, "run: python -m fasttune.config and paste it into the README"
    assert kto_reference_markdown() in readme, "run: python -m fasttune.config and paste it into the README"
    assert reward_reference_markdown() in readme, "run: python -m fasttune.config and paste it into the README"
