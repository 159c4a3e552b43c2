"""The KTO loss on a linear head, without the policy's logits.

KTO (Ethayarajh et al. 2024) trains on unpaired completions, each labelled desirable or not. With
π and ref the summed label log-probs of a completion, r = π - ref its log-ratio, and z0 the
reference point, as TRL's KTOTrainer defines it (β = beta, σ = sigmoid):

    kto                 desirable:   1 - σ(β·(r - z0))        undesirable: 1 - σ(β·(z0 - r))
    apo_zero_unpaired   desirable:   1 - σ(β·r)               undesirable: σ(β·r)

each scaled by desirable_weight or undesirable_weight. z0 is the batch estimate of KL(π ‖ ref):
the mean log-ratio of *mismatched* sequences (prompt i with the completion of another example),
clamped at 0 and detached (`kto_kl`); no gradient flows through it.

The per-token log-probs come from `linear_logprobs`; the rest is a few [B]-sized operations.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .logprobs import linear_logprobs

LOSS_TYPES = ("kto", "apo_zero_unpaired")


class KTOStats(NamedTuple):
    """What a KTO run logs. Per-example tensors are [B]; `logps` keeps its gradient."""

    rewards: torch.Tensor  # β(π - ref), detached
    logps: torch.Tensor  # π, summed over each completion's tokens
    kl: torch.Tensor  # 0-d: the reference point z0 used
    rewards_chosen: torch.Tensor  # 0-d: mean reward of the desirable completions (0 if none)
    rewards_rejected: torch.Tensor  # 0-d: mean reward of the undesirable ones (0 if none)
    reward_accuracy: torch.Tensor  # 0-d: share of completions whose reward is on its label's side of β·z0
    tokens: torch.Tensor  # trained tokens of each completion


def kto_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """The reference point z0: mean log-ratio of the mismatched sequences, clamped at 0, detached."""
    return (kl_logps.detach().float() - ref_kl_logps.to(kl_logps.device).float()).mean().clamp(min=0)


def _losses(loss_type, r, desirable, z0, beta):
    if loss_type == "kto":
        return torch.where(desirable, 1 - torch.sigmoid(beta * (r - z0)), 1 - torch.sigmoid(beta * (z0 - r)))
    if loss_type == "apo_zero_unpaired":
        return torch.where(desirable, 1 - torch.sigmoid(beta * r), torch.sigmoid(beta * r))
    raise AssertionError(loss_type)


def kto_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    desirable: torch.Tensor,
    *,
    ref_logps: torch.Tensor,
    kl: torch.Tensor | float | None = None,
    beta: float = 0.1,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    ignore_index: int = -100,
    num_items: int | torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
):
    """KTO loss of B completions: hidden [B, T, H], labels [B, T] shifted (prompt and padding set to
    ignore_index), desirable [B] bool, ref_logps [B] the reference's summed log-probs, kl the
    reference point z0 (`kto_kl` of the mismatched sequences; None: 0, as apo_zero_unpaired uses).
    The loss is Σ weighted losses / num_items (default B; pass the completion count of the whole
    accumulated batch). Returns (loss, KTOStats).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [B, T, H] and labels [B, T], got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    B = hidden.shape[0]
    if desirable.shape != (B,) or ref_logps.shape != (B,):
        raise ValueError(f"desirable and ref_logps must be [B] = [{B}], got {tuple(desirable.shape)} and "
                         f"{tuple(ref_logps.shape)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    dev = hidden.device

    logp = linear_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index, softcap=softcap,
                           chunk_size=chunk_size, backend=backend)
    tokens = (labels != ignore_index).sum(-1).to(dev, non_blocking=True)
    seq = logp.sum(-1)
    r = seq - ref_logps.to(dev, torch.float32, non_blocking=True)
    z0 = torch.zeros((), device=dev) if kl is None else torch.as_tensor(kl, dtype=torch.float32, device=dev).detach()
    d = desirable.to(dev, torch.bool, non_blocking=True)
    losses = _losses(loss_type, r, d, z0, beta) * torch.where(d, desirable_weight, undesirable_weight)
    if isinstance(num_items, torch.Tensor):
        n = num_items.to(dev, torch.float32, non_blocking=True)
    else:
        n = torch.full((), float(B if num_items is None else num_items), device=dev)
    loss = losses.sum() / n

    rewards = beta * r.detach()
    nd = d.sum()
    chosen = torch.where(d, rewards, 0).sum() / nd.clamp_min(1)
    rejected = torch.where(d, 0, rewards).sum() / (B - nd).clamp_min(1)
    right = torch.where(d, rewards > beta * z0, rewards < beta * z0).float().mean()
    return loss, KTOStats(rewards, seq, z0, chosen, rejected, right, tokens)
