"""`fasttune reward`: the trained reward model loads in transformers as a sequence classifier with
its PEFT adapter and gives the same scores; the loss equals TRL's RewardTrainer's on them (margin,
center_rewards_coefficient); eval metrics; reward models as GRPO rewards; bad input."""

import json
from pathlib import Path

import pytest
import torch

from fasttune.builtin import byte_tokenizer
from fasttune.cli import main
from fasttune.config import GRPOConfig, RewardConfig, load_config
from fasttune.data import DataError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
TOK = byte_tokenizer()
quiet = lambda *_: None  # noqa: E731


def config(tmp_path, *sets, name="run"):
    base = [f'run.output_dir={json.dumps(str(tmp_path / name))}', f'data.train={json.dumps(str(DATA / "dpo_pairs.jsonl"))}',
            'data.eval=""', "model.load_in_4bit=false", "run.eval_every=0"]
    return load_config(ROOT / "examples" / "reward.toml", base + list(sets), schema=RewardConfig)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A reward model trained 3 steps on pairs with a margin column (so LoRA and the head have moved)."""
    from fasttune.reward import train_reward

    tmp = tmp_path_factory.mktemp("rm")
    rows = [json.loads(line) for line in open(DATA / "dpo_pairs.jsonl")][:48]
    with open(tmp / "pairs.jsonl", "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({**r, "margin": (i % 3) * 0.5}) + "\n")
    cfg = config(tmp, f'data.train={json.dumps(str(tmp / "pairs.jsonl"))}', "train.max_steps=3",
                 "reward.center_rewards_coefficient=0.1")
    train_reward(cfg, log=quiet)
    return cfg, tmp / "run" / "checkpoints" / "step-000003"


def test_loads_in_transformers_and_matches_trl_reward_trainer(trained, tmp_path):
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig as TRLConfig, RewardTrainer

    from fasttune import builtin
    from fasttune.reward import RewardTask, load_reward_model

    cfg, ck = trained
    assert json.loads((ck / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    seqcls = AutoModelForSequenceClassification.from_pretrained(builtin.resolve(cfg.model.path), num_labels=1,
                                                                pad_token_id=TOK.pad_token_id)
    hf = PeftModel.from_pretrained(seqcls, str(ck)).eval()
    ours = load_reward_model(cfg, torch.device("cpu"), ck, trainable=False).eval()
    task = RewardTask(cfg, TOK, quiet)
    batch = task.batch(task.pairs, [0, 1, 2, 3, 4, 5])
    assert batch.margin is not None and batch.margin.tolist() == [0.0, 0.5, 1.0, 0.0, 0.5, 1.0]
    with torch.no_grad():
        want = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1)
        loss, stats = task.loss(ours, batch, 6, torch.device("cpu"))
        from fasttune.reward import scores

        got = scores(ours, batch.input_ids, batch.attention_mask, TOK.pad_token_id)
    assert want.std() > 0 and torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    # TRL's RewardTrainer.compute_loss on the transformers model, same inputs, margin and centring
    args = TRLConfig(output_dir=str(tmp_path / "trl"), center_rewards_coefficient=0.1, report_to=[], use_cpu=True,
                     bf16=False)
    trainer = RewardTrainer(model=hf, args=args, processing_class=TOK,
                            train_dataset=Dataset.from_list([json.loads(next(open(DATA / "dpo_pairs.jsonl")))]))
    hf.eval()
    with torch.no_grad():
        theirs = trainer.compute_loss(hf, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                                           "margin": batch.margin})
    assert torch.allclose(loss, theirs, rtol=1e-5)
    assert float(stats["accuracy"]) == pytest.approx(trainer._metrics["eval"]["accuracy"][-1])


def test_scalar_head_is_trained_and_saved(trained):
    from safetensors.torch import load_file

    cfg, ck = trained
    keys = load_file(ck / "adapter_model.safetensors")
    assert any(k.endswith("score.weight") for k in keys) and any("lora_A" in k for k in keys)


def test_eval_reports_accuracy_and_margin(trained, capsys):
    cfg, ck = trained
    run = ck.parent.parent
    assert main(["eval", str(run / "config.toml"), "--set", f'data.eval={json.dumps(str(DATA / "dpo_pairs_eval.jsonl"))}']) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= metrics["eval_accuracy"] <= 1 and "eval_margin" in metrics and metrics["eval_pairs"] == 20


def test_reward_models_as_grpo_rewards(trained, tmp_path, capsys):
    from fasttune.grpo import GRPOTask
    from fasttune.reward import RewardModel

    cfg, ck = trained
    run = ck.parent.parent
    g = load_config(ROOT / "examples" / "grpo.toml", [f'data.train={json.dumps(str(DATA / "grpo_arithmetic.jsonl"))}',
                    'data.eval=""', "model.load_in_4bit=false", 'grpo.reward_funcs=["format"]',
                    f"grpo.reward_models=[{json.dumps(str(run))}]", "grpo.reward_weights=[0.5, 2.0]"], schema=GRPOConfig)
    task = GRPOTask(g, TOK, quiet)
    prompts = task.prompts[:3]
    completions = ["Answer: 4", "no idea", "Answer: 7!"]
    raw, total = task.rewards(prompts, completions, {k: [p["columns"][k] for p in prompts] for k in prompts[0]["columns"]},
                              [[0]] * 3)
    direct = RewardModel(str(run), torch.device("cpu"))([p["raw"] for p in prompts], completions)
    assert torch.allclose(raw[:, 1], torch.tensor(direct), rtol=1e-5)
    assert torch.allclose(total, 0.5 * raw[:, 0] + 2.0 * raw[:, 1])
    # a path that is not a reward model: one line naming the key
    sft_like = json.dumps(str(DATA))
    assert main(["grpo", str(ROOT / "examples" / "grpo.toml"), "--set", f"grpo.reward_models=[{sft_like}]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "grpo.reward_models" in err and "is not a reward model" in err


def test_reward_model_with_another_tokenizer_renders_the_text_again(trained, tmp_path):
    """A reward model trained with another chat template scores the text rendered with its own."""
    from fasttune.reward import RewardModel, train_reward

    cfg, _ = trained
    template = ("{% for m in messages %}{{ '### ' + m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '### assistant: ' }}{% endif %}")
    other = config(tmp_path, "train.max_steps=1", f"model.chat_template={json.dumps(template)}", name="other")
    train_reward(other, log=quiet)
    rm = RewardModel(str(tmp_path / "other"), torch.device("cpu"))
    prompt, completion = [{"role": "user", "content": "Add 2 and 2."}], "4!"
    ids = rm.tok("### user: Add 2 and 2.\n### assistant: 4!\n", add_special_tokens=False)["input_ids"]
    from fasttune.reward import scores

    with torch.no_grad():
        want = scores(rm.model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), rm.tok.pad_token_id)
    assert rm([prompt], [completion]) == pytest.approx(want.tolist(), rel=1e-5)


def test_bad_margin_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}) + "\n")
    assert main(["reward", str(ROOT / "examples" / "reward.toml"), "--set", f"data.train={json.dumps(str(bad))}",
                 "--set", 'data.eval=""']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.jsonl" in err and "'margin' must be a number" in err


def test_example_learns(tmp_path):
    """examples/reward.toml: held-out pair accuracy near 1 within a few dozen steps."""
    from fasttune.reward import train_reward

    cfg = config(tmp_path, f'data.eval={json.dumps(str(DATA / "dpo_pairs_eval.jsonl"))}', "train.max_steps=12",
                 "run.eval_every=12")
    out = train_reward(cfg, log=quiet)
    assert out["last"]["eval_accuracy"] >= 0.9
