"""`fasttune dpo` with the reference-free losses (orpo, simpo, cpo) on the built-in tiny model: the loss
against TRL's way with full logits, no reference forward, config errors, and learning."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fasttune.cli import main
from fasttune.config import DPOConfig, load_config
from fasttune.masks import IGNORE
from fasttune.dpo import DPOTask, train_dpo
from fasttune.models import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
quiet = lambda *_: None  # noqa: E731
KEYS = {"orpo": ["dpo.beta=0.3"], "simpo": ["dpo.beta=2.0", "dpo.simpo_gamma=0.6", "dpo.cpo_alpha=0.2"],
        "cpo": ["dpo.beta=0.1", "dpo.cpo_alpha=0.7", "dpo.label_smoothing=0.1"]}


def config(tmp_path, *sets):
    base = [f'run.output_dir={json.dumps(str(tmp_path / "run"))}', f'data.train={json.dumps(str(DATA / "dpo_pairs.jsonl"))}',
            'data.eval=""', "model.load_in_4bit=false"]
    return load_config(ROOT / "examples" / "dpo.toml", base + list(sets), schema=DPOConfig)


def _task_and_model(tmp_path, *sets):
    cfg = config(tmp_path, *sets)
    task = DPOTask(cfg, load_tokenizer(cfg.model), quiet)
    model = load_model(cfg)
    torch.manual_seed(0)
    for n, p in model.named_parameters():  # a non-trivial adapter (LoRA B starts at 0)
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    return cfg, task, model


def _trl_way(model, batch, loss_type, d, B):
    """TRL's ORPOTrainer / CPOTrainer with full logits: their loss methods on the log-probs, and
    nn.CrossEntropyLoss over the chosen half for the NLL term."""
    from types import SimpleNamespace

    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    y = batch.shift_labels
    mask = y != IGNORE
    lp = (logits.log_softmax(-1).gather(-1, y.clamp_min(0)[..., None])[..., 0] * mask).sum(-1)
    if loss_type != "cpo":
        lp = lp / mask.sum(-1)
    nll = torch.nn.CrossEntropyLoss()(logits[:B].reshape(-1, logits.shape[-1]), y[:B].reshape(-1))
    accel = SimpleNamespace(device=torch.device("cpu"))
    if loss_type == "orpo":
        losses = ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=d.beta, accelerator=accel), lp[:B], lp[B:])[0]
        return nll - losses.mean()
    ns = SimpleNamespace(alpha=0.0, beta=d.beta, label_smoothing=d.label_smoothing, simpo_gamma=d.simpo_gamma,
                         loss_type="sigmoid" if loss_type == "cpo" else "simpo", accelerator=accel)
    return CPOTrainer.cpo_loss(ns, lp[:B], lp[B:])[0].mean() + d.cpo_alpha * nll


@pytest.mark.parametrize("loss_type", ["orpo", "simpo", "cpo"])
def test_loss_and_gradients_match_trl_with_full_logits(tmp_path, loss_type):
    cfg, task, model = _task_and_model(tmp_path, f'dpo.loss_type="{loss_type}"', *KEYS[loss_type])
    batch = task.batch(task.pairs, [3, 4, 5, 6])
    params = [p for p in model.parameters() if p.requires_grad]
    loss, stats = task.loss(model, batch, 4, torch.device("cpu"))
    ours = torch.autograd.grad(loss, params)
    trl = _trl_way(model, batch, loss_type, cfg.dpo, 4)
    theirs = torch.autograd.grad(trl, params)
    assert torch.allclose(loss, trl, rtol=1e-5)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert "nll_loss" in stats and ("log_odds_ratio" in stats) == (loss_type == "orpo")


@pytest.mark.parametrize("loss_type", ["orpo", "simpo", "cpo"])
def test_no_reference_forward_and_no_reference_adapter(tmp_path, loss_type):
    """One forward of the model per loss (DPO takes two: policy and reference); setup loads nothing."""
    cfg, task, model = _task_and_model(tmp_path, f'dpo.loss_type="{loss_type}"')
    calls = []
    base = model.get_base_model().model
    handle = base.register_forward_hook(lambda *_: calls.append(1))
    task.setup(model, torch.device("cpu"), tmp_path)
    assert "reference" not in model.peft_config and not task.ref
    task.loss(model, task.batch(task.pairs, [0, 1]), 2, torch.device("cpu"))
    assert len(calls) == 1
    _, dpo, _ = _task_and_model(tmp_path / "d")  # the check can fail: DPO's sigmoid runs the reference too
    dpo.loss(model, dpo.batch(dpo.pairs, [0, 1]), 2, torch.device("cpu"))
    assert len(calls) == 3
    handle.remove()


def test_full_finetune_needs_no_reference(tmp_path):
    """model.finetune = "full" is refused for DPO without precompute, but fine for orpo (no reference)."""
    cfg = config(tmp_path, 'dpo.loss_type="orpo"', 'model.finetune="full"')
    DPOTask(cfg, load_tokenizer(cfg.model), quiet)


@pytest.mark.parametrize("sets,expect", [
    (['dpo.loss_type="simpo"', 'dpo.reference="precompute"'], 'dpo.loss_type = "simpo" uses no reference model'),
    (['dpo.loss_type="cpo"', "dpo.sft_weight=0.5"], "weighted by dpo.cpo_alpha"),
    (['dpo.loss_type="orpo"', "dpo.sft_weight=0.5"], "always on"),
    (['dpo.loss_type="orpo"', "dpo.label_smoothing=0.1"], "dpo.label_smoothing is not part of ORPO"),
    (['dpo.loss_type="cpo"', "dpo.cpo_alpha=-1"], "cpo_alpha must be >= 0"),
])
def test_bad_config_is_one_line(tmp_path, capsys, sets, expect):
    args = ["dpo", str(ROOT / "examples/dpo.toml"), "--set", f'run.output_dir={json.dumps(str(tmp_path / "r"))}']
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expect in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("loss_type", ["orpo", "simpo", "cpo"])
def test_learns_the_rule(tmp_path, loss_type):
    """The example's rule (chosen ends with "!") in a few steps: reward accuracy well above 0.5."""
    summary = train_dpo(config(tmp_path, f'dpo.loss_type="{loss_type}"', *KEYS[loss_type], "train.max_steps=8",
                               'train.lr_scheduler="constant"', "train.warmup_steps=0"), log=quiet)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows[-1]["reward_accuracy"] > 0.5 and rows[-1]["reward_margin"] > rows[0]["reward_margin"], rows[-1]
    assert summary["last"]["reward_accuracy"] == rows[-1]["reward_accuracy"]
