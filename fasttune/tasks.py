"""The task interface and the registry of commands.

Each training command (`fasttune sft|dpo|grpo|kto|reward|ppo`) is one task: a config schema
(config.py) and a class that implements `Task` below. `TASKS` maps the command's name to them. The
CLI, config loading, `fasttune check`, `fasttune eval`, checkpoints and the training loop ask this
registry (or the task object) what to do; none of them tests a task's name or knows its metric keys.

The registry stores "module:attribute" references, imported only when a command needs them, so that
reading a config or listing the commands does not import torch or transformers.

Adding a task (CONTRIBUTING.md has the steps): one module with the task class, its `check` and
`metrics` functions, and one `TaskSpec` line in `TASKS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol


class Task(Protocol):
    """What the training loop (fasttune/train.py) needs from a task, built as `cls(cfg, tok, log, dist)`
    on every rank: the batches, what each counts, the loss, the held-out evaluation, and the metrics it adds.

    One optimizer step takes `grad_accum` micro-batches from `stream`; their `count`s, summed over the
    step (and over ranks), are the normalizer `n_items` given to every `loss` call, so the summed
    gradient is the mean over the whole accumulated batch."""

    name: ClassVar[str]  # the progress bar's label
    # loss.png's panels beside the loss: (title, metric keys); keys None means "reward" and every "reward/..."
    panels: ClassVar[tuple[tuple[str, list[str] | None], ...]]
    # metrics that are seconds per micro-batch spent outside training (sampling, say): the loop reports them
    # per step, and training_s, the step's time without them
    timings: ClassVar[tuple[str, ...]]
    stream: Any  # batches.Stream: endless micro-batches, with a position that checkpoints restore
    # set by the loop before the first step: run(fn, *args) calls fn(model, *args) on the wrapped
    # (DDP/FSDP2) model, for a task that needs the model outside `loss` (GRPO samples with it)
    run: Callable[..., Any] | None

    def setup(self, model, dev, run_dir, dist=None) -> None:
        """Once the model is loaded, before the optimizer: adapters, reference log-probs, stop tokens."""

    def count(self, batch) -> int:
        """What the micro-batch counts for the normalizer: trained tokens, pairs, completions."""

    def loss(self, model, batch, n_items, dev) -> tuple[Any, dict]:
        """(the micro-batch's share of the step's loss, its metrics as per-micro-batch means)."""

    def evaluate(self, model, dev, autocast) -> float | dict | None:
        """On the eval data: the eval loss, or a dict of eval_* metrics; None without eval data."""


@dataclass(frozen=True)
class TaskSpec:
    """One command: its config schema and task, as "module:attribute" references."""

    schema: str  # the config dataclass
    task: str  # the class implementing Task
    section: str | None  # the config section only this command has (how a config names its command); None: the default
    help: str  # the CLI's one line
    check: str  # fn(cfg, tok): validate the config and data, print what a run would train on, train nothing
    metrics: str  # fn(cfg, tok, model, dev, split, log) -> dict: `fasttune eval`'s held-out metrics
    model: str = "fasttune.models:load_model"  # fn(cfg, dev) -> the model to train
    inference_model: str = "fasttune.infer:model_for"  # fn(cfg, checkpoint, dev, base=...) -> the model to evaluate

    def load(self, field: str):
        module, _, attr = getattr(self, field).partition(":")
        return getattr(importlib.import_module(module), attr)


TASKS: dict[str, TaskSpec] = {
    "sft": TaskSpec("fasttune.config:SFTConfig", "fasttune.sft:SFTTask", None,
                    "supervised fine-tuning from a TOML config", "fasttune.sft:check", "fasttune.sft:metrics"),
    "dpo": TaskSpec("fasttune.config:DPOConfig", "fasttune.dpo:DPOTask", "dpo",
                    "preference training (DPO) from a TOML config with a [dpo] section",
                    "fasttune.dpo:check", "fasttune.dpo:metrics"),
    "grpo": TaskSpec("fasttune.config:GRPOConfig", "fasttune.grpo:GRPOTask", "grpo",
                     "online RL (GRPO) with reward functions, from a config with a [grpo] section",
                     "fasttune.grpo:check", "fasttune.grpo:metrics"),
    "kto": TaskSpec("fasttune.config:KTOConfig", "fasttune.kto:KTOTask", "kto",
                    "KTO on completions labelled desirable or not, from a config with a [kto] section",
                    "fasttune.kto:check", "fasttune.kto:metrics"),
    "reward": TaskSpec("fasttune.config:RewardConfig", "fasttune.reward:RewardTask", "reward",
                       "train a reward model (LoRA + a scalar head) on preference pairs, from a config with a [reward] section",
                       "fasttune.reward:check", "fasttune.reward:metrics",
                       model="fasttune.reward:load_reward_model", inference_model="fasttune.reward:model_for_eval"),
    "ppo": TaskSpec("fasttune.config:PPOConfig", "fasttune.ppo:PPOTask", "ppo",
                    "RLHF with PPO: a critic, GAE and clipped losses, against reward functions or reward models",
                    "fasttune.ppo:check", "fasttune.ppo:metrics"),
}


def for_sections(sections) -> TaskSpec:
    """The command of a config holding these sections: the one whose own section is there, else the default."""
    found = [s for s in TASKS.values() if s.section and s.section in sections]
    return found[0] if found else next(s for s in TASKS.values() if s.section is None)


def for_config(cfg) -> TaskSpec:
    """The command whose schema `cfg` is."""
    for spec in TASKS.values():
        if type(cfg) is spec.load("schema"):
            return spec
    raise KeyError(f"{type(cfg).__name__} is the schema of no command in fasttune.tasks.TASKS")
