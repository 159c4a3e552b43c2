"""`fasttune grpo` on the built-in tiny model: advantages, the loss against TRL's way, rewards, resume."""

import json
from pathlib import Path

import pytest
import torch

from fasttune.config import GRPOConfig, load_config
from fasttune.grpo import GRPOTask, train_grpo
from fasttune.models import load_model, load_tokenizer
from fasttune.rewards import final_answer, math_answer
from fasttune.train import TrainingError

ROOT = Path(__file__).resolve().parents[1]
REWARDS = ROOT / "tests" / "grpo_rewards.py"
quiet = lambda *_: None  # noqa: E731


def config(tmp_path, *sets):
    base = [f'run.output_dir={json.dumps(str(tmp_path / "run"))}', "model.load_in_4bit=false",
            f'data.train={json.dumps(str(ROOT / "examples/data/grpo_arithmetic.jsonl"))}']
    return load_config(ROOT / "examples/grpo.toml", base + list(sets), schema=GRPOConfig)


def task_and_model(tmp_path, *sets):
    cfg = config(tmp_path, *sets)
    task = GRPOTask(cfg, load_tokenizer(cfg.model), quiet)
    model = load_model(cfg)
    for n, p in model.named_parameters():  # a non-trivial adapter, so policy != reference
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    task.setup(model, torch.device("cpu"), tmp_path)
    return cfg, task, model


def test_math_answer_and_final_answer():
    assert final_answer("so 3 + 4 = 7. Answer: 7") == 7 and final_answer("\\boxed{12} then 5") == 12
    assert final_answer("1/2") == 0.5 and final_answer("no number") is None
    assert math_answer(None, ["Answer: 7", "7.0", "8", "", "1,000"], ["7", "7", "7", "7", "1000"]) == [1, 1, 0, 0, 1]


def test_advantages_per_group(tmp_path):
    _, task, _ = task_and_model(tmp_path, "grpo.num_generations=3")
    rewards = torch.tensor([1.0, 0.0, 2.0, 5.0, 5.0, 5.0])  # two groups of 3; the second all equal
    adv = task.advantages(rewards)
    assert torch.allclose(adv[:3], (rewards[:3] - 1.0) / (rewards[:3].std() + 1e-4))
    assert torch.equal(adv[3:], torch.zeros(3))
    task.g.scale_rewards = "none"
    assert torch.allclose(task.advantages(rewards)[:3], torch.tensor([0.0, -1.0, 1.0]))


def _plain_loss(model, roll, g, old=None, ref=None, num_items=None):
    """TRL's GRPO loss from full logits (float64 maths)."""
    attn = roll.attention_mask
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=roll.input_ids, attention_mask=attn, position_ids=pos).logits
    P, C = roll.prompt_len, roll.completion_ids.shape[1]
    logp = (logits[:, P - 1 : P - 1 + C].double() / g.temperature).log_softmax(-1)
    logp = logp.gather(-1, roll.completion_ids[..., None])[..., 0]
    m = roll.completion_mask.double()
    old = logp.detach() if old is None else old.double()
    ratio = torch.exp((logp - old) * m)
    A = roll.advantages.double()[:, None]
    per = -torch.min(ratio * A, torch.clamp(ratio, 1 - g.epsilon_low, 1 + g.epsilon_high) * A)
    if ref is not None and g.beta > 0:
        d = (ref.double() - logp) * m
        per = per + g.beta * (torch.exp(d) - d - 1)
    B = len(A)
    if g.loss_type == "grpo":
        return ((per * m).sum(-1) / m.sum(-1).clamp_min(1)).sum() / B
    if g.loss_type == "dr_grpo":
        return (per * m).sum() / (B * g.max_completion_len)
    return (per * m).sum() / (num_items or m.sum())


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_loss_and_gradients_match_trl_with_full_logits(tmp_path, loss_type):
    cfg, task, model = task_and_model(tmp_path, f'grpo.loss_type="{loss_type}"', "grpo.beta=0.1", "grpo.temperature=0.8",
                                      "grpo.num_iterations=2", "grpo.epsilon_high=0.28")
    torch.manual_seed(1)
    roll = task.rollout(task.prompts[:2])  # real samples: num_iterations=2 stores old log-probs, beta the reference's
    assert roll.old_logps is not None and roll.ref_logps is not None
    roll.old_logps = roll.old_logps + 0.3 * torch.randn_like(roll.old_logps)  # so that some ratios clip
    roll.advantages = torch.randn(len(roll.advantages))
    params = [p for p in model.parameters() if p.requires_grad]
    n = task.count(roll)
    ours, stats = task.loss(model, roll, n, torch.device("cpu"))
    g_ours = torch.autograd.grad(ours, params)
    plain = _plain_loss(model, roll, task.g, roll.old_logps, roll.ref_logps, n)
    g_plain = torch.autograd.grad(plain, params)
    assert torch.allclose(ours.double(), plain, rtol=1e-5, atol=1e-7)
    for a, b in zip(g_ours, g_plain):  # atol: the shared prompt's gradient is summed in another order (fp32)
        assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-6)


def test_num_iterations_keeps_the_old_logps(tmp_path):
    cfg, task, model = task_and_model(tmp_path, "grpo.num_iterations=2")
    roll = task.rollout(task.prompts[:2])
    assert torch.allclose(roll.old_logps, task.logps(model, roll), atol=1e-6)  # the sampling policy's
    first, second = (task.stream.plan(0)[i] for i in (0, 1))
    assert first == second  # the same prompts twice in a row: one sample, two optimizer steps
    assert task.stream.build(first) is task.stream.build(second)


def test_truncated_completions_are_masked_when_asked(tmp_path):
    for masked in (False, True):
        _, task, _ = task_and_model(tmp_path / str(masked), "grpo.max_completion_len=3",
                                    f"grpo.mask_truncated_completions={str(masked).lower()}")
        torch.manual_seed(0)
        roll = task.rollout(task.prompts[:2])
        assert roll.truncated.any()
        rows = roll.completion_mask[roll.truncated]
        assert (rows.sum() == 0) if masked else bool(rows.all())


@pytest.mark.parametrize("fn,expect", [("raises", r"reward function .*:raises raised KeyError: 'answer_column' \(on the completion"),
                                       ("too_few", r"returned 1 values for 2 completions"),
                                       ("gives_nan", r"returned nan for the completion")])
def test_bad_reward_functions_are_clear_errors(tmp_path, fn, expect):
    with pytest.raises(TrainingError, match=expect):
        task_and_model(tmp_path, f'grpo.reward_funcs=["{REWARDS}:{fn}"]', "grpo.reward_weights=[]")


def test_reward_spec_errors(tmp_path):
    from fasttune.config import ConfigError

    with pytest.raises(ConfigError, match="neither a built-in"):
        task_and_model(tmp_path, 'grpo.reward_funcs=["nope"]', "grpo.reward_weights=[]")
    with pytest.raises(ConfigError, match="has no function 'missing'"):
        task_and_model(tmp_path, f'grpo.reward_funcs=["{REWARDS}:missing"]', "grpo.reward_weights=[]")
    with pytest.raises(ConfigError, match="reward_weights has 1 values for 2"):
        task_and_model(tmp_path, 'grpo.reward_funcs=["math_answer", "format"]', "grpo.reward_weights=[1.0]")


def test_a_learnable_reward_rises(tmp_path):
    """Reward the letter x: the tiny model learns to write more of it within a few dozen steps."""
    cfg = config(tmp_path, f'grpo.reward_funcs=["{REWARDS}:likes_x"]', "grpo.reward_weights=[]", "train.max_steps=30",
                 "grpo.beta=0.0", "grpo.num_iterations=1", "train.learning_rate=1e-2", "grpo.prompts_per_step=4")
    train_grpo(cfg, log=quiet)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    first, last = sum(r["reward"] for r in rows[:5]) / 5, sum(r["reward"] for r in rows[-5:]) / 5
    assert last > 2 * first and last > 0.1, (first, last)
    assert all(k in rows[-1] for k in ("kl", "entropy", "clip_ratio_region", "frac_equal_groups", "completion_len",
                                       "clipped_completions", "generation_s", "training_s", "reward_std"))


def test_example_runs_and_resumes(tmp_path, capsys):
    from fasttune.cli import main

    out = f'run.output_dir={json.dumps(str(tmp_path / "run"))}'
    assert main(["grpo", str(ROOT / "examples/grpo.toml"), "--set", out, "--set", "train.max_steps=4",
                 "--set", "run.save_every=2"]) == 0
    assert main(["grpo", str(ROOT / "examples/grpo.toml"), "--set", out, "--set", "train.max_steps=6",
                 "--set", "run.save_every=2"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert "reward/math_answer" in rows[0] and "reward/digit_ratio" in rows[0]
    assert main(["check", str(ROOT / "examples/grpo.toml")]) == 0
    assert "reward functions are valid" in capsys.readouterr().out


def test_trl_reward_functions_work_unchanged(tmp_path):
    """Conversational prompts: a reward function written for TRL's GRPOTrainer gets message lists,
    completion_ids and the other columns, as TRL passes them; the built-ins take both forms."""
    rows = [json.loads(line) for line in open(ROOT / "examples/data/grpo_arithmetic.jsonl")][:8]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": r["prompt"] if isinstance(r["prompt"], str)
                                                    else r["prompt"][-1]["content"]}], "answer": r["answer"]}) + "\n"
                            for r in rows))
    cfg = config(tmp_path, f'data.train={json.dumps(str(data))}',
                 f'grpo.reward_funcs=["{REWARDS}:trl_style", "math_answer", "format"]', "grpo.reward_weights=[]",
                 "train.max_steps=1", "grpo.num_generations=2", "grpo.max_completion_len=6", "grpo.num_iterations=1")
    summary = train_grpo(cfg, log=quiet)
    assert summary["steps"] == 1
    assert math_answer(None, [[{"role": "assistant", "content": "so 12"}]], [12]) == [1.0]


def test_string_prompts_reach_rewards_as_written_and_none_is_not_applicable(tmp_path):
    """TRL passes standard-format prompts to reward functions as the strings in the data (no chat
    template), and a reward of None leaves that function out of the sample's sum and of its mean."""
    cfg, task, model = task_and_model(tmp_path, f'grpo.reward_funcs=["{REWARDS}:trl_plain", "{REWARDS}:only_even"]',
                                      "grpo.reward_weights=[1.0, 10.0]")
    raw, total = task.rewards(task.prompts[:2], ["ab", "abcd"], {"answer": [1, 2]}, [[1], [2]])
    assert torch.isnan(raw[1, 1]) and total.tolist() == [2.0 + 10.0, 4.0]


def test_prompts_the_template_refuses_are_skipped_and_counted(tmp_path):
    """A system prompt on a template that allows user/assistant only (Mistral's [INST]) is one skipped
    prompt in the summary, not a traceback."""
    import real_tokenizers

    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?", "answer": 2}) + "\n" + json.dumps(
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "answer": 4}) + "\n")
    cfg = config(tmp_path, f'data.train={json.dumps(str(data))}')
    lines = []
    task = GRPOTask(cfg, real_tokenizers.load("mistral"), lines.append)
    assert len(task.prompts) == 1 and any("1 prompts skipped" in m and "p.jsonl:2" in m for m in lines), lines


def _plain_logps(model, roll, temperature):
    """The completion tokens' log-probs in float64 from the full logits (differentiable)."""
    attn = roll.attention_mask
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=roll.input_ids, attention_mask=attn, position_ids=pos).logits
    P, C = roll.prompt_len, roll.completion_ids.shape[1]
    logp = (logits[:, P - 1 : P - 1 + C].double() / temperature).log_softmax(-1)
    return logp.gather(-1, roll.completion_ids[..., None])[..., 0] * roll.completion_mask


@pytest.mark.parametrize("sets", [
    ['grpo.advantage="reinforce++"', "grpo.beta=0.1", 'grpo.loss_type="dapo"'],
    ['grpo.advantage="reinforce++_baseline"', "grpo.beta=0.1", 'grpo.importance_sampling_level="sequence"',
     'grpo.loss_type="grpo"', "grpo.num_iterations=2"],
    ['grpo.advantage="rloo"', 'grpo.loss_type="cispo"', "grpo.epsilon_high=1.5", "grpo.num_iterations=2"],
])
def test_estimators_and_losses_reach_the_loss(tmp_path, sets):
    """The keys are wired: reinforce++ gets [N, C] advantages from the rewards and the KL of the
    sampling policy to the reference, and no KL term in the loss; the loss is the float64 one."""
    from fasttune.advantages import compute_advantages
    from reference import grpo_reference

    cfg, task, model = task_and_model(tmp_path, *sets, "grpo.temperature=0.8")
    g = task.g
    torch.manual_seed(2)
    roll = task.rollout(task.prompts[:2])
    per_token = g.advantage.startswith("reinforce++")
    assert roll.advantages.shape == ((len(roll.rewards), roll.completion_ids.shape[1]) if per_token
                                     else (len(roll.rewards),))
    sample_logps = task.logps(model, roll)
    want = compute_advantages(g.advantage, roll.rewards, g.num_generations, g.scale_rewards, mask=roll.completion_mask,
                              sample_logps=sample_logps, ref_logps=roll.ref_logps, beta=g.beta)
    torch.testing.assert_close(roll.advantages, want, rtol=1e-4, atol=1e-5)
    if per_token and g.beta > 0:  # the KL moved the advantages: without it they differ
        no_kl = compute_advantages(g.advantage, roll.rewards, g.num_generations, g.scale_rewards,
                                   mask=roll.completion_mask)
        assert not torch.allclose(roll.advantages, no_kl, atol=1e-3)
    if roll.old_logps is not None:
        roll.old_logps = roll.old_logps + 0.3 * torch.randn_like(roll.old_logps)
    params = [p for p in model.parameters() if p.requires_grad]
    n = task.count(roll)
    ours, stats = task.loss(model, roll, n, torch.device("cpu"))
    logp = _plain_logps(model, roll, g.temperature)
    plain, *_ = grpo_reference(logp, roll.completion_mask, roll.advantages, old_logps=roll.old_logps,
                               ref_logps=roll.ref_logps, beta=0.0 if per_token else g.beta, eps_low=g.epsilon_low,
                               eps_high=g.epsilon_high, loss_type=g.loss_type, num_items=n,
                               max_completion_len=g.max_completion_len, level=g.importance_sampling_level)
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(plain, params)):
        assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-6)
    assert torch.allclose(ours.double(), plain.detach(), rtol=1e-5, atol=1e-7)
    assert "advantage_abs" in stats


def test_rloo_raises_a_learnable_reward(tmp_path):
    """As test_a_learnable_reward_rises, with the leave-one-out advantage (TRL RLOOTrainer's default
    scaling, none)."""
    cfg = config(tmp_path, f'grpo.reward_funcs=["{REWARDS}:likes_x"]', "grpo.reward_weights=[]", "train.max_steps=30",
                 "grpo.beta=0.0", "grpo.num_iterations=1", "train.learning_rate=1e-2", "grpo.prompts_per_step=4",
                 'grpo.advantage="rloo"', 'grpo.scale_rewards="none"')
    train_grpo(cfg, log=quiet)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    first, last = sum(r["reward"] for r in rows[:5]) / 5, sum(r["reward"] for r in rows[-5:]) / 5
    assert last > 2 * first and last > 0.1, (first, last)
