"""Advantage estimators for online RL (`grpo.advantage`): from the rewards of one batch of samples,
grouped by prompt (`num_generations` completions in a row per prompt), the advantage that weights
each completion's (or each token's) log-prob in the loss.

    grpo                  A_i = r_i - mean(group)                      TRL GRPOTrainer
    rloo                  A_i = r_i - mean(the other G-1 of the group) TRL RLOOTrainer
    reinforce++           per token: rew_t = -β·kl_t, + r_i at the last token;   OpenRLHF
                          A_t = Σ_{s≥t} rew_s (return to go, γ = 1), whitened over all
                          completion tokens of the batch
    reinforce++_baseline  the same with r_i - mean(group) in place of r_i        OpenRLHF

`scale` (grpo.scale_rewards): for grpo, divide by the std of the group's rewards ("group"), of the
batch's ("batch"), or not ("none"), + 1e-4 as TRL. For rloo: "batch" is TRL RLOOTrainer's
normalize_advantages (A - mean(A)) / (std(A) + 1e-4), "none" its default, "group" divides by the
std of the group's rewards + 1e-4. For the reinforce++ pair the whitening over the batch's tokens is
the estimator's own: "none" keeps only the mean subtraction (OpenRLHF's no_advantage_std_norm).
kl_t is OpenRLHF's default k1 estimate, log π_old(y_t) - log π_ref(y_t), of the sampling policy.
Std is unbiased (n - 1) for grpo/rloo as TRL; the token whitening uses the biased variance as OpenRLHF.
"""

import torch

ESTIMATORS = ("grpo", "rloo", "reinforce++", "reinforce++_baseline")
NEEDS_GROUP = ("grpo", "rloo", "reinforce++_baseline")  # a baseline from the other completions of a prompt
PER_TOKEN = ("reinforce++", "reinforce++_baseline")  # [N, T] advantages, not [N]
SCALES = ("group", "batch", "none")


def compute_advantages(estimator, rewards, group_size, scale="group", *, mask=None, sample_logps=None,
                       ref_logps=None, beta=0.0):
    """Advantages from rewards [N] (N = prompts × group_size, each group contiguous): [N] for grpo and
    rloo, [N, T] (0 off `mask`) for reinforce++ and reinforce++_baseline, which need the completion
    mask [N, T] and, with beta > 0, the sampling policy's and the reference's log-probs [N, T]."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"advantage estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if estimator in NEEDS_GROUP and group_size < 2:
        raise ValueError(f"the {estimator} advantage needs groups of at least 2 completions, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.double()
    if estimator == "grpo":
        return grpo_advantages(r, group_size, scale).float()
    if estimator == "rloo":
        return rloo_advantages(r, group_size, scale).float()
    if mask is None:
        raise ValueError(f"the {estimator} advantage needs the completion mask")
    if estimator == "reinforce++_baseline":
        g = r.view(-1, group_size)
        r = (g - g.mean(1, keepdim=True)).reshape(-1)
    kl = None
    if beta > 0:
        if sample_logps is None or ref_logps is None:
            raise ValueError(f"the {estimator} advantage with beta > 0 needs the sampling and reference log-probs")
        kl = sample_logps.double() - ref_logps.double()
    return reinforce_pp_advantages(r, mask, kl, beta, whiten_std=scale != "none").float()


def grpo_advantages(r, G, scale):
    g = r.view(-1, G)
    a = g - g.mean(1, keepdim=True)
    if scale == "group":
        a = a / (g.std(1, keepdim=True) + 1e-4)
    elif scale == "batch":
        a = a / (r.std() + 1e-4)
    return a.reshape(-1)


def rloo_advantages(r, G, scale):
    g = r.view(-1, G)
    baseline = (g.sum(1, keepdim=True) - g) / (G - 1)  # mean of the other G - 1
    a = g - baseline
    if scale == "group":
        a = a / (g.std(1, keepdim=True) + 1e-4)
    a = a.reshape(-1)
    if scale == "batch":
        a = (a - a.mean()) / (a.std() + 1e-4)
    return a


def reinforce_pp_advantages(r, mask, kl, beta, whiten_std=True):
    """REINFORCE++: per-token rewards (-β·kl, plus r at each row's last masked token), their
    return to go, whitened with the mean and (biased) variance over all masked tokens."""
    m = mask.bool()
    mf = m.double()
    per_token = torch.zeros_like(mf) if kl is None else -beta * kl * mf
    T = m.shape[1]
    # the last masked position of each row (rows with no masked token get nothing: masked out below)
    last = T - 1 - m.long().flip(1).argmax(1)
    per_token = per_token + torch.zeros_like(mf).scatter(1, last[:, None], r[:, None].to(mf.dtype)) * mf
    returns = per_token.flip(1).cumsum(1).flip(1) * mf  # Σ_{s≥t}
    n = mf.sum()
    if n == 0:
        return torch.zeros_like(returns)
    mean = returns.sum() / n
    out = returns - mean
    if whiten_std:
        var = ((out * mf) ** 2).sum() / n
        out = out * var.clamp_min(1e-8).rsqrt()
    return out * mf
