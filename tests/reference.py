"""Float64 references and comparison helpers shared by the kernel tests."""

import torch


def ce_reference(logits, labels, *, ignore_index=-100, loss_mask=None, reduction="mean", num_items=None,
                 label_smoothing=0.0, z_loss=0.0, softcap=None):
    """Cross-entropy in float64 straight from its definition (differentiable w.r.t. logits)."""
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    w = (labels != ignore_index).double()
    if loss_mask is not None:
        w = w * loss_mask.double()
    y = torch.where(labels == ignore_index, 0, labels)
    logp = torch.log_softmax(z, dim=-1)
    lse = torch.logsumexp(z, dim=-1)
    nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    smooth = -logp.mean(-1)
    loss = w * ((1 - label_smoothing) * nll + label_smoothing * smooth + z_loss * lse**2)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    n = w.sum() if num_items is None else torch.as_tensor(num_items, dtype=torch.float64)
    return loss.sum() / n if n != 0 else loss.sum() * 0


def rel_err(actual, expected):
    """Norm-wise relative error ||a - e|| / ||e|| (absolute when e is 0)."""
    a, e = actual.double(), expected.double()
    denom = e.norm()
    diff = (a - e).norm()
    return (diff / denom).item() if denom > 0 else diff.item()


TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def logprobs_reference(logits, labels, *, ignore_index=-100, temperature=1.0, softcap=None):
    """Per-token label log-prob and entropy in float64 from full logits (0 on ignored tokens)."""
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    keep = labels != ignore_index
    y = torch.where(keep, labels, 0)
    logp = logp_all.gather(-1, y.unsqueeze(-1)).squeeze(-1) * keep
    entropy = -(logp_all.exp() * logp_all).sum(-1) * keep
    return logp, entropy


def dpo_reference(logp, labels, ref_logps, *, beta, loss_type, label_smoothing=0.0, average_log_prob=False,
                  ignore_index=-100, num_pairs=None):
    """TRL's DPO losses in float64 on per-token log-probs [2B, T]."""
    import math

    import torch.nn.functional as F

    keep = (labels != ignore_index).double()
    seq = (logp * keep).sum(-1)
    if average_log_prob or loss_type == "ipo":
        seq = seq / keep.sum(-1).clamp_min(1)
    B = seq.shape[0] // 2
    ref = torch.zeros_like(seq) if ref_logps is None else ref_logps.double()
    r_c, r_r = seq[:B] - ref[:B], seq[B:] - ref[B:]
    lg, eps = r_c - r_r, label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * lg) * (1 - eps) - F.logsigmoid(-beta * lg) * eps
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * lg) * (1 - eps) + F.logsigmoid(-beta * lg) * eps) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * lg)
    elif loss_type == "ipo":
        losses = (lg - 1 / (2 * beta)) ** 2
    elif loss_type == "exo_pair":
        e = eps or 1e-3
        losses = (beta * lg).sigmoid() * (F.logsigmoid(beta * lg) - math.log(1 - e)) + \
            (-beta * lg).sigmoid() * (F.logsigmoid(-beta * lg) - math.log(e))
    elif loss_type == "sppo_hard":
        losses = (r_c - 0.5 / beta) ** 2 + (r_r + 0.5 / beta) ** 2
    elif loss_type == "nca_pair":
        losses = -F.logsigmoid(beta * r_c) - 0.5 * F.logsigmoid(-beta * r_c) - 0.5 * F.logsigmoid(-beta * r_r)
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(beta * r_c) + torch.sigmoid(beta * r_r)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * r_c) + 1 - torch.sigmoid(beta * (r_c - r_r))
    else:
        raise ValueError(loss_type)
    return losses.sum() / (B if num_pairs is None else num_pairs), beta * r_c, beta * r_r


def grpo_reference(logp, mask, advantages, *, old_logps=None, ref_logps=None, beta=0.0, eps_low=0.2,
                   eps_high=0.2, loss_type="dapo", num_items=None, max_completion_len=None, level="token"):
    """TRL's GRPO loss in float64 on per-token log-probs [B, T]; also kl, clip fractions.
    advantages [B] or [B, T]; level "sequence" is GSPO's ratio (π/π_old)^(1/|y|) per sequence;
    loss_type "cispo" is MiniMax-M1's -sg(min(ratio, ε_max))·A·log π."""
    m = mask.double()
    old = logp.detach() if old_logps is None else old_logps.double()
    log_ratio = (logp - old) * m
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1)
    ratio = torch.exp(log_ratio)
    A = advantages.double()
    A = A.unsqueeze(1) if A.dim() == 1 else A
    if loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=eps_high).detach() * A * logp
    else:
        per_token = -torch.min(ratio * A, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
    kl = None
    if ref_logps is not None:
        d = (ref_logps.double() - logp) * m
        kl = torch.exp(d) - d - 1
        if beta > 0:
            per_token = per_token + beta * kl
    B, T = m.shape
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp_min(1)).sum() / (num_items or B)
    elif loss_type == "dr_grpo":
        loss = (per_token * m).sum() / ((num_items or B) * (max_completion_len or T))
    else:
        loss = (per_token * m).sum() / (num_items or m.sum())
    if loss_type == "cispo":
        low, high = torch.zeros_like(ratio * A, dtype=torch.bool), (ratio > eps_high) & (A > 0)
    else:
        low, high = (ratio < 1 - eps_low) & (A < 0), (ratio > 1 + eps_high) & (A > 0)
    # clip fractions over tokens, or over (non-empty) sequences when there is one ratio and one A per sequence
    w = m if low.shape[1] > 1 else (m.sum(-1, keepdim=True) > 0).double()
    return loss, kl, (low * w).sum() / w.sum(), (high * w).sum() / w.sum()
