"""`fasttune ppo`: GAE, whitening, the per-token rewards and the clipped value loss against the formulas
of TRL's PPOTrainer (trl 0.20, trainer/ppo_trainer.py and core.py; TRL 1.x no longer ships it), written
out here in float64 loops; then the command end to end on the built-in tiny model: the critic adapter
is saved and restored, the reward rises, bad configs are one line."""

import json
import math
from pathlib import Path

import pytest
import torch

from fasttune.ppo import gae, masked_whiten, per_token_kl, token_rewards, value_loss

ROOT = Path(__file__).resolve().parents[1]


def trl_gae(rewards, values, gamma, lam):
    """TRL 0.20 PPOTrainer: lastgaelam over t from the end, nextvalues 0 past the last position."""
    T = rewards.shape[1]
    lastgaelam, out = 0.0, []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        out.append(lastgaelam)
    adv = torch.stack(out[::-1], 1)
    return adv, adv + values


def trl_whiten(x, mask, shift_mean=True):
    """trl.core.masked_whiten: masked mean, unbiased masked variance, rsqrt(var + 1e-8)."""
    mean = (x * mask).sum() / mask.sum()
    var = ((x - mean) ** 2 * mask).sum() / mask.sum() * mask.sum() / (mask.sum() - 1)
    w = (x - mean) * torch.rsqrt(var + 1e-8)
    return w if shift_mean else w + mean


def random_batch(N=5, C=9):
    lengths = torch.tensor([9, 1, 4, 7, 9])[:N]
    mask = torch.arange(C)[None, :] < lengths[:, None]
    return mask, torch.randn(N, C, dtype=torch.float64), torch.randn(N, C, dtype=torch.float64)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (1.0, 1.0), (0.99, 0.0)])
def test_gae_equals_trl(gamma, lam):
    mask, rewards, values = random_batch()
    m = mask.double()
    adv, ret = gae(rewards, values, mask, gamma, lam)
    want_adv, want_ret = trl_gae(rewards * m, values * m, gamma, lam)  # TRL masks both to 0 past the end
    torch.testing.assert_close(adv, want_adv)
    torch.testing.assert_close(ret, want_ret)
    # γ = λ = 1: the advantage is the return to go minus the value
    if gamma == lam == 1.0:
        rtg = (rewards * m).flip(1).cumsum(1).flip(1)
        torch.testing.assert_close(adv * m, (rtg - values) * m)


def test_whiten_equals_trl():
    mask, x, _ = random_batch()
    m = mask.double()
    torch.testing.assert_close(masked_whiten(x, mask), trl_whiten(x, m))
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), trl_whiten(x, m, shift_mean=False))
    w = masked_whiten(x, mask)[mask]
    assert abs(float(w.mean())) < 1e-12 and abs(float(w.std()) - 1) < 1e-6


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_token_rewards(estimator):
    mask, logp, ref = random_batch()
    logp, ref = -logp.abs(), -ref.abs()
    scores = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0], dtype=torch.float64)
    rewards, kl = token_rewards(scores, logp, ref, mask, 0.05, estimator)
    logr = ref - logp
    want_kl = (-logr if estimator == "k1" else logr.exp() - 1 - logr) * mask  # TRL: kl_estimator k1 / k3
    want = -0.05 * want_kl
    for i, n in enumerate(mask.sum(1).tolist()):
        want[i, n - 1] += scores[i]  # the sequence reward on its last token
    torch.testing.assert_close(kl, want_kl)
    torch.testing.assert_close(rewards, want)
    assert (rewards[~mask] == 0).all()
    if estimator == "k3":
        assert (kl >= 0).all()  # k3 is never negative
    torch.testing.assert_close(per_token_kl(logp, logp, estimator), torch.zeros_like(logp))


def test_value_loss_is_trls_clipped_loss():
    mask, v, r = random_batch()
    old = v + 0.5 * torch.randn_like(v)
    loss, frac = value_loss(v, old, r, mask, 0.2, n_items=int(mask.sum()))
    clipped = torch.clamp(v, old - 0.2, old + 0.2)  # TRL's vpredclipped
    want = 0.5 * (torch.max((v - r) ** 2, (clipped - r) ** 2) * mask).sum() / mask.sum()  # 0.5 · masked_mean
    torch.testing.assert_close(loss, want)
    assert 0 < float(frac) < 1


def run_cli(*args):
    from fasttune.cli import main

    return main(list(args))


def sets(tmp_path, *more):
    return [x for s in (f'run.output_dir={json.dumps(str(tmp_path / "run"))}', *more) for x in ("--set", s)]


def test_ppo_learns_saves_its_critic_and_resumes(tmp_path):
    """The example's reward (digit_ratio) rises; each checkpoint holds the critic adapter and value head,
    and a resumed run's critic is the saved one."""
    assert run_cli("ppo", str(ROOT / "examples/ppo.toml"), *sets(tmp_path, "train.max_steps=8", "run.save_every=4")) == 0
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    first, last = sum(r["reward"] for r in rows[:3]) / 3, sum(r["reward"] for r in rows[-3:]) / 3
    assert last > 2 * first and last > first + 1.0, (first, last)  # 10 × digit_ratio: about 0.5 at the start
    assert all(k in rows[-1] for k in ("value_loss", "value_clipfrac", "kl", "non_score_reward", "policy_loss",
                                       "generation_s", "training_s"))
    ck = tmp_path / "run" / "checkpoints" / "step-000008"
    from safetensors.torch import load_file

    critic = load_file(ck / "critic" / "adapter_model.safetensors")
    assert any("v_head" in k for k in critic) and any("lora_A" in k for k in critic)
    # loading the checkpoint restores the critic saved there
    from fasttune.config import load_config
    from fasttune.models import load_model, load_tokenizer
    from fasttune.ppo import CRITIC, PPOTask

    cfg = load_config(ROOT / "examples/ppo.toml", [f'run.output_dir={json.dumps(str(tmp_path / "run"))}'])
    task = PPOTask(cfg, load_tokenizer(cfg.model), lambda *_: None)
    model = load_model(cfg, torch.device("cpu"))
    task.setup(model, torch.device("cpu"), tmp_path / "run")
    from fasttune import checkpoint
    from peft import get_peft_model_state_dict

    before = {k: v.clone() for k, v in get_peft_model_state_dict(model, adapter_name=CRITIC).items()}
    opt = torch.optim.AdamW(task.trainable)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    checkpoint.load(ck, model, opt, sched, checkpoint.fingerprint(cfg))
    after = get_peft_model_state_dict(model, adapter_name=CRITIC)
    for k, v in critic.items():
        key = k if k in after else k.replace(f".{CRITIC}.", ".")
        assert torch.equal(after[key], v.to(after[key].dtype)), k
    assert any(not torch.equal(before[k], after[k]) for k in after)


def test_bad_configs_are_one_line(tmp_path, capsys):
    assert run_cli("ppo", str(ROOT / "examples/ppo.toml"), *sets(tmp_path, "ppo.reward_funcs=[]")) == 2
    assert "[ppo] has no reward" in capsys.readouterr().err
    assert run_cli("ppo", str(ROOT / "examples/ppo.toml"), *sets(tmp_path, "ppo.reward_weights=[1.0, 2.0]")) == 2
    assert "ppo.reward_weights has 2 values for 1 rewards" in capsys.readouterr().err
    assert run_cli("ppo", str(ROOT / "examples/ppo.toml"), *sets(tmp_path, "ppo.gamma=-1")) == 2
    assert "gamma" in capsys.readouterr().err
    assert run_cli("ppo", str(ROOT / "examples/ppo.toml"), *sets(tmp_path, 'model.finetune="full"')) == 2
    assert "critic is a second LoRA adapter" in capsys.readouterr().err


def test_check_and_eval(tmp_path, capsys):
    assert run_cli("check", str(ROOT / "examples/ppo.toml")) == 0
    assert "rewards are valid" in capsys.readouterr().out
    assert run_cli("eval", str(ROOT / "examples/ppo.toml"), "--adapter", "base",
                   "--set", "ppo.prompts_per_step=4", "--set", "data.train=" + json.dumps(str(tmp_path / "p.jsonl"))) == 2
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"{i} + {i} ="}) + "\n" for i in range(4)))
    assert run_cli("eval", str(ROOT / "examples/ppo.toml"), "--adapter", "base",
                   "--set", "data.train=" + json.dumps(str(tmp_path / "p.jsonl"))) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    metrics = json.loads(out)
    assert "eval_reward/digit_ratio" in metrics and math.isfinite(metrics["eval_reward"])
