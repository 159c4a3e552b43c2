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
