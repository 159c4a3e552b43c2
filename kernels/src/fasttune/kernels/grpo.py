"""The GRPO loss on a linear head, without the policy's logits.

Per completion token t of sequence i, with logp the policy's log-prob of the sampled token (at
`temperature`, as sampled), old the sampling policy's and ref the reference's, and A the advantage
(one per sequence, A_i, or one per token, A_it, for REINFORCE++):

    ratio  = exp(logp - old)                      (old = logp.detach() when not given: ratio 1)
    loss_t = -min(ratio·A, clip(ratio, 1 - ε_low, 1 + ε_high)·A) + β·kl_t
    kl_t   = exp(ref - logp) - (ref - logp) - 1   (k3 estimator, only with β > 0)

importance_sampling_level = "sequence" (GSPO) uses one ratio per sequence, the geometric mean of its
token ratios, exp(mean_t (logp - old)), clipped as above, as TRL's GRPOTrainer (its gradient reaches
every token of the sequence through the mean). loss_type = "cispo" (MiniMax-M1, as TRL) clips the
ratio from above only, detaches it, and weights the log-prob with it:

    loss_t = -sg(min(ratio, ε_high))·A·logp + β·kl_t       (ε_high is the cap itself: TRL advises 5)

and the aggregation of TRL's GRPOTrainer (m = completion mask):

    grpo     mean_i( Σ_t m·loss / Σ_t m )          num_items: number of sequences
    dr_grpo  Σ m·loss / (num_seqs · max_completion_len)   num_items: number of sequences
    dapo     Σ m·loss / Σ m                         num_items: number of completion tokens
    cispo    Σ m·loss / Σ m                         num_items: number of completion tokens
    bnpo     Σ m·loss / Σ m                         num_items: number of completion tokens

`num_items` is the count over the whole accumulated batch, so splitting a batch into
micro-batches changes neither the loss nor the gradient. (TRL's dapo and bnpo differ in which
batch the token count comes from; here the caller says it with num_items.)
The log-probs come from `linear_logprobs`; the rest is elementwise on [B, T].
"""

from typing import NamedTuple

import torch

from .logprobs import linear_logprobs

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo")
IMPORTANCE_LEVELS = ("token", "sequence")
PER_TOKEN_COUNT = ("dapo", "bnpo", "cispo")  # num_items counts completion tokens (else sequences)


class GRPOStats(NamedTuple):
    """Means over this call's completion tokens (0-d, detached)."""

    kl: torch.Tensor  # mean k3 KL to the reference (0 without ref_logps)
    clip_ratio_low: torch.Tensor  # ratio < 1 - ε_low where A < 0 (per sequence at the sequence level)
    clip_ratio_high: torch.Tensor  # ratio > 1 + ε_high where A > 0 (cispo: ratio > ε_high where A > 0)
    clip_ratio_region: torch.Tensor  # either
    entropy: torch.Tensor  # mean entropy of the policy at `temperature`
    logps: torch.Tensor  # [B, T] the policy's log-probs (0 off the mask), detached
    num_tokens: torch.Tensor  # completion tokens in this call


def _check_args(hidden, completion_ids, completion_mask, advantages, old_logps, ref_logps, beta, loss_type,
                importance_sampling_level):
    """grpo_loss's arguments: one ValueError naming the first that is wrong."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_LEVELS}, "
                         f"got {importance_sampling_level!r}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got {tuple(hidden.shape)}")
    B, T = hidden.shape[:2]
    for name, t in (("completion_ids", completion_ids), ("completion_mask", completion_mask),
                    ("old_logps", old_logps), ("ref_logps", ref_logps)):
        if t is not None and t.shape != (B, T):
            raise ValueError(f"{name} must be [B, T] = [{B}, {T}], got {tuple(t.shape)}")
    if advantages.shape not in ((B,), (B, T)):
        raise ValueError(f"advantages must be [B] = [{B}] (one per sequence) or [B, T] = [{B}, {T}] (one per "
                         f"token), got {tuple(advantages.shape)}")
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (the reference model's log-probs)")


def _reduce(summed, mf, loss_type, num_items, max_completion_len):
    """The loss from the masked per-token losses [B, T]: grpo, the mean of each sequence's mean over
    sequences; dr_grpo, the sum over sequences × max_completion_len; dapo, bnpo and cispo, the sum over
    tokens. `num_items` (summed over the accumulated batch) replaces this call's count when given."""
    B, dev = summed.shape[0], summed.device
    if loss_type == "grpo":
        per_seq = summed.sum(-1) / mf.sum(-1).clamp_min(1)
        return per_seq.sum() / _count(num_items, B, dev)
    if loss_type == "dr_grpo":
        return summed.sum() / (_count(num_items, B, dev) * max_completion_len)
    n = _count(num_items, mf.sum(), dev)  # dapo, bnpo, cispo
    return torch.where(n > 0, summed.sum() / n.clamp_min(1e-12), summed.sum() * 0)


def grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    temperature: float = 1.0,
    num_items: int | torch.Tensor | None = None,
    max_completion_len: int | None = None,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
):
    """GRPO loss: hidden [B, T, H] are the states that predict completion_ids [B, T] (shifted),
    completion_mask [B, T] marks the completion tokens, advantages [B] or [B, T]. old_logps / ref_logps
    [B, T] as from `linear_logprobs`. max_completion_len (dr_grpo) defaults to T. `softcap`: the
    model's final logit softcap (Gemma 2), applied before the temperature.
    Returns (loss, GRPOStats).
    """
    _check_args(hidden, completion_ids, completion_mask, advantages, old_logps, ref_logps, beta, loss_type,
                importance_sampling_level)
    B, T = hidden.shape[:2]
    dev = hidden.device

    mask_host = completion_mask.bool()
    labels = torch.where(mask_host, completion_ids, -100)  # stays where the caller keeps it
    logp, entropy = linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature, softcap=softcap,
                                    return_entropy=True, chunk_size=chunk_size, backend=backend)
    m = mask_host.to(dev, non_blocking=True)
    mf = m.float()
    old = logp.detach() if old_logps is None else old_logps.to(dev, non_blocking=True)
    log_ratio = torch.where(m, logp - old, torch.zeros_like(logp))
    if importance_sampling_level == "sequence":  # [B, 1]: exp of the mean log-ratio of the sequence
        log_ratio = log_ratio.sum(-1, keepdim=True) / mf.sum(-1, keepdim=True).clamp_min(1)
    ratio = torch.exp(log_ratio)
    A = advantages.to(dev, torch.float32, non_blocking=True)
    A = A.unsqueeze(1) if A.dim() == 1 else A
    if loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=epsilon_high).detach() * A * logp
    else:
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
        per_token = -torch.min(ratio * A, clipped * A)
    kl = None
    if ref_logps is not None:
        d = torch.where(m, ref_logps.to(dev, non_blocking=True) - logp, torch.zeros_like(logp))
        kl = torch.exp(d) - d - 1
        if beta > 0:
            per_token = per_token + beta * kl

    count = mf.sum()
    loss = _reduce(per_token * mf, mf, loss_type, num_items, max_completion_len or T)

    with torch.no_grad():
        denom = count.clamp_min(1)
        if loss_type == "cispo":
            low, high = torch.zeros_like(ratio * A, dtype=torch.bool), (ratio > epsilon_high) & (A > 0)
        else:
            low, high = (ratio < 1 - epsilon_low) & (A < 0), (ratio > 1 + epsilon_high) & (A > 0)
        clip = [_masked_mean(x.float(), mf) for x in (low, high, low | high)]
        stats = GRPOStats(
            (kl * mf).sum() / denom if kl is not None else torch.zeros((), device=dev),
            *clip, (entropy * mf).sum() / denom, logp.detach(), count,
        )
    return loss, stats


def _masked_mean(x, mf):
    """Mean over completion tokens, or over sequences with any completion token when x is [B, 1]
    (sequence-level ratios with per-sequence advantages), as TRL logs its clip ratios."""
    if x.shape[1] == 1:
        seq = (mf.sum(-1, keepdim=True) > 0).float()
        return (x * seq).sum() / seq.sum().clamp_min(1)
    return (x * mf).sum() / mf.sum().clamp_min(1)


def _count(num_items, default, device):
    n = default if num_items is None else num_items
    if isinstance(n, torch.Tensor):
        return n.to(device, torch.float32, non_blocking=True)
    return torch.full((), float(n), device=device)
