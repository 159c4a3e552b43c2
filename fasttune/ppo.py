"""PPO with a critic on the shared training loop: `fasttune ppo config.toml` (classic RLHF).

For each micro-batch of prompts (TRL's PPOTrainer, OpenRLHF's PPO):
- sample completions from the policy, as GRPO does (fasttune/rollout.py: a merged dense copy or the live
  4-bit model), and score them with reward functions and/or trained reward models
  (`ppo.reward_funcs`, `ppo.reward_models`, `ppo.reward_weights`);
- without gradients: the policy's log-probs (the "old" ones of the ratio), the reference's (the base
  with the adapters off) and the critic's values V_t;
- per-token rewards: -β·KL_t on every completion token (`k1`: log π - log π_ref; `k3`: (r - 1) - log r
  with r = π_ref / π), plus the sequence reward on its last token, the end-of-turn token (TRL puts it
  one position later, on the first padding token; OpenRLHF on the last token, as here);
- GAE: δ_t = r_t + γ·V_{t+1} - V_t, A_t = δ_t + γλ·A_{t+1} (V and r are 0 past the completion);
  returns R_t = A_t + V_t; the advantages are whitened over the batch's completion tokens;
- `ppo_epochs` optimizer steps on those samples: the clipped policy loss (`grpo_loss` with per-token
  advantages, a token mean: TRL's masked_mean) plus vf_coef × the clipped value loss
  0.5·max((V - R)², (V_old + clip(V - V_old, ±cliprange_value) - R)²), a token mean too.

The critic is a second LoRA adapter ("critic") on the same frozen base with a value head `v_head`
(Linear(hidden, 1), read at every completion position): one copy of the base in memory. PEFT saves it
in each checkpoint's critic/ folder (the head through modules_to_save) and the loop restores it on
resume; generate, chat, eval and merge load the policy's adapter alone.
"""

import contextlib
import time

import torch

from fasttune.kernels import grpo_loss

from .config import ConfigError, GRPOConfig, GRPOSection
from .grpo import GRPOTask, score

CRITIC = "critic"


def per_token_kl(logps, ref_logps, estimator="k1"):
    """KL_t of the sampling policy to the reference, per token (TRL's kl_estimator)."""
    logr = ref_logps - logps
    return -logr if estimator == "k1" else logr.exp() - 1 - logr


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / std over the masked entries, the variance unbiased (TRL's masked_whiten); with
    shift_mean=False the mean is added back (only scaled)."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n
    var = ((x - mean) ** 2 * m).sum() / n * (n / (n - 1)) if n > 1 else torch.zeros_like(mean)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def token_rewards(scores, logps, ref_logps, mask, kl_coef, estimator="k1"):
    """[N, C]: -kl_coef·KL_t on the completion tokens, plus each sequence's score on its last one."""
    m = mask.to(logps.dtype)
    kl = per_token_kl(logps, ref_logps, estimator) * m
    rewards = -kl_coef * kl
    last = (m.shape[1] - 1 - m.flip(1).argmax(1)).long()  # the last completion token of each row
    rewards[torch.arange(len(last)), last] += scores.to(rewards.dtype) * (m.sum(1) > 0)
    return rewards, kl


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation over [N, C]; rewards and values are taken as 0 off the mask
    (after a completion's end). Returns (advantages, returns = advantages + values)."""
    m = mask.to(rewards.dtype)
    r, v = rewards * m, values * m
    adv = torch.zeros_like(r)
    last = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        next_v = v[:, t + 1] if t + 1 < r.shape[1] else torch.zeros_like(last)
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    return adv, adv + v


def value_loss(values, old_values, returns, mask, clip, n_items):
    """0.5·max((V - R)², (V_clipped - R)²) summed over the masked tokens / n_items, and the clipped fraction."""
    m = mask.to(values.dtype)
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    a, b = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * (torch.maximum(a, b) * m).sum() / n_items
    frac = ((b > a).to(m.dtype) * m).sum() / m.sum().clamp_min(1)
    return loss, frac


def _as_grpo(cfg) -> GRPOConfig:
    """The GRPO view of a PPO config: what GRPOTask's sampling, rewards and prompt reading read."""
    p = cfg.ppo
    return GRPOConfig(model=cfg.model, lora=cfg.lora, data=cfg.data, train=cfg.train, run=cfg.run, grpo=GRPOSection(
        num_generations=p.num_generations, prompts_per_step=p.prompts_per_step, max_prompt_len=p.max_prompt_len,
        max_completion_len=p.max_completion_len, temperature=p.temperature, top_p=p.top_p, loss_type="dapo",
        advantage="reinforce++", importance_sampling_level="token", beta=0.0, epsilon_low=p.cliprange,
        epsilon_high=p.cliprange, scale_rewards="none", num_iterations=p.ppo_epochs, reward_funcs=list(p.reward_funcs),
        reward_models=list(p.reward_models), reward_weights=list(p.reward_weights),
        rollout_weights=p.rollout_weights, generation=p.generation))


class PPOTask(GRPOTask):
    """GRPO's prompts, sampling and rewards; PPO's critic, GAE and losses."""

    name = "ppo"
    panels = (("PPO score (sequence reward)", ["reward"]), ("value loss", ["value_loss"]), ("KL", ["kl"]))

    def __init__(self, cfg, tok, log, dist=None):
        p = cfg.ppo
        if dist is not None and dist.world > 1:
            raise ConfigError("fasttune ppo runs on one process for now (its critic adapter is not wired through "
                              "DDP yet); start it without --nproc / torchrun")
        if cfg.model.finetune != "lora":
            raise ConfigError('PPO\'s critic is a second LoRA adapter on the frozen base: set model.finetune = "lora"')
        if not p.reward_funcs and not p.reward_models:
            raise ConfigError("[ppo] has no reward: set ppo.reward_funcs (functions) and/or ppo.reward_models "
                              "(run folders of `fasttune reward`)")
        n = len(p.reward_funcs) + len(p.reward_models)
        if p.reward_weights and len(p.reward_weights) != n:
            raise ConfigError(f"ppo.reward_weights has {len(p.reward_weights)} values for {n} rewards "
                              "(ppo.reward_funcs, then ppo.reward_models)")
        super().__init__(_as_grpo(cfg), tok, log, dist)
        self.p = p
        self.trainable = []

    # ---- the critic -------------------------------------------------------------------------------

    def setup(self, model, dev, run_dir, dist=None):
        """The critic (a LoRA adapter of the policy's shape and a value head), then GRPO's sampling setup."""
        from peft import LoraConfig

        lm = model.get_base_model()
        if CRITIC not in model.peft_config:
            emb = lm.get_input_embeddings().weight
            lm.v_head = torch.nn.Linear(lm.config.hidden_size, 1, bias=False, device=emb.device)
            torch.nn.init.zeros_(lm.v_head.weight)  # values start at 0: early advantages are the rewards to go
            lora = self.cfg.lora
            model.add_adapter(CRITIC, LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                use_rslora=lora.rslora, task_type="CAUSAL_LM", modules_to_save=["v_head"]))
        model.set_adapter("default")
        for name, param in model.named_parameters():
            if f".{CRITIC}." in name:
                param.requires_grad_(True)
        self.trainable = [q for q in model.parameters() if q.requires_grad]
        super().setup(model, dev, run_dir, dist)  # the rollout copy is built on the final modules

    @contextlib.contextmanager
    def _critic(self, model):
        """The critic's adapter active; the policy's again afterwards. PEFT's set_adapter also switches
        requires_grad off for the other adapter: both stay trainable parameters of the optimizer."""
        model.set_adapter(CRITIC)
        try:
            yield model.get_base_model().v_head
        finally:
            model.set_adapter("default")
            for q in self.trainable:
                q.requires_grad_(True)

    def values(self, model, batch):
        """The critic's value at every completion position [N, C] (fp32), from the hidden state there."""
        with self._critic(model) as head:
            h, _ = self._hidden(model, batch)
            return head(h.float()).squeeze(-1)

    # ---- rollouts: sample, score, advantages ------------------------------------------------------

    @torch.no_grad()
    def _rollout(self, model, prompts):
        p = self.p
        batch = self.sample(model, prompts)
        t1 = time.perf_counter()
        m = batch.completion_mask
        batch.old_logps = self.logps(model, batch).cpu()
        with model.disable_adapter():
            ref = self.logps(model, batch).cpu()
        values = self.values(model, batch).cpu() * m
        rewards, kl = token_rewards(batch.rewards, batch.old_logps.double(), ref.double(), m, p.kl_coef,
                                    p.kl_estimator)
        if p.whiten_rewards:
            rewards = masked_whiten(rewards, m, shift_mean=False) * m
        adv, returns = gae(rewards, values.double(), m, p.gamma, p.lam)
        batch.advantages = (masked_whiten(adv, m) * m).float()
        batch.returns, batch.values = returns.float(), values.float()
        batch.kl_sum = kl.sum(1).float()  # each sequence's KL to the reference
        batch.ref_logps = None  # the KL is in the reward, not in the loss
        batch.ref_time = time.perf_counter() - t1
        return batch

    # ---- the loss -------------------------------------------------------------------------------

    def loss(self, model, batch, n_items, dev):
        p = self.p
        h, head = self._hidden(model, batch)
        policy, s = grpo_loss(h, head.weight, batch.completion_ids, batch.completion_mask, batch.advantages,
                              old_logps=batch.old_logps, epsilon_low=p.cliprange, epsilon_high=p.cliprange,
                              loss_type="dapo", temperature=p.temperature, num_items=n_items, bias=head.bias,
                              softcap=head.softcap)
        mask = batch.completion_mask.to(dev)
        vpred = self.values(model, batch)
        vf, vf_clipped = value_loss(vpred, batch.values.to(dev), batch.returns.to(dev), mask, p.cliprange_value, n_items)
        m = mask.float()
        stats = {
            "reward": batch.rewards.mean(), "non_score_reward": -p.kl_coef * batch.kl_sum.mean(),
            "kl": batch.kl_sum.mean(), "policy_loss": policy.detach(), "value_loss": vf.detach(),
            "value_clipfrac": vf_clipped, "value_mean": (vpred.detach() * m).sum() / m.sum().clamp_min(1),
            "return_mean": (batch.returns.to(dev) * m).sum() / m.sum().clamp_min(1),
            "clip_ratio_region": s.clip_ratio_region, "entropy": s.entropy,
            "completion_len": batch.lengths.float().mean(), "clipped_completions": batch.truncated.float().mean(),
            "generation_s": batch.gen_time if batch.fresh else 0.0, "reference_s": batch.ref_time if batch.fresh else 0.0,
        }
        batch.fresh = False
        for (spec, _), col in zip(self.funcs, batch.raw.T):
            stats[f"reward/{spec}"] = col.nanmean() if not col.isnan().all() else col.new_zeros(())
        return policy + p.vf_coef * vf, stats


def check(cfg, tok):
    """`fasttune check`: the prompts, and every reward tried on them."""
    task = PPOTask(cfg, tok, print)
    first = task.prompts[0]
    print(f"  first prompt ({first['where']}), as the model sees it:\n    " + first["text"].replace("\n", "\n    "))
    print("ok: the config, the prompts and the rewards are valid")


def metrics(cfg, tok, model, dev, split, log):
    """`fasttune eval`: the mean rewards of the policy's samples on the held-out prompts (no critic)."""
    task = PPOTask(cfg, tok, log)
    GRPOTask.setup(task, model, dev, None)
    prompts = task.load_prompts(cfg.data.eval) if split == "eval" else task.prompts
    torch.manual_seed(cfg.train.seed)
    return {**score(task, model, prompts), "eval_prompts": len(prompts),
            "eval_samples": len(prompts) * cfg.ppo.num_generations}
