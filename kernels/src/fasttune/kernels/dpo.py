"""The DPO loss on a linear head, without the policy's logits.

For each pair, with π and ref the summed (or averaged) label log-probs of a sequence,

    logits = (π_chosen - ref_chosen) - (π_rejected - ref_rejected)

and the loss of `loss_type`, as TRL's DPOTrainer defines it (β = beta, ε = label_smoothing,
σ = sigmoid, r = π - ref):

    sigmoid    -log σ(β·logits)(1-ε) - log σ(-β·logits)·ε            (ε > 0: conservative DPO)
    robust     (-log σ(β·logits)(1-ε) + log σ(-β·logits)·ε) / (1 - 2ε)
    hinge      relu(1 - β·logits)
    ipo        (logits - 1/(2β))², on log-probs averaged over each sequence's tokens (as TRL)
    exo_pair   σ(β·logits)(log σ(β·logits) - log(1-ε)) + σ(-β·logits)(log σ(-β·logits) - log ε), ε = 1e-3 if 0
    sppo_hard  (r_chosen - 1/(2β))² + (r_rejected + 1/(2β))²
    nca_pair   -log σ(β·r_chosen) - ½ log σ(-β·r_chosen) - ½ log σ(-β·r_rejected)
    apo_zero   1 - σ(β·r_chosen) + σ(β·r_rejected)
    apo_down   σ(β·r_chosen) + 1 - σ(β·(r_chosen - r_rejected))

The per-token log-probs come from `linear_logprobs`; the rest is a few [B]-sized operations, and
autograd carries dloss/dπ back to each token as its upstream gradient.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .logprobs import linear_logprobs

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down")


class DPOStats(NamedTuple):
    """What a DPO run logs. Per-pair tensors are [B]; the log-probs keep their gradient."""

    chosen_rewards: torch.Tensor  # β(π_c - ref_c), detached
    rejected_rewards: torch.Tensor  # β(π_r - ref_r), detached
    reward_accuracy: torch.Tensor  # 0-d: mean of chosen_rewards > rejected_rewards
    reward_margin: torch.Tensor  # 0-d: mean of chosen_rewards - rejected_rewards
    chosen_logps: torch.Tensor  # π_c (sum, or mean with average_log_prob / ipo)
    rejected_logps: torch.Tensor  # π_r
    chosen_tokens: torch.Tensor  # trained tokens of each chosen sequence
    rejected_tokens: torch.Tensor


def _pair_losses(loss_type, logits, r_c, r_r, beta, eps):
    bl = beta * logits
    if loss_type == "sigmoid":
        return -F.logsigmoid(bl) * (1 - eps) - F.logsigmoid(-bl) * eps
    if loss_type == "robust":
        return (-F.logsigmoid(bl) * (1 - eps) + F.logsigmoid(-bl) * eps) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - bl)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        eps = eps or 1e-3
        return torch.sigmoid(bl) * (F.logsigmoid(bl) - math.log(1 - eps)) + torch.sigmoid(-bl) * (
            F.logsigmoid(-bl) - math.log(eps)
        )
    if loss_type == "sppo_hard":
        return (r_c - 1 / (2 * beta)) ** 2 + (r_r + 1 / (2 * beta)) ** 2
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * r_c) - 0.5 * F.logsigmoid(-beta * r_c) - 0.5 * F.logsigmoid(-beta * r_r)
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * r_c) + torch.sigmoid(beta * r_r)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * r_c) + 1 - torch.sigmoid(beta * (r_c - r_r))
    raise AssertionError(loss_type)


def dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    average_log_prob: bool = False,
    ignore_index: int = -100,
    num_pairs: int | torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
):
    """DPO loss of B pairs: hidden [2B, T, H] (B chosen, then B rejected), labels [2B, T] shifted,
    prompt and padding set to ignore_index. ref_logps [2B]: the reference's sequence log-probs,
    summed, or averaged when average_log_prob or loss_type="ipo" (None: reference-free).
    The loss is Σ pair losses / num_pairs (default B; pass the pair count of the whole
    accumulated batch). `softcap`: the model's final logit softcap (Gemma 2). Returns (loss, DPOStats).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if hidden.dim() != 3 or hidden.shape[0] % 2:
        raise ValueError(f"hidden must be [2B, T, H] with the B chosen sequences first, got {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels must be [2B, T] = {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}")
    if ref_logps is not None and ref_logps.shape != (hidden.shape[0],):
        raise ValueError(f"ref_logps must be [2B] = [{hidden.shape[0]}], got {tuple(ref_logps.shape)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    B = hidden.shape[0] // 2
    dev = hidden.device

    logp = linear_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index, softcap=softcap,
                           chunk_size=chunk_size, backend=backend)
    tokens = (labels != ignore_index).sum(-1).to(dev, non_blocking=True)
    seq = logp.sum(-1)
    if average_log_prob or loss_type == "ipo":
        seq = seq / tokens.clamp_min(1)
    ref = torch.zeros_like(seq) if ref_logps is None else ref_logps.to(dev, torch.float32, non_blocking=True)
    r = seq - ref  # implicit reward / β
    r_c, r_r = r[:B], r[B:]
    losses = _pair_losses(loss_type, r_c - r_r, r_c, r_r, beta, label_smoothing)
    if isinstance(num_pairs, torch.Tensor):
        n = num_pairs.to(dev, torch.float32, non_blocking=True)
    else:
        n = torch.full((), float(B if num_pairs is None else num_pairs), device=dev)
    loss = losses.sum() / n

    chosen_rewards, rejected_rewards = beta * r_c.detach(), beta * r_r.detach()
    stats = DPOStats(
        chosen_rewards, rejected_rewards,
        (chosen_rewards > rejected_rewards).float().mean(), (chosen_rewards - rejected_rewards).mean(),
        seq[:B], seq[B:], tokens[:B], tokens[B:],
    )
    return loss, stats
