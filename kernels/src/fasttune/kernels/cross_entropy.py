"""Fused linear + cross-entropy, and cross-entropy on given logits.

`fused_linear_cross_entropy(hidden, weight, labels)` computes
    cross_entropy(hidden @ weight.T + bias, labels)
for a causal LM's head without building the [N, V] logits: rows are taken a chunk at a time
and a chunk's logits live only while that chunk is processed. The same chunk loop is the
engine of `linear_logprobs` (kernels/logprobs.py) and so of the DPO and GRPO losses.

For one token with logits z (after the optional softcap z <- c·tanh(z/c), then the temperature
z <- z/T, which only `linear_logprobs` uses), label y and weight w (0 for ignore_index or
loss_mask False, 1 or the float mask otherwise):

    lse    = log Σ_j exp(z_j)
    loss   = w · [ (1-ε)(lse - z_y) + ε(lse - Σ_j z_j / V) + ζ·lse² ]     ε = label_smoothing, ζ = z_loss
    dL/dz_j = w · [ p_j (1 + 2ζ·lse) - ε/V - (1-ε)·[j = y] ]              p = softmax(z)

Two options change w only. Class weights c [V] (torch's cross_entropy `weight`, Liger's `ce_weight`)
make w = mask · c_y before the call, and the mean divides by Σ w. Token scaling (DFT, TRL's
loss_type="dft", Liger's `use_token_scaling`) multiplies w by the target's probability p_y, held
constant (detached): inside the row function, once p_y is known, for the loss and the gradient alike.

1 - p_y is formed as Σ_{j≠y} p_j / Σ_j p_j, never as 1 - p_y, so the loss and the target's
gradient keep their relative precision when the target's probability is close to 1.

How it runs:
- One chunk loop serves both backends: logits = h_c @ W.T (+ b) in the input dtype (the matmul
  accumulates in fp32); a row function turns the chunk, in place, into dL/dlogits and writes
  loss, lse, accuracy (and entropy); then dh_c = g @ W and dW += g.T @ h_c into an fp32
  accumulator.
- The row function is a Triton kernel (one program per row, two passes over the vocabulary:
  an online max/sum, then the gradient) or the same maths in PyTorch on the chunk.
- reduction mean/sum: the gradient only scales with the upstream scalar, so it is computed
  during the forward and the backward is a multiplication: 3 matmuls in all, as the naive way.
- reduction none: the upstream gradient is per token and only known in the backward. With a
  frozen head (LoRA) the forward also computes dh per token and the backward scales its rows
  (2 matmuls); with a trainable head the backward recomputes each chunk's logits with the
  per-token upstream folded into w (4 matmuls).
- Masked tokens cost no matmul work when the mask is on the host: labels (and loss_mask) on the
  CPU, which is always so for CPU tensors and is allowed with CUDA hidden states. With labels on
  CUDA, sizing the loop by the trained count would need a host sync, so masked rows go through
  the matmuls and the kernel writes zeros for them.
"""

from typing import NamedTuple

import torch

from ._backend import Op, aot_signature, chunk_rows, empty, pick_backend, tl, triton

# Launch table of the row kernel: (BLOCK_V, num_warps). A vocabulary takes the smallest tile that
# holds it, else the largest. kernels/_aot.py compiles every entry; tests swap in a small tile to
# cover many tiles per row.
ROW_TILES = ((1024, 4), (2048, 8), (4096, 16))


class HeadOptions(NamedTuple):
    """The options of one head op call (`head_op`), which logprobs.py shares."""

    backend: str  # "triton" | "torch"
    chunk: int  # rows per chunk
    eps: float = 0.0  # label smoothing
    z_loss: float = 0.0
    softcap: float | None = None
    inv_temp: float = 1.0
    entropy: bool = False  # also compute each token's entropy
    token_scaling: bool = False  # DFT: scale each token's loss and gradient by its detached p_y


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
    loss_ptr, lse_ptr, correct_ptr, entropy_ptr,  # [C] fp32 outputs (entropy if COMPUTE_ENTROPY)
    V, label_smoothing, z_loss, softcap, inv_temp,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr,
    TOKEN_SCALING: tl.constexpr,
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
        z_y = z_y * inv_temp

        # Pass 1: running max m, Σ_{j≠y} exp(z_j - m), Σ_j z_j and, for the entropy,
        # Σ_{j≠y} exp(z_j - m)·z_j; the sums are rescaled whenever m grows.
        m = float("-inf")
        d_other = 0.0
        z_sum = 0.0
        ez_other = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            valid = offs < V
            z = tl.load(logits_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = softcap * _tanh(z / softcap)
            z = z * inv_temp
            z_fin = tl.where(valid, z, 0.0)
            z_sum += tl.sum(z_fin, 0)
            z = tl.where(valid, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, 0))
            e = tl.where(offs == y, 0.0, tl.exp(z - m_new))
            scale = tl.exp(m - m_new)
            d_other = d_other * scale + tl.sum(e, 0)
            if COMPUTE_ENTROPY:
                ez_other = ez_other * scale + tl.sum(e * z_fin, 0)
            m = m_new

        e_y = tl.exp(z_y - m)
        total = d_other + e_y
        lse = m + tl.log(total)
        q = d_other / total  # 1 - p_y, without cancellation
        # lse - z_y = log(1 + Σ_{j≠y} exp(z_j - z_y)); log1p keeps it exact when p_y ≈ 1.
        nll = tl.where(m - z_y < 1.0, _log1p(d_other * tl.exp(m - z_y)), lse - z_y)
        loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - z_sum / V) + z_loss * lse * lse
        if TOKEN_SCALING:
            w = w * (e_y / total)  # DFT: × p_y, a constant for the gradient
        tl.store(loss_ptr + row, w * loss)
        tl.store(lse_ptr + row, lse)
        tl.store(correct_ptr + row, (z_y >= m).to(tl.float32))
        if COMPUTE_ENTROPY:
            tl.store(entropy_ptr + row, lse - (ez_other + e_y * z_y) / total)  # H = lse - Σ p_j z_j

        if COMPUTE_GRAD:
            # Pass 2: dL/dz_j = w·[p_j(1 + 2ζ·lse) - ε/V - (1-ε)[j=y]], with the j = y term
            # rewritten as -q + p_y·2ζ·lse + ε(1 - 1/V); then the chain rule through z/T and
            # the softcap.
            coef = 2.0 * z_loss * lse
            smooth = label_smoothing / V
            g_y = -q + (e_y / total) * coef + label_smoothing - smooth
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                valid = offs < V
                z = tl.load(logits_ptr + offs, mask=valid, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    z = softcap * _tanh(z / softcap)
                p = tl.exp(z * inv_temp - lse)
                g = tl.where(offs == y, g_y, p * (1.0 + coef) - smooth)
                if HAS_SOFTCAP:  # z is the softcapped logit, before the temperature
                    g = g * (1.0 - (z / softcap) * (z / softcap))
                g = g * (w * inv_temp)
                tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=valid)
    else:
        tl.store(loss_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        tl.store(correct_ptr + row, 0.0)
        if COMPUTE_ENTROPY:
            tl.store(entropy_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                zero = tl.zeros([BLOCK_V], dtype=tl.float32)
                tl.store(grad_ptr + offs, zero.to(grad_ptr.dtype.element_ty), mask=offs < V)


def _rows_triton(logits, grad, labels, weights, o: HeadOptions):
    C, V = logits.shape
    loss, lse, correct = (empty(C, dtype=torch.float32, device=logits.device) for _ in range(3))
    entropy = empty(C, dtype=torch.float32, device=logits.device) if o.entropy else None
    if C > 0:
        block, warps = next((t for t in ROW_TILES if t[0] >= V), ROW_TILES[-1])
        g = grad if grad is not None else logits
        _ce_rows_kernel[(C,)](
            logits, logits.stride(0), g, g.stride(0), labels, weights,
            loss, lse, correct, entropy if o.entropy else loss,
            V, o.eps, o.z_loss, float(o.softcap or 1.0), o.inv_temp,
            HAS_SOFTCAP=o.softcap is not None, COMPUTE_GRAD=grad is not None, COMPUTE_ENTROPY=o.entropy,
            TOKEN_SCALING=o.token_scaling, BLOCK_V=block, num_warps=warps,
        )
    return loss, lse, correct, entropy


def gpu_variants():
    """Every build `_rows_triton` can pick, for the ahead-of-time compile check (kernels/_aot.py)."""
    for ty in ("fp32", "bf16", "fp16"):
        sig = aot_signature(_ce_rows_kernel, ty, ("label_smoothing", "z_loss", "softcap", "inv_temp"),
                            fp32=("weights_ptr", "loss_ptr", "lse_ptr", "correct_ptr", "entropy_ptr"), scalars=("V",))
        sig["labels_ptr"] = "*i64"
        # the entropy is for linear_logprobs and token scaling for the SFT loss: never both
        for softcap in (False, True):
            for grad in (False, True):
                for entropy, scaling in ((False, False), (True, False), (False, True)):
                    for i, (block, warps) in enumerate(ROW_TILES):
                        flags = dict(HAS_SOFTCAP=softcap, COMPUTE_GRAD=grad, COMPUTE_ENTROPY=entropy,
                                     TOKEN_SCALING=scaling, BLOCK_V=block)
                        name = (f"ce_rows {ty} V-tile={block} w{warps} softcap={int(softcap)} grad={int(grad)} "
                                f"entropy={int(entropy)}" + (" dft=1" if scaling else ""))
                        yield name, _ce_rows_kernel, sig, flags, warps, 3, True


# --------------------------------------------------------------------------------------------
# PyTorch (CPU path and reference for the kernel; float64 references live in the tests)
# --------------------------------------------------------------------------------------------


def _rows_torch(logits, grad, labels, weights, o: HeadOptions):
    """The row function in PyTorch on one chunk: same maths and outputs as `_ce_rows_kernel`.

    Works in place on whatever it owns (an fp32 copy of low-precision logits, or the chunk
    buffer it is to overwrite with the gradient): one chunk of fp32 memory, two with a softcap
    or the entropy, which need z after the exponentials.
    """
    C, V = logits.shape
    eps, z_loss, cap, t = o.eps, o.z_loss, o.softcap, o.inv_temp
    z = logits.float()
    own = z is not logits or grad is logits  # may z be overwritten?
    if cap is not None:
        z = (z.div_(cap) if own else z / cap).tanh_().mul_(cap)
        own = True
    if t != 1.0:
        z = z.mul_(t) if own else z * t
        own = True
    trained = weights != 0
    y = torch.where(trained & (labels >= 0) & (labels < V), labels, 0).unsqueeze(1)
    z_y = z.gather(1, y).squeeze(1)
    z_sum = z.sum(1) if eps else None
    m = z.amax(1)
    keep_z = cap is not None or o.entropy
    e = (z.sub_(m.unsqueeze(1)) if own and not keep_z else z - m.unsqueeze(1)).exp_()
    e.scatter_(1, y, 0.0)  # e_j = exp(z_j - m) for j ≠ y
    d_other = e.sum(1)
    e_y = (z_y - m).exp()
    total = d_other + e_y
    lse = m + total.log()
    nll = torch.where(m - z_y < 1.0, torch.log1p(d_other * (m - z_y).exp()), lse - z_y)
    loss = (1 - eps) * nll + (eps * (lse - z_sum / V) if eps else 0) + z_loss * lse * lse
    zero = torch.zeros((), device=z.device)
    if o.token_scaling:  # DFT: × p_y, a constant for the gradient
        weights = weights * (e_y / total)
    loss = torch.where(trained, weights * loss, zero)
    correct = (trained & (z_y >= m)).float()
    entropy = None
    if o.entropy:  # H = lse - Σ_j p_j z_j
        entropy = torch.where(trained, lse - (torch.einsum("ij,ij->i", e, z) + e_y * z_y) / total, zero)
    lse = torch.where(trained, lse, zero)

    if grad is not None:
        coef = (2 * z_loss * lse).unsqueeze(1)
        smooth = eps / V
        g = e.mul_((1 / total).unsqueeze(1)).mul_(1 + coef).sub_(smooth)  # p_j(1 + 2ζ·lse) - ε/V, j ≠ y
        g_y = -d_other / total + (e_y / total) * coef.squeeze(1) + eps - smooth
        g.scatter_(1, y, g_y.unsqueeze(1))
        if cap is not None:  # d softcap / d logit = 1 - (capped / cap)², capped = z / t
            g.mul_(z.mul_(1 / (t * cap)).square_().neg_().add_(1))
        g.mul_((torch.where(trained, weights, zero) * t).unsqueeze(1))
        if g is not grad:
            grad.copy_(g)
    return loss, lse, correct, entropy


def _rows(logits, grad, labels, weights, o: HeadOptions):
    """Per-row loss, lse, correct, entropy (or None); dL/dlogits into `grad` unless it is None."""
    fn = _rows_triton if o.backend == "triton" else _rows_torch
    return fn(logits, grad, labels, weights, o)


# --------------------------------------------------------------------------------------------
# The chunk loop
# --------------------------------------------------------------------------------------------


_FP32_OUT_GEMM = {"ok": True}  # does this torch's CUDA addmm take bf16/fp16 inputs with out_dtype=fp32?


def _add_grad_weight(acc, g, h):
    """acc[V, H] (fp32) += g.T @ h without a [V, H] temporary wider than a block of rows."""
    if g.dtype == torch.float32:
        acc.addmm_(g.t(), h)
        return
    if acc.device.type == "cuda" and _FP32_OUT_GEMM["ok"]:
        try:  # one GEMM accumulating low-precision products straight into the fp32 accumulator
            torch.addmm(acc, g.t(), h, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):
            _FP32_OUT_GEMM["ok"] = False
    step = max(1, (64 * 2**20) // (4 * h.shape[1]))  # ≤ 64 MiB of fp32 per block
    for v0 in range(0, acc.shape[0], step):
        acc[v0 : v0 + step] += (g[:, v0 : v0 + step].t() @ h).float()


def _linear_ce_chunks(h, w, b, labels, weights, rows, o: HeadOptions, need_gh, need_gw, need_gb):
    """Run the head over the rows `rows` of h (None: all) a chunk at a time.

    Returns per-row loss, lse, correct, entropy ([N] fp32, 0 for rows not run; entropy None unless
    asked) and the gradients of Σ loss (None where not needed). `labels` and `weights` are on
    h's device.
    """
    N, V = h.shape[0], w.shape[0]
    dev = h.device
    need_grad = need_gh or need_gw or need_gb
    gh = torch.zeros(h.shape, dtype=h.dtype, device=dev) if need_gh else None
    gw = torch.zeros(w.shape, dtype=torch.float32, device=dev) if need_gw else None
    gb = torch.zeros(V, dtype=torch.float32, device=dev) if need_gb else None
    hs, ys, ws = (h, labels, weights) if rows is None else (h[rows], labels[rows], weights[rows])
    n = hs.shape[0]
    outs = [empty(n, dtype=torch.float32, device=dev) for _ in range(4 if o.entropy else 3)]

    buf = torch.empty(min(o.chunk, n), V, dtype=h.dtype, device=dev)  # one chunk of logits, reused
    for s in range(0, n, o.chunk):
        e = min(s + o.chunk, n)
        hc = hs[s:e]
        logits = buf[: e - s]
        if b is None:
            torch.mm(hc, w.t(), out=logits)
        else:
            torch.addmm(b, hc, w.t(), out=logits)
        res = _rows(logits, logits if need_grad else None, ys[s:e], ws[s:e], o)
        for out, r in zip(outs, res):
            out[s:e] = r
        if need_gh:
            if rows is None:
                torch.mm(logits, w, out=gh[s:e])
            else:
                gh[rows[s:e]] = logits @ w
        if need_gw:
            _add_grad_weight(gw, logits, hc)
        if need_gb:
            gb += logits.sum(0, dtype=torch.float32)

    if rows is not None:
        full = [torch.zeros(N, dtype=torch.float32, device=dev) for _ in outs]
        for dst, src in zip(full, outs):
            dst[rows] = src
        outs = full
    loss, lse, correct, entropy = (*outs, None) if len(outs) == 3 else outs
    return loss, lse, correct, entropy, gh, gw, gb


def _trained_rows(select, n_rows, device):
    """Indices of the trained rows, from weights on the host; None when every row is trained or
    the weights are not on the host (finding them there would sync)."""
    if select is None or select.device.type != "cpu":
        return None
    rows = select.nonzero().squeeze(1)
    if rows.numel() == n_rows:
        return None
    return rows.to(device, non_blocking=True)


# The head as a torch.library custom op, so that torch.compile(fullgraph=True) runs through it as
# one opaque call. Its inputs may live on two devices: labels, weights and `select` (the weights
# on the host, or None) stay where the caller made them; finding the trained rows from `select`
# happens inside the op, so masked rows skip the matmuls in eager and compiled code alike.
# Outputs: loss (reduced), lse, correct, entropy ([0] unless asked) and the gradients of Σ loss
# gh, gw, gb ([0] unless asked; gw and gb fp32). Which gradients the forward forms:
# - reduction mean/sum: all of them; the backward multiplies by the upstream scalar / n;
# - none with a frozen head: gh per token; the backward scales its rows;
# - none with a trainable head: none; the backward calls the op again (reduction sum) with the
#   upstream folded into the weights (4 matmuls in all). `_formed_now` is this rule.


def _formed_now(reduction, need_gh, need_gw, need_gb):
    """The gradients the forward forms: all of them for mean/sum; for none only dh, and only with a
    frozen head (with a trainable one the backward forms them all, knowing the upstream)."""
    if reduction != "none":
        return need_gh, need_gw, need_gb
    return need_gh and not (need_gw or need_gb), False, False


def _linear_ce_impl(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, labels: torch.Tensor, weights: torch.Tensor,
    select: torch.Tensor | None, n: torch.Tensor, reduction: str, eps: float, z_loss: float,
    softcap: float | None, inv_temp: float, entropy: bool, token_scaling: bool, backend: str, chunk: int,
    need_gh: bool, need_gw: bool, need_gb: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(h.device.type, enabled=False):  # keep the dtypes we were given
        rows = _trained_rows(select, h.shape[0], h.device)
        o = HeadOptions(backend, chunk, eps, z_loss, softcap, inv_temp, entropy, token_scaling)
        labels, weights = labels.to(h.device, non_blocking=True), weights.to(h.device, non_blocking=True)
        loss, lse, correct, ent, gh, gw, gb = _linear_ce_chunks(h, w, b, labels, weights, rows, o,
                                                                *_formed_now(reduction, need_gh, need_gw, need_gb))
        outs = (ent, gh, gw, gb)
        return (_reduce(loss, n.to(h.device), reduction), lse, correct,
                *(h.new_empty(0) if x is None else x for x in outs))  # distinct empties: outputs may not alias


def _linear_ce_fake(h, w, b, labels, weights, select, n, reduction, eps, z_loss, softcap, inv_temp, entropy,
                    token_scaling, backend, chunk, need_gh, need_gw, need_gb):
    N, V = h.shape[0], w.shape[0]
    need_gh, need_gw, need_gb = _formed_now(reduction, need_gh, need_gw, need_gb)
    f32 = lambda *shape: h.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return (f32(N) if reduction == "none" else f32(), f32(N), f32(N), f32(N if entropy else 0),
            h.new_empty(h.shape if need_gh else (0,)), f32(*(w.shape if need_gw else (0,))), f32(V if need_gb else 0))


def _linear_ce_setup(ctx, inputs, output):
    h, w, b, labels, weights, select, n, reduction, *opts = inputs
    need_gh, need_gw, need_gb = opts[-3:]
    ctx.inputs = (reduction, *opts)
    ctx.dtypes = (h.dtype, w.dtype, None if b is None else b.dtype)
    ctx.recompute = reduction == "none" and (need_gw or need_gb)
    if ctx.recompute:
        ctx.save_for_backward(h, w, b, labels, weights, select, n)
    else:
        ctx.save_for_backward(*output[4:], n)  # gh, gw, gb formed in the forward
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero tensors for the outputs that get no gradient


def _linear_ce_backward(ctx, grad_loss, *_):
    reduction, eps, z_loss, softcap, inv_temp, entropy, scaling, backend, chunk, need_gh, need_gw, need_gb = ctx.inputs
    h_dtype, w_dtype, b_dtype = ctx.dtypes
    if ctx.recompute:
        h, w, b, labels, weights, select, n = ctx.saved_tensors
        up = weights.to(h.device) * grad_loss.float()  # the upstream folded into the weights: then Σ up·loss
        _, _, _, _, gh, gw, gb = _linear_ce.no_autograd(h, w, b, labels, up, select, n, "sum", eps, z_loss, softcap,
                                                        inv_temp, False, scaling, backend, chunk,
                                                        need_gh, need_gw, need_gb)
    elif reduction == "none":  # frozen head: dh per token was formed in the forward
        gh, gw, gb, n = ctx.saved_tensors
        gh, gw, gb = _mul(gh, grad_loss.to(gh.dtype).unsqueeze(1)) if need_gh else None, None, None
    else:
        gh, gw, gb, n = ctx.saved_tensors
        s = _scale(grad_loss.float(), n.to(grad_loss.device))
        gh = _mul(gh, s.to(gh.dtype)) if need_gh else None
        gw = _mul(gw, s) if need_gw else None
        gb = _mul(gb, s) if need_gb else None
    grads = (gh.to(h_dtype) if need_gh else None, gw.to(w_dtype) if need_gw else None,
             gb.to(b_dtype) if need_gb else None)
    return (*grads, *(None,) * 16)


def _mul(buffer, factor):
    # Eager: in place, so no second [V, H] fp32 buffer; these buffers are ours, and a second
    # backward through the same graph is caught by autograd's saved-tensor version check instead
    # of scaling twice. Traced (torch.compile): out of place, which the graph's functional form needs.
    if torch.compiler.is_compiling() or isinstance(buffer, torch._subclasses.FakeTensor):
        return buffer * factor
    return buffer.mul_(factor)


_linear_ce = Op("linear_ce", _linear_ce_impl, _linear_ce_fake, _linear_ce_setup, _linear_ce_backward)


def head_op(h, w, b, labels, weights, select, n, reduction, o: HeadOptions):
    """Call the head op, asking for the gradients autograd will want."""
    grad = torch.is_grad_enabled()
    return _linear_ce(h, w, b, labels, weights, select, n, reduction, o.eps, o.z_loss, o.softcap, o.inv_temp,
                      o.entropy, o.token_scaling, o.backend, o.chunk, grad and h.requires_grad, grad and w.requires_grad,
                      grad and b is not None and b.requires_grad)


def _ce_impl(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, n: torch.Tensor, reduction: str,
        eps: float, z_loss: float, softcap: float | None, token_scaling: bool, backend: str, chunk: int,
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy on given logits: loss, lse, correct."""
    labels, weights = labels.to(logits.device, non_blocking=True), weights.to(logits.device, non_blocking=True)
    o = HeadOptions(backend, chunk, eps, z_loss, softcap, token_scaling=token_scaling)
    N = logits.shape[0]
    loss, lse, correct = (empty(N, dtype=torch.float32, device=logits.device) for _ in range(3))
    for s in range(0, N, o.chunk):
        e = min(s + o.chunk, N)
        loss[s:e], lse[s:e], correct[s:e], _ = _rows(logits[s:e], None, labels[s:e], weights[s:e], o)
    return _reduce(loss, n.to(logits.device), reduction), lse, correct


def _ce_fake(logits, labels, weights, n, reduction, eps, z_loss, softcap, token_scaling, backend, chunk):
    N = logits.shape[0]
    f32 = lambda *shape: logits.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return f32(N) if reduction == "none" else f32(), f32(N), f32(N)


def _ce_backward_impl(logits: torch.Tensor, labels: torch.Tensor, up: torch.Tensor, eps: float, z_loss: float,
                 softcap: float | None, token_scaling: bool, backend: str, chunk: int) -> torch.Tensor:
    """dL/dlogits for per-token upstream factors `up` (weight × upstream gradient)."""
    labels = labels.to(logits.device, non_blocking=True)
    o = HeadOptions(backend, chunk, eps, z_loss, softcap, token_scaling=token_scaling)
    grad = empty(*logits.shape, dtype=logits.dtype, device=logits.device)
    for s in range(0, logits.shape[0], o.chunk):
        e = min(s + o.chunk, logits.shape[0])
        _rows(logits[s:e], grad[s:e], labels[s:e], up[s:e], o)
    return grad


_ce_backward = Op("cross_entropy_backward", _ce_backward_impl,
                  lambda logits, labels, up, eps, z_loss, softcap, token_scaling, backend, chunk: torch.empty_like(logits))


def _ce_setup(ctx, inputs, output):
    logits, labels, weights, n, reduction, *opts = inputs
    ctx.save_for_backward(logits, labels, weights, n)
    ctx.reduction, ctx.opts = reduction, opts
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _ce_grad(ctx, grad_loss, *_):
    logits, labels, weights, n = ctx.saved_tensors
    g = grad_loss.float()
    up = weights.to(logits.device) * (g if ctx.reduction == "none" else _scale(g, n.to(g.device)))
    return (_ce_backward(logits, labels, up, *ctx.opts),) + (None,) * 10


_ce = Op("cross_entropy", _ce_impl, _ce_fake, _ce_setup, _ce_grad)


# --------------------------------------------------------------------------------------------
# Shared argument handling (also used by logprobs.py)
# --------------------------------------------------------------------------------------------


def _token_weights(labels, loss_mask, ignore_index, class_weights=None):
    w = (labels != ignore_index).float()
    if loss_mask is not None:
        w = w * loss_mask.to(device=w.device, dtype=torch.float32).reshape(-1)
    if class_weights is not None:  # w_t × c[y_t], as torch's cross_entropy(weight=c)
        c = class_weights.to(device=w.device, dtype=torch.float32)
        w = w * c[torch.where(w != 0, labels, 0).clamp(0, c.shape[0] - 1)]
    return w


def _normalizer(weights, num_items, reduction, device):
    """The divisor of the summed loss as a 0-d fp32 tensor on `device` (1 for sum/none)."""
    # Made on the device (torch.full) or copied without blocking: no host sync on CUDA.
    if reduction != "mean":
        return torch.ones((), device=device)
    if num_items is None:
        n = weights.sum()
    elif isinstance(num_items, torch.Tensor):
        n = num_items.to(dtype=torch.float32).reshape(())
    else:
        return torch.full((), float(num_items), device=device)
    return n.to(device, non_blocking=True)


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


def check_head(hidden, weight, bias):
    """hidden, weight and bias fit one head (shared with logprobs.py): a clear error if not."""
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., H] and weight [V, H] do not match: {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden is {hidden.dtype} but weight is {weight.dtype}; cast one of them")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")


def _check_sft_options(class_weights, V, label_smoothing):
    if class_weights is None:
        return
    if class_weights.shape != (V,) or not class_weights.is_floating_point():
        raise ValueError(f"class_weights must be a float tensor [V] = [{V}], got {class_weights.dtype} "
                         f"{tuple(class_weights.shape)}")
    if label_smoothing:
        raise ValueError("class_weights with label_smoothing is not supported; use one or the other")


def check_args(labels, n_rows, loss_mask, reduction, label_smoothing, z_loss, softcap, what):
    """The labels and options of a loss over `n_rows` rows of `what` (shared with logprobs.py)."""
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
    # Only for labels on the CPU, where it costs no sync, and in eager code (a compiled graph cannot
    # branch on data); on CUDA out-of-range labels read as logit 0.
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (weights != 0) & ((labels < 0) | (labels >= V))
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"label {int(labels[i])} at token {i} is outside the vocabulary [0, {V}); "
                             "mask it with ignore_index or loss_mask")


def prepare_head(hidden, weight, labels, *, ignore_index, loss_mask, class_weights=None):
    """Flatten a head call: h [N, H], labels [N] int64 and token weights where the caller made the
    labels, and `select`, the weights again if they are on the host (for skipping masked rows)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(torch.int64)
    weights = _token_weights(labels, loss_mask, ignore_index, class_weights)
    _check_label_range(labels, weights, weight.shape[0])
    return h, labels, weights, weights if weights.device.type == "cpu" else None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


class CEStats(NamedTuple):
    """Per-token statistics returned with `return_stats=True` (0 for tokens not trained)."""

    lse: torch.Tensor  # [N] fp32 log-sum-exp of the (softcapped) logits
    correct: torch.Tensor  # [N] bool: argmax == label
    accuracy: torch.Tensor  # 0-d fp32: correct / trained tokens (0 if none)


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
    token_scaling: bool = False,
    class_weights: torch.Tensor | None = None,
    return_stats: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
):
    """cross_entropy(hidden @ weight.T + bias, labels) without materializing the logits.

    hidden [..., H] (flattened to [N, H]), weight [V, H], labels [...] int64, already shifted.
    Tokens whose label is `ignore_index` are not trained; `loss_mask` ([N] bool or float
    weights) masks or weights tokens further. Labels and loss_mask may stay on the CPU while
    hidden is on CUDA: then masked tokens skip the matmuls without a host sync.
    reduction: "mean" = weighted sum / num_items (default: the trained-token count, or the
    weight sum), "sum", or "none" (per-token weighted loss [N]). Pass `num_items`, the count
    over all gradient-accumulation steps, so the loss does not depend on how a batch is split.
    label_smoothing as in F.cross_entropy; z_loss adds z_loss·lse² per token; softcap applies
    softcap·tanh(logits/softcap) first. The loss is fp32. With return_stats, returns
    (loss, CEStats(lse, correct, accuracy)).
    token_scaling: DFT (TRL's loss_type="dft", Liger's use_token_scaling): each token's loss is
    multiplied by its target probability p_y, detached; the mean still divides by the token count.
    class_weights [V]: a weight per target class, as F.cross_entropy's `weight` (and Liger's
    ce_weight): token t weighs class_weights[labels_t], and the mean divides by the summed weights
    of the trained tokens. Keep it on the labels' device (a CUDA copy with host labels syncs).
    chunk_size: rows per chunk (default: FASTTUNE_CHUNK_BYTES of logits). backend: "auto",
    "triton" or "torch" (default FASTTUNE_BACKEND, else by device).
    """
    check_head(hidden, weight, bias)
    N = hidden.numel() // hidden.shape[-1]
    check_args(labels, N, loss_mask, reduction, label_smoothing, z_loss, softcap, "hidden")
    _check_sft_options(class_weights, weight.shape[0], label_smoothing)
    h, labels, weights, select = prepare_head(hidden, weight, labels, ignore_index=ignore_index, loss_mask=loss_mask,
                                              class_weights=class_weights)
    n = _normalizer(weights, num_items, reduction, h.device)
    o = HeadOptions(pick_backend(backend, h.device), chunk_rows(weight.shape[0], h.device, h.dtype, chunk_size),
              float(label_smoothing), float(z_loss), softcap, token_scaling=bool(token_scaling))
    b = None if bias is None else bias.to(h.dtype)
    loss, lse, correct = head_op(h, weight, b, labels, weights, select, n, reduction, o)[:3]
    return _finish(loss, lse, correct, weights.to(h.device, non_blocking=True), return_stats)


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
    token_scaling: bool = False,
    class_weights: torch.Tensor | None = None,
    return_stats: bool = False,
    backend: str | None = None,
):
    """Cross-entropy on given logits [..., V] with the options of `fused_linear_cross_entropy`.

    Computes in fp32 whatever the logits' dtype, without an fp32 copy of the logits; the
    gradient is written in the logits' dtype.
    """
    z = logits.reshape(-1, logits.shape[-1])
    check_args(labels, z.shape[0], loss_mask, reduction, label_smoothing, z_loss, softcap, "logits")
    if z.stride(-1) != 1:
        z = z.contiguous()
    _check_sft_options(class_weights, z.shape[1], label_smoothing)
    labels = labels.reshape(-1).to(torch.int64)
    weights = _token_weights(labels, loss_mask, ignore_index, class_weights)
    _check_label_range(labels, weights, z.shape[1])
    n = _normalizer(weights, num_items, reduction, z.device)
    be = pick_backend(backend, z.device)
    chunk = z.shape[0] if be == "triton" else chunk_rows(z.shape[1], z.device, z.dtype, None)
    loss, lse, correct = _ce(z, labels, weights, n, reduction, float(label_smoothing), float(z_loss), softcap,
                             bool(token_scaling), be,
                             max(1, chunk))
    return _finish(loss, lse, correct, weights.to(z.device, non_blocking=True), return_stats)
