"""Fused linear + cross-entropy, and cross-entropy on given logits.

`fused_linear_cross_entropy(hidden, weight, labels)` computes
    cross_entropy(hidden @ weight.T + bias, labels)
for a causal LM's head without building the [N, V] logits: rows are taken a chunk at a time
and a chunk's logits live only while that chunk is processed.

For one token with logits z (after the optional softcap z <- c·tanh(z/c)), label y and weight w
(0 for ignore_index or loss_mask False, 1 or the float mask otherwise):

    lse    = log Σ_j exp(z_j)
    loss   = w · [ (1-ε)(lse - z_y) + ε(lse - Σ_j z_j / V) + ζ·lse² ]     ε = label_smoothing, ζ = z_loss
    dL/dz_j = w · [ p_j (1 + 2ζ·lse) - ε/V - (1-ε)·[j = y] ]              p = softmax(z)

1 - p_y is formed as Σ_{j≠y} p_j / Σ_j p_j, never as 1 - p_y, so the loss and the target's
gradient keep their relative precision when the target's probability is close to 1.

How it runs:
- One chunk loop serves both backends: logits = h_c @ W.T (+ b) in the input dtype (the matmul
  accumulates in fp32); a row function turns the chunk, in place, into dL/dlogits and writes
  loss, lse and accuracy; then dh_c = g @ W and dW += g.T @ h_c into an fp32 accumulator.
- The row function is a Triton kernel (one program per row, two passes over the vocabulary:
  an online max/sum, then the gradient) or the same maths in PyTorch on the chunk.
- reduction mean/sum: the gradient only scales with the upstream scalar, so it is computed
  during the forward and the backward is a multiplication: 3 matmuls in all, as the naive way.
  reduction none: the forward computes losses only and the backward recomputes each chunk's
  logits with the per-token upstream gradient folded into w (4 matmuls).
- On the CPU the trained tokens are gathered first, so masked tokens cost no matmul work. On
  CUDA sizing the loop by the trained count would need a host sync, so masked rows go through
  the matmuls and the kernel writes zeros for them.
"""

import math
from typing import NamedTuple

import torch

from ._backend import chunk_rows, empty, pick_backend, tl, triton

MAX_BLOCK_V = 4096  # vocabulary tile of the row kernel; tests lower it to cover many tiles

# --------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # Built from exp because the interpreter has no libdevice. Odd Taylor series near 0,
    # where (1 - e)/(1 + e) would lose relative precision to cancellation.
    ax = tl.abs(x)
    x2 = x * x
    small = x * (1.0 - x2 * (1.0 / 3.0 - x2 * (2.0 / 15.0 - x2 * (17.0 / 315.0))))
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -big, big)
    return tl.where(ax < 0.1, small, big)


@triton.jit
def _log1p(u):
    # log(1 + u) with full relative precision for small u (Goldberg's trick).
    v = 1.0 + u
    return tl.where(v == 1.0, u, tl.log(v) * (u / tl.where(v == 1.0, 1.0, v - 1.0)))


@triton.jit
def _ce_rows_kernel(
    logits_ptr, logits_stride,  # [C, V] logits, any float dtype
    grad_ptr, grad_stride,  # [C, V] dL/dlogits out, logits dtype; may alias logits_ptr
    labels_ptr,  # [C] int64
    weights_ptr,  # [C] fp32 token weight; 0 = not trained
    loss_ptr, lse_ptr, correct_ptr,  # [C] fp32 outputs
    V, label_smoothing, z_loss, softcap,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * logits_stride
    grad_ptr += row * grad_stride
    w = tl.load(weights_ptr + row)
    y = tl.load(labels_ptr + row)
    cols = tl.arange(0, BLOCK_V)

    if w != 0:
        y_in = (y >= 0) & (y < V)
        z_y = tl.load(logits_ptr + y, mask=y_in, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z_y = softcap * _tanh(z_y / softcap)

        # Pass 1: running max m, Σ_{j≠y} exp(z_j - m) and Σ_j z_j.
        m = float("-inf")
        d_other = 0.0
        z_sum = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            valid = offs < V
            z = tl.load(logits_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = softcap * _tanh(z / softcap)
            z_sum += tl.sum(tl.where(valid, z, 0.0), 0)
            z = tl.where(valid, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, 0))
            e = tl.where(offs == y, 0.0, tl.exp(z - m_new))
            d_other = d_other * tl.exp(m - m_new) + tl.sum(e, 0)
            m = m_new

        e_y = tl.exp(z_y - m)
        total = d_other + e_y
        lse = m + tl.log(total)
        q = d_other / total  # 1 - p_y, without cancellation
        # lse - z_y = log(1 + Σ_{j≠y} exp(z_j - z_y)); log1p keeps it exact when p_y ≈ 1.
        nll = tl.where(m - z_y < 1.0, _log1p(d_other * tl.exp(m - z_y)), lse - z_y)
        loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - z_sum / V) + z_loss * lse * lse
        tl.store(loss_ptr + row, w * loss)
        tl.store(lse_ptr + row, lse)
        tl.store(correct_ptr + row, (z_y >= m).to(tl.float32))

        if COMPUTE_GRAD:
            # Pass 2: dL/dz_j = w·[p_j(1 + 2ζ·lse) - ε/V - (1-ε)[j=y]], with the j = y term
            # rewritten as -q + p_y·2ζ·lse + ε(1 - 1/V).
            coef = 2.0 * z_loss * lse
            smooth = label_smoothing / V
            g_y = -q + (e_y / total) * coef + label_smoothing - smooth
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                valid = offs < V
                z = tl.load(logits_ptr + offs, mask=valid, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    z = softcap * _tanh(z / softcap)
                p = tl.exp(z - lse)
                g = tl.where(offs == y, g_y, p * (1.0 + coef) - smooth)
                if HAS_SOFTCAP:
                    g = g * (1.0 - (z / softcap) * (z / softcap))
                g = g * w
                tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=valid)
    else:
        tl.store(loss_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        tl.store(correct_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                zero = tl.zeros([BLOCK_V], dtype=tl.float32)
                tl.store(grad_ptr + offs, zero.to(grad_ptr.dtype.element_ty), mask=offs < V)


def _rows_triton(logits, grad, labels, weights, eps, z_loss, softcap):
    C, V = logits.shape
    loss = empty(C, dtype=torch.float32, device=logits.device)
    lse = empty(C, dtype=torch.float32, device=logits.device)
    correct = empty(C, dtype=torch.float32, device=logits.device)
    if C == 0:
        return loss, lse, correct
    block = min(MAX_BLOCK_V, triton.next_power_of_2(V))
    g = grad if grad is not None else logits
    _ce_rows_kernel[(C,)](
        logits, logits.stride(0), g, g.stride(0), labels, weights, loss, lse, correct,
        V, float(eps), float(z_loss), float(softcap or 1.0),
        HAS_SOFTCAP=softcap is not None, COMPUTE_GRAD=grad is not None, BLOCK_V=block,
        num_warps=16 if block >= 4096 else 8 if block >= 2048 else 4,
    )
    return loss, lse, correct


# --------------------------------------------------------------------------------------------
# PyTorch (CPU path and reference for the kernel; float64 references live in the tests)
# --------------------------------------------------------------------------------------------


def _rows_torch(logits, grad, labels, weights, eps, z_loss, softcap):
    """The row function in PyTorch on one chunk: same maths and outputs as `_ce_rows_kernel`."""
    C, V = logits.shape
    z = logits.float()
    if softcap is not None:
        z = torch.tanh(z / softcap).mul_(softcap)
    trained = weights != 0
    y = torch.where(trained & (labels >= 0) & (labels < V), labels, 0).unsqueeze(1)
    z_y = z.gather(1, y).squeeze(1)
    z_sum = z.sum(1) if eps else None
    m = z.amax(1)
    # Work in place when the chunk is fp32 scratch we may overwrite (the common case): one chunk
    # of memory instead of three. With a softcap, z is still needed for the chain rule.
    in_place = grad is not None and z is grad and softcap is None
    e = (z.sub_(m.unsqueeze(1)) if in_place else z - m.unsqueeze(1)).exp_()
    e.scatter_(1, y, 0.0)
    d_other = e.sum(1)
    e_y = (z_y - m).exp()
    total = d_other + e_y
    lse = m + total.log()
    nll = torch.where(m - z_y < 1.0, torch.log1p(d_other * (m - z_y).exp()), lse - z_y)
    loss = (1 - eps) * nll + (eps * (lse - z_sum / V) if eps else 0) + z_loss * lse * lse
    zero = torch.zeros((), device=z.device)
    loss = torch.where(trained, weights * loss, zero)
    lse = torch.where(trained, lse, zero)
    correct = (trained & (z_y >= m)).float()

    if grad is not None:
        coef = (2 * z_loss * lse).unsqueeze(1)
        smooth = eps / V
        g = e.mul_((1 / total).unsqueeze(1)).mul_(1 + coef).sub_(smooth)  # p_j(1 + 2ζ·lse) - ε/V, j ≠ y
        g_y = -d_other / total + (e_y / total) * coef.squeeze(1) + eps - smooth
        g.scatter_(1, y, g_y.unsqueeze(1))
        if softcap is not None:
            g.mul_(1 - (z / softcap) ** 2)
        g.mul_(torch.where(trained, weights, zero).unsqueeze(1))
        if g is not grad:
            grad.copy_(g)
    return loss, lse, correct


def _rows(backend, logits, grad, labels, weights, eps, z_loss, softcap):
    fn = _rows_triton if backend == "triton" else _rows_torch
    return fn(logits, grad, labels, weights, eps, z_loss, softcap)


# --------------------------------------------------------------------------------------------
# The chunk loop shared by forward and backward
# --------------------------------------------------------------------------------------------


def _add_grad_weight(acc, g, h):
    """acc[V, H] (fp32) += g.T @ h without a [V, H] temporary wider than a block of rows."""
    if g.dtype == torch.float32:
        acc.addmm_(g.t(), h)
        return
    step = max(1, (64 * 2**20) // (4 * h.shape[1]))  # ≤ 64 MiB of fp32 per block
    for v0 in range(0, acc.shape[0], step):
        acc[v0 : v0 + step] += (g[:, v0 : v0 + step].t() @ h).float()


def _linear_ce_chunks(h, w, b, labels, weights, opts, need_gh, need_gw, need_gb):
    """Loss, lse and correct per row [N], and the gradients for unit upstream (None if not needed)."""
    backend, eps, z_loss, softcap, chunk = opts
    N, V = h.shape[0], w.shape[0]
    dev = h.device
    need_grad = need_gh or need_gw or need_gb
    gh = torch.zeros_like(h) if need_gh else None
    gw = torch.zeros(w.shape, dtype=torch.float32, device=dev) if need_gw else None
    gb = torch.zeros(V, dtype=torch.float32, device=dev) if need_gb else None

    rows, hs, ys, ws = None, h, labels, weights
    if dev.type == "cpu":  # compact the trained rows; on the CPU this costs no sync
        trained = weights.nonzero().squeeze(1)
        if trained.numel() < N:
            rows, hs, ys, ws = trained, h[trained], labels[trained], weights[trained]
    n = hs.shape[0]
    loss = empty(n, dtype=torch.float32, device=dev)
    lse = empty(n, dtype=torch.float32, device=dev)
    correct = empty(n, dtype=torch.float32, device=dev)

    buf = torch.empty(min(chunk, n), V, dtype=h.dtype, device=dev)  # one chunk of logits, reused
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        hc = hs[s:e]
        logits = buf[: e - s]
        if b is None:
            torch.mm(hc, w.t(), out=logits)
        else:
            torch.addmm(b, hc, w.t(), out=logits)
        out = _rows(backend, logits, logits if need_grad else None, ys[s:e], ws[s:e], eps, z_loss, softcap)
        loss[s:e], lse[s:e], correct[s:e] = out
        if need_gh:
            g_h = logits @ w
            if rows is None:
                gh[s:e] = g_h
            else:
                gh[rows[s:e]] = g_h
        if need_gw:
            _add_grad_weight(gw, logits, hc)
        if need_gb:
            gb += logits.sum(0, dtype=torch.float32)

    if rows is not None:
        full = [torch.zeros(N, dtype=torch.float32, device=dev) for _ in range(3)]
        for dst, src in zip(full, (loss, lse, correct)):
            dst[rows] = src
        loss, lse, correct = full
    return loss, lse, correct, gh, gw, gb


def _token_weights(labels, loss_mask, ignore_index):
    w = (labels != ignore_index).float()
    if loss_mask is not None:
        w = w * loss_mask.to(device=w.device, dtype=torch.float32).reshape(-1)
    return w


def _normalizer(weights, num_items, reduction):
    """The divisor of the summed loss as a 0-d fp32 tensor (1 for sum/none)."""
    if reduction != "mean":
        return torch.ones((), device=weights.device)
    if num_items is None:
        return weights.sum()
    if isinstance(num_items, torch.Tensor):
        return num_items.to(device=weights.device, dtype=torch.float32).reshape(())
    return torch.tensor(float(num_items), device=weights.device)


def _reduce(loss, n, reduction):
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return torch.where(n != 0, total / n, torch.zeros_like(total))  # all masked: 0, not NaN


def _scale(grad_out, n):
    """Upstream factor of the gradient: grad_out / n, 0 where nothing was trained."""
    return torch.where(n != 0, grad_out / n, torch.zeros_like(grad_out))


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, labels, weights, n, reduction, opts, grad_enabled):
        # needs_input_grad ignores no_grad (forward always runs with grad mode off), hence the flag.
        need_gh, need_gw, need_gb = ctx.needs_input_grad[:3]
        in_forward = grad_enabled and reduction != "none" and (need_gh or need_gw or need_gb)
        loss, lse, correct, gh, gw, gb = _linear_ce_chunks(
            h, w, b, labels, weights, opts,
            need_gh and in_forward, need_gw and in_forward, need_gb and in_forward,
        )
        ctx.reduction, ctx.opts = reduction, opts
        ctx.dtypes = (h.dtype, w.dtype, None if b is None else b.dtype)
        if reduction == "none":
            ctx.save_for_backward(h, w, b, labels, weights, n)
        else:
            ctx.save_for_backward(gh, gw, gb, n)
        ctx.mark_non_differentiable(lse, correct)
        return _reduce(loss, n, reduction), lse, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse, _grad_correct):
        need_gh, need_gw, need_gb = ctx.needs_input_grad[:3]
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        if ctx.reduction == "none":
            h, w, b, labels, weights, n = ctx.saved_tensors
            up = weights * grad_loss.float()
            _, _, _, gh, gw, gb = _linear_ce_chunks(h, w, b, labels, up, ctx.opts, need_gh, need_gw, need_gb)
        else:
            gh, gw, gb, n = ctx.saved_tensors
            s = _scale(grad_loss.float(), n)
            # In place: these buffers are ours. A second backward through the same graph is
            # caught by autograd's saved-tensor version check instead of scaling twice.
            gh = gh.mul_(s.to(gh.dtype)) if need_gh else None
            gw = gw.mul_(s) if need_gw else None
            gb = gb.mul_(s) if need_gb else None
        return (
            None if gh is None else gh.to(h_dtype),
            None if gw is None else gw.to(w_dtype),
            None if gb is None else gb.to(b_dtype),
            None, None, None, None, None, None,
        )


class _CE(torch.autograd.Function):
    """Cross-entropy on given logits: loss in the forward, dL/dlogits in the backward."""

    @staticmethod
    def forward(ctx, logits, labels, weights, n, reduction, opts):
        backend, eps, z_loss, softcap, chunk = opts
        N = logits.shape[0]
        loss = empty(N, dtype=torch.float32, device=logits.device)
        lse, correct = torch.empty_like(loss), torch.empty_like(loss)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            loss[s:e], lse[s:e], correct[s:e] = _rows(
                backend, logits[s:e], None, labels[s:e], weights[s:e], eps, z_loss, softcap
            )
        ctx.save_for_backward(logits, labels, weights, n)
        ctx.reduction, ctx.opts = reduction, opts
        ctx.mark_non_differentiable(lse, correct)
        return _reduce(loss, n, reduction), lse, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse, _grad_correct):
        logits, labels, weights, n = ctx.saved_tensors
        backend, eps, z_loss, softcap, chunk = ctx.opts
        up = weights * (grad_loss.float() if ctx.reduction == "none" else _scale(grad_loss.float(), n))
        grad = empty(*logits.shape, dtype=logits.dtype, device=logits.device)
        for s in range(0, logits.shape[0], chunk):
            e = min(s + chunk, logits.shape[0])
            _rows(backend, logits[s:e], grad[s:e], labels[s:e], up[s:e], eps, z_loss, softcap)
        return grad, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


class CEStats(NamedTuple):
    """Per-token statistics returned with `return_stats=True` (0 for tokens not trained)."""

    lse: torch.Tensor  # [N] fp32 log-sum-exp of the (softcapped) logits
    correct: torch.Tensor  # [N] bool: argmax == label
    accuracy: torch.Tensor  # 0-d fp32: correct / trained tokens (0 if none)


def _check(labels, n_rows, loss_mask, reduction, label_smoothing, z_loss, softcap, what):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 (or int32), got {labels.dtype}")
    if labels.numel() != n_rows:
        raise ValueError(f"labels has {labels.numel()} elements but {what} has {n_rows} rows; "
                         "labels must have the shape of the rows, already shifted")
    if loss_mask is not None and loss_mask.numel() != n_rows:
        raise ValueError(f"loss_mask has {loss_mask.numel()} elements, expected {n_rows} (one per token)")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")


def _check_label_range(labels, weights, V):
    # Only on the CPU, where it costs no sync; on CUDA out-of-range labels read as logit 0.
    if labels.device.type == "cpu":
        bad = (weights != 0) & ((labels < 0) | (labels >= V))
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"label {int(labels[i])} at token {i} is outside the vocabulary [0, {V}); "
                             "mask it with ignore_index or loss_mask")


def _finish(loss, lse, correct, weights, return_stats):
    if not return_stats:
        return loss
    trained = weights != 0
    count = trained.sum()
    hits = (correct.detach() != 0) & trained
    accuracy = torch.where(count > 0, hits.sum() / count.clamp_min(1), torch.zeros((), device=count.device))
    return loss, CEStats(lse, hits, accuracy)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    loss_mask: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: int | float | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_stats: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
):
    """cross_entropy(hidden @ weight.T + bias, labels) without materializing the logits.

    hidden [..., H] (flattened to [N, H]), weight [V, H], labels [...] int64, already shifted.
    Tokens whose label is `ignore_index` are not trained; `loss_mask` ([N] bool or float
    weights) masks or weights tokens further.
    reduction: "mean" = weighted sum / num_items (default: the trained-token count, or the
    weight sum), "sum", or "none" (per-token weighted loss [N]). Pass `num_items`, the count
    over all gradient-accumulation steps, so the loss does not depend on how a batch is split.
    label_smoothing as in F.cross_entropy; z_loss adds z_loss·lse² per token; softcap applies
    softcap·tanh(logits/softcap) first. The loss is fp32. With return_stats, returns
    (loss, CEStats(lse, correct, accuracy)).
    chunk_size: rows per chunk (default: FASTTUNE_CHUNK_BYTES of logits). backend: "auto",
    "triton" or "torch" (default FASTTUNE_BACKEND, else by device).
    """
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., H] and weight [V, H] do not match: {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden is {hidden.dtype} but weight is {weight.dtype}; cast one of them")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    h = hidden.reshape(-1, hidden.shape[-1])
    _check(labels, h.shape[0], loss_mask, reduction, label_smoothing, z_loss, softcap, "hidden")
    labels = labels.reshape(-1).to(device=h.device, dtype=torch.int64)
    weights = _token_weights(labels, loss_mask, ignore_index)
    V = weight.shape[0]
    _check_label_range(labels, weights, V)
    n = _normalizer(weights, num_items, reduction)
    opts = (
        pick_backend(backend, h.device), float(label_smoothing), float(z_loss), softcap,
        chunk_rows(V, h.device, h.dtype, chunk_size),
    )
    b = None if bias is None else bias.to(h.dtype)
    loss, lse, correct = _LinearCE.apply(h, weight, b, labels, weights, n, reduction, opts, torch.is_grad_enabled())
    return _finish(loss, lse, correct, weights, return_stats)


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    loss_mask: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: int | float | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_stats: bool = False,
    backend: str | None = None,
):
    """Cross-entropy on given logits [..., V] with the options of `fused_linear_cross_entropy`.

    Computes in fp32 whatever the logits' dtype, without an fp32 copy of the logits; the
    gradient is written in the logits' dtype.
    """
    z = logits.reshape(-1, logits.shape[-1])
    _check(labels, z.shape[0], loss_mask, reduction, label_smoothing, z_loss, softcap, "logits")
    if z.stride(-1) != 1:
        z = z.contiguous()
    labels = labels.reshape(-1).to(device=z.device, dtype=torch.int64)
    weights = _token_weights(labels, loss_mask, ignore_index)
    V = z.shape[1]
    _check_label_range(labels, weights, V)
    n = _normalizer(weights, num_items, reduction)
    be = pick_backend(backend, z.device)
    chunk = z.shape[0] if be == "triton" else chunk_rows(V, z.device, z.dtype, None)
    opts = (be, float(label_smoothing), float(z_loss), softcap, max(1, chunk))
    loss, lse, correct = _CE.apply(z, labels, weights, n, reduction, opts)
    return _finish(loss, lse, correct, weights, return_stats)
