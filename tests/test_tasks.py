"""The task registry: every command's task implements the Task protocol, and a new command is one
module plus one line in TASKS (here a toy task registered from this file: the CLI, `check`, the loop,
its metrics, loss.png's panels and the checkpoint fingerprint take it with no other edit)."""

import inspect
import json
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fasttune import tasks
from fasttune.cli import main
from fasttune.config import SFTConfig, load_config
from fasttune.tasks import TASKS, Task, TaskSpec
from fasttune.sft import SFTTask

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", sorted(TASKS))
def test_every_task_implements_the_protocol(command):
    spec = TASKS[command]
    cls = spec.load("task")
    for name, want in vars(Task).items():
        if inspect.isfunction(want) and not name.startswith("_"):
            got = getattr(cls, name, None)
            assert callable(got), f"{cls.__name__} has no {name}()"
            args = list(inspect.signature(want).parameters)
            inspect.signature(got).bind(*args)  # takes the protocol's arguments (TypeError if not)
    for name in ("name", "panels", "timings", "run"):
        assert hasattr(cls, name), f"{cls.__name__}.{name}"
    assert cls.name == command
    assert all(isinstance(title, str) and (keys is None or isinstance(keys, list)) for title, keys in cls.panels)
    for ref in ("schema", "check", "metrics"):
        assert callable(spec.load(ref)), f"{command}: {ref}"


@pytest.mark.parametrize("command", sorted(TASKS))
def test_a_config_names_its_command(command):
    """`fasttune check` and `eval` take the schema of the command whose own section the config has."""
    cfg = load_config(ROOT / "examples" / f"{command}.toml")
    assert type(cfg) is TASKS[command].load("schema")
    assert tasks.for_config(cfg) is TASKS[command]


# ---- a new command, registered from here ---------------------------------------------------------


@dataclass
class ToySection:
    weight: float = 1.0


@dataclass
class ToyConfig(SFTConfig):
    toy: ToySection = field(default_factory=ToySection)


class ToyTask(SFTTask):
    """SFT with an extra metric, an extra panel and a step time of its own."""

    name = "toy"
    panels = (("toy weight", ["toy_weight"]),)
    timings = ("toy_s",)

    def loss(self, model, batch, n_items, dev):
        loss, _ = super().loss(model, batch, n_items, dev)
        time.sleep(0.05)  # time spent outside training, as GRPO's sampling is
        return loss * self.cfg.toy.weight, {"toy_weight": self.cfg.toy.weight, "toy_s": 0.05}


def check_toy(cfg, tok):
    print(f"toy check: weight {cfg.toy.weight}")


def test_a_new_task_is_one_module_and_one_registry_line(tmp_path, monkeypatch, capsys):
    here = __name__
    monkeypatch.setitem(TASKS, "toy", TaskSpec(f"{here}:ToyConfig", f"{here}:ToyTask", "toy", "a toy command",
                                               f"{here}:check_toy", "fasttune.sft:metrics"))
    body = (ROOT / "examples" / "sft.toml").read_text().replace('"examples/', f'"{ROOT}/examples/')
    toml = tmp_path / "toy.toml"
    toml.write_text(body + "\n[toy]\nweight = 0.5\n")
    run = tmp_path / "run"
    sets = ["--set", f"run.output_dir={json.dumps(str(run))}", "--set", "train.max_steps=2", "--set", 'data.eval=""']

    assert main(["check", str(toml), *sets]) == 0
    assert "toy check: weight 0.5" in capsys.readouterr().out
    assert main(["toy", str(toml), *sets, "--set", "run.log_every=1"]) == 0
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        # one micro-batch a step (grad_accum 1) with 0.05 s outside training; training_s is the step's rest
        assert r["toy_weight"] == 0.5 and r["toy_s"] == 0.05 and r["training_s"] >= 0
    assert rows[0]["training_s"] <= rows[0]["elapsed_s"] - 0.05 + 0.01  # the first step's time is elapsed_s
    assert (run / "loss.png").is_file()
    assert tomllib.loads((run / "config.toml").read_text())["toy"] == {"weight": 0.5}
    # the fingerprint holds the toy section: resuming with another weight is refused
    code = main(["toy", str(toml), *sets, "--set", "train.max_steps=3", "--set", "toy.weight=0.7"])
    assert code == 2 and "toy.weight" in capsys.readouterr().err
