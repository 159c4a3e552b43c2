"""Reference-free preference losses on a linear head, without the policy's logits: ORPO, SimPO, CPO.

No reference model: each loss is a function of the policy's own sequence log-probs π (the label
log-probs of a sequence, summed, or averaged over its tokens) and, for ORPO and CPO, an NLL term on
the chosen responses. As TRL's ORPOTrainer and CPOTrainer define them (β = beta, γ = simpo_gamma,
α = cpo_alpha, ε = label_smoothing, σ = sigmoid, c/r = chosen/rejected):

    orpo   π averaged.  log_odds = (π_c - π_r) - (log(1 - e^π_c) - log(1 - e^π_r))
           loss = NLL_c - β · mean(log σ(log_odds))                  (β is the paper's λ)
    simpo  π averaged.  h = π_c - π_r - γ/β
           loss = mean(-log σ(β·h)(1-ε) - log σ(-β·h)·ε) + α · NLL_c
    cpo    π summed (or averaged with average_log_prob).  h = π_c - π_r
           loss = mean(-log σ(β·h)(1-ε) - log σ(-β·h)·ε) + α · NLL_c

NLL_c is the mean NLL per token over every chosen token of the batch (TRL's nn.CrossEntropyLoss on
the chosen half), not a mean of per-sequence means. The logged rewards are β·π.

Normalization: the pair term is Σ over pairs / num_pairs (default B); the NLL term is Σ over chosen
tokens / num_chosen_tokens (default: this call's chosen-token count). A pair with an empty side
(no trained token) adds nothing to ORPO's term (its log(1 - e^π) would be log 0).
Everything per token comes from `linear_logprobs`, one chunked pass over the 2B sequences that
yields both the sequence log-probs and the NLL; the rest is [B]-sized.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .logprobs import linear_logprobs

LOSS_TYPES = ("orpo", "simpo", "cpo")


class PreferenceStats(NamedTuple):
    """What a run logs. Per-pair tensors are [B]; the log-probs keep their gradient."""

    chosen_rewards: torch.Tensor  # β·π_c, detached
    rejected_rewards: torch.Tensor  # β·π_r, detached
    reward_accuracy: torch.Tensor  # 0-d: mean of chosen_rewards > rejected_rewards
    reward_margin: torch.Tensor  # 0-d: mean of chosen_rewards - rejected_rewards
    chosen_logps: torch.Tensor  # π_c (averaged for orpo/simpo)
    rejected_logps: torch.Tensor  # π_r
    chosen_tokens: torch.Tensor  # trained tokens of each chosen sequence
    rejected_tokens: torch.Tensor
    nll: torch.Tensor  # 0-d, detached: NLL_c as normalized in the loss
    log_odds_ratio: torch.Tensor | None  # ORPO: 0-d mean of log σ(log_odds), detached (else None)
    log_odds_chosen: torch.Tensor | None  # ORPO: 0-d mean of log_odds, detached (else None)


def _log1mexp(x):
    """log(1 - e^x) for x < 0, branching at -ln 2 to avoid cancellation (as TRL's)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _orpo(pi_c, pi_r, valid, beta):
    """-β·log σ(log_odds) per pair (0 where `valid` is False), and log_odds."""
    # π = 0 (an empty side, or p = 1 to fp32 precision) would make log(1 - e^π) = -inf
    safe_c = torch.where(valid, pi_c, -1.0).clamp(max=-1e-12)
    safe_r = torch.where(valid, pi_r, -1.0).clamp(max=-1e-12)
    log_odds = (safe_c - safe_r) - (_log1mexp(safe_c) - _log1mexp(safe_r))
    ratio = F.logsigmoid(log_odds)
    return torch.where(valid, -beta * ratio, torch.zeros_like(ratio)), log_odds, ratio


def _sigmoid_pairs(h, beta, eps):
    return -F.logsigmoid(beta * h) * (1 - eps) - F.logsigmoid(-beta * h) * eps


def _count(n, default, dev):
    if n is None:
        return default.to(dev, torch.float32)
    if isinstance(n, torch.Tensor):
        return n.to(dev, torch.float32, non_blocking=True).reshape(())
    return torch.full((), float(n), device=dev)


def preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss_type: str,
    beta: float = 0.1,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    label_smoothing: float = 0.0,
    average_log_prob: bool = False,
    ignore_index: int = -100,
    num_pairs: int | torch.Tensor | None = None,
    num_chosen_tokens: int | torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
):
    """ORPO, SimPO or CPO loss of B pairs: hidden [2B, T, H] (B chosen, then B rejected), labels
    [2B, T] shifted, prompt and padding set to ignore_index. `average_log_prob` matters for cpo
    only (orpo and simpo always average). Pass `num_pairs` and `num_chosen_tokens`, the counts of
    the whole accumulated batch, to normalize over it. Returns (loss, PreferenceStats).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if hidden.dim() != 3 or hidden.shape[0] % 2:
        raise ValueError(f"hidden must be [2B, T, H] with the B chosen sequences first, got {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels must be [2B, T] = {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "orpo" and label_smoothing:
        raise ValueError("label_smoothing is not part of ORPO's loss; use simpo or cpo, or set it to 0")
    if cpo_alpha < 0:
        raise ValueError(f"cpo_alpha must be >= 0, got {cpo_alpha}")
    B = hidden.shape[0] // 2
    dev = hidden.device

    logp = linear_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index, softcap=softcap,
                           chunk_size=chunk_size, backend=backend)
    tokens = (labels != ignore_index).sum(-1).to(dev, non_blocking=True)
    seq = logp.sum(-1)
    if loss_type != "cpo" or average_log_prob:
        seq = seq / tokens.clamp_min(1)
    pi_c, pi_r = seq[:B], seq[B:]

    # NLL_c: Σ over every chosen token / their count (0 when there is none)
    n_tok = _count(num_chosen_tokens, tokens[:B].sum(), dev)
    nll_sum = -logp[:B].sum()
    nll = torch.where(n_tok != 0, nll_sum / n_tok.clamp_min(1e-30), torch.zeros_like(nll_sum))
    ratio = log_odds = None
    if loss_type == "orpo":
        losses, log_odds, ratio = _orpo(pi_c, pi_r, (tokens[:B] > 0) & (tokens[B:] > 0), beta)
        nll_weight = 1.0
    elif loss_type == "simpo":
        losses = _sigmoid_pairs(pi_c - pi_r - simpo_gamma / beta, beta, label_smoothing)
        nll_weight = cpo_alpha
    else:
        losses = _sigmoid_pairs(pi_c - pi_r, beta, label_smoothing)
        nll_weight = cpo_alpha
    loss = losses.sum() / _count(num_pairs, torch.tensor(B), dev)
    if nll_weight:
        loss = loss + nll_weight * nll

    chosen_rewards, rejected_rewards = beta * pi_c.detach(), beta * pi_r.detach()
    stats = PreferenceStats(
        chosen_rewards, rejected_rewards,
        (chosen_rewards > rejected_rewards).float().mean(), (chosen_rewards - rejected_rewards).mean(),
        pi_c, pi_r, tokens[:B], tokens[B:], nll.detach(),
        None if ratio is None else ratio.detach().mean(), None if log_odds is None else log_odds.detach().mean(),
    )
    return loss, stats
