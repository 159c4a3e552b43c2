"""Packed-sequence (varlen) attention, forward and backward, in the flash-attention 2 style.

    varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True) -> o

q [T, Hq, D], k and v [T, Hkv, D] hold B samples back to back; cu_seqlens [B + 1] (int32) are
their boundaries, as in flash_attn_varlen_func. A token attends only to tokens of its own sample
(causally, by default), so packing several samples into one row wastes no compute on padding and
never lets one sample see another. Hq must be a multiple of Hkv (GQA, MQA): q head h reads kv
head h // (Hq / Hkv), as transformers' repeat_kv does.

Options transformers' attention functions pass, for Gemma 2: `softcap` (scores <- c·tanh(s/c))
and `window` (a token sees the `window` most recent tokens of its sample, itself included).

How it runs (Triton):
- Work is a list of (sample, block) pairs: sample i has ceil(L_i / BLOCK) blocks, and program p
  finds its pair by a binary search over the cumulative block counts. The grid is
  ceil(T / BLOCK) + B programs, an upper bound known on the host; programs past the last pair
  return at once. Many short samples beside a long one waste nothing and nothing syncs.
- Forward: per (sample, query block, head), an online softmax over the key blocks in the loop
  bounds (causal: up to the diagonal; window: from the oldest visible key), in base 2. Saves the
  log-sum-exp per row for the backward.
- Backward: delta = rowsum(dO ∘ O); then one program per (sample, key block, kv head) sums dK
  and dV over the query blocks and over every q head of its group (deterministic, no atomics),
  and one program per (sample, query block, q head) forms dQ.
- Only tiles that cross a sample's end, the causal diagonal or the window's edge build the mask.
  Causality, window, softcap and the GQA ratio are runtime arguments, so one build serves them all;
  the constexprs are the head dim, the tile and SEGMENTED (prefix sharing, `segments`). Tiles come
  from the launch table `TILES` (autotuned
  on a GPU), and every entry is compiled for sm_80/sm_90 in the tests (kernels/_aot.py).
The PyTorch path (CPU) runs each sample through scaled_dot_product_attention; in eager code autograd
differentiates it, and inside torch.compile it runs as the custom ops fasttune::varlen_attention(_backward)
with an explicit backward, as the Triton path always does.
"""

import math
import os

import torch
import torch.nn.functional as F

from ._backend import Op, aot_signature, empty, interpreting, pick_backend, tl, triton

LOG2E = tl.constexpr(1.4426950408889634)  # @triton.jit code may read no module global but a constexpr
NO_WINDOW = 1 << 30  # the window passed when there is none: every key of a sample is within it

# Launch table. For each pass, per head-dim tile BLOCK_D and element size in bytes, the tiles it may
# use: (BLOCK_M query rows, BLOCK_N key rows, num_warps, num_stages). The first entry is the
# default: the interpreter runs it, and it fits the 99 KiB of shared memory of the smallest GPU we
# target (sm_86/sm_89). On a GPU the launcher times a pass's entries once per shape class and keeps
# the fastest (`_tile`). tests/test_gpu_compile.py compiles every entry (`gpu_variants`).
TILES = {
    "fwd": {
        (64, 2): [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
        (128, 2): [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2)],
        (256, 2): [(16, 32, 8, 1)],
        (64, 4): [(32, 32, 8, 2)],
        (128, 4): [(16, 32, 8, 1)],
        (256, 4): [(16, 32, 8, 1)],
    },
    "dq": {
        (64, 2): [(64, 64, 8, 2), (128, 32, 8, 2)],
        (128, 2): [(64, 32, 8, 2), (32, 64, 8, 2)],
        (256, 2): [(16, 32, 8, 1)],
        (64, 4): [(32, 32, 8, 2)],
        (128, 4): [(16, 32, 8, 1)],
        (256, 4): [(16, 32, 8, 1)],
    },
    "dkdv": {  # 128x32 at D<=64 and 64x32 at D<=128 left out: they spill 312 / 96 B per thread on sm_80
        (64, 2): [(64, 32, 8, 2), (32, 32, 4, 2)],
        (128, 2): [(32, 64, 8, 2), (32, 32, 8, 2)],
        (256, 2): [(16, 32, 8, 1)],
        (64, 4): [(16, 32, 8, 1)],
        (128, 4): [(16, 32, 8, 1)],
        (256, 4): [(16, 32, 8, 1)],
    },
}
HEAD_DIMS = (32, 64, 80, 96, 128, 192, 256)  # the head dims the compile check covers (192: DeepSeek's MLA)
FORCE_TILES = None  # {pass: tile}: tests run small or chosen tiles under the interpreter
_TUNED = {}  # autotune cache: (pass, dtype, BLOCK_D, length class, device) -> tile


# --------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Triton's interpreter (3.9) computes garbage for tl.dot on bf16 operands: when
    # interpreting bf16, multiply in fp32 instead. On a GPU UPCAST is always False.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _locate(cu_seqlens, cu_blocks, pid, n_seqs, search_steps):
    """Program pid's pair: its sample's first token and length, and its block within the sample.
    The sample is the i with cu_blocks[i] <= pid < cu_blocks[i + 1] (binary search)."""
    lo = pid * 0
    hi = lo + n_seqs
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        go_right = tl.load(cu_blocks + mid) <= pid
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    start = tl.load(cu_seqlens + lo)
    return start, tl.load(cu_seqlens + lo + 1) - start, pid - tl.load(cu_blocks + lo)


@triton.jit
def _load_rows(ptr, start, idx, L, stride_t, offs_d, dmask):
    """The [len(idx), BLOCK_D] tile of tokens start + idx (ptr already at the head); rows past L and
    padded dims read as 0."""
    off = (start + idx)[:, None].to(tl.int64) * stride_t + offs_d[None, :]
    return tl.load(ptr + off, mask=(idx[:, None] < L) & dmask, other=0.0)


@triton.jit
def _store_rows(ptr, start, idx, L, stride_t, offs_d, dmask, value):
    """Write `value` to the rows of tokens start + idx (ptr already at the head), those < L only."""
    off = (start + idx)[:, None].to(tl.int64) * stride_t + offs_d[None, :]
    tl.store(ptr + off, value.to(ptr.dtype.element_ty), mask=(idx[:, None] < L) & dmask)


@triton.jit
def _key_range(r0, L, window, causal, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keys the query rows [r0, r0 + BLOCK_M) can see: up to the diagonal (causal), from the
    oldest key in the window; lo is a multiple of BLOCK_N."""
    lo = tl.maximum(r0 - window + 1, 0) // BLOCK_N * BLOCK_N
    hi = L
    if causal:
        hi = tl.minimum(L, r0 + BLOCK_M)
    return lo, hi


@triton.jit
def _query_range(c0, L, window, causal, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The queries that can see a key of [c0, c0 + BLOCK_N): from the block of the diagonal
    (causal), up to the last key + window; lo is a multiple of BLOCK_M."""
    lo = c0 * 0
    if causal:
        lo = c0 // BLOCK_M * BLOCK_M
    return lo, tl.minimum(L, c0 + BLOCK_N - 1 + window)


@triton.jit
def _needs_mask(r0, c0, L, window, causal, SEGMENTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Only the tiles (query rows [r0, r0 + BLOCK_M), keys [c0, c0 + BLOCK_N)) that cross the end of
    the sample, the causal diagonal or the window's edge pay for the mask; full tiles skip it.
    With segments every tile is masked."""
    if SEGMENTED:
        return True
    edge = (r0 + BLOCK_M > L) | (c0 + BLOCK_N > L)
    diagonal = (causal != 0) & (c0 + BLOCK_N - 1 > r0)
    outside = r0 + BLOCK_M - 1 - c0 >= window
    return edge | diagonal | outside


@triton.jit
def _visible(rows, cols, L, window, causal, SEG, start, SEGMENTED: tl.constexpr):
    ok = (rows[:, None] < L) & (cols[None, :] < L) & (rows[:, None] - cols[None, :] < window)
    if causal:
        ok = ok & (rows[:, None] >= cols[None, :])
    if SEGMENTED:  # a key of segment 0 (the shared prefix) is seen by every segment, others by their own
        sq = tl.load(SEG + start + rows, mask=rows < L, other=-1)
        sk = tl.load(SEG + start + cols, mask=cols < L, other=-2)
        ok = ok & ((sk[None, :] == 0) | (sk[None, :] == sq[:, None]))
    return ok


@triton.jit
def _scores(q, k, sm_scale, softcap, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Scaled (and, if softcap > 0, softcapped) scores of a [M, D] x [N, D] tile in fp32; also
    tanh for the backward."""
    s = _mm(q, tl.trans(k), PRECISION, UPCAST) * sm_scale
    t = s
    if softcap > 0:
        t = _tanh(s / softcap)
        s = softcap * t
    return s, t


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,  # O like Q; LSE [Hq, T] fp32
    cu_seqlens, cu_blocks, n_seqs, search_steps, SEG,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh, n_tok,
    sm_scale, softcap, window, group, causal,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, SEGMENTED: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    if pid >= tl.load(cu_blocks + n_seqs):
        return
    start, L, block = _locate(cu_seqlens, cu_blocks, pid, n_seqs, search_steps)
    r0 = block * BLOCK_M
    rows = r0 + tl.arange(0, BLOCK_M)  # positions within the sample
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < HEAD_DIM
    K += (head // group) * s_kh
    V += (head // group) * s_vh

    q = _load_rows(Q + head * s_qh, start, rows, L, s_qt, offs_d, dmask)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, base 2
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, hi = _key_range(r0, L, window, causal, BLOCK_M, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        k = _load_rows(K, start, cols, L, s_kt, offs_d, dmask)
        v = _load_rows(V, start, cols, L, s_vt, offs_d, dmask)
        s, _ = _scores(q, k, sm_scale, softcap, PRECISION, UPCAST)
        s = s * LOG2E
        if _needs_mask(r0, n0, L, window, causal, SEGMENTED, BLOCK_M, BLOCK_N):
            s = tl.where(_visible(rows, cols, L, window, causal, SEG, start, SEGMENTED), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    _store_rows(O + head * s_oh, start, rows, L, s_ot, offs_d, dmask, o)
    lse = (m_i + tl.log2(l_safe)) / LOG2E
    tl.store(LSE + head.to(tl.int64) * n_tok + start + rows, lse, mask=rows < L)


@triton.jit
def _delta_kernel(O, DO, DELTA, s_ot, s_oh, s_dt, s_dh, n_tok,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    # delta[h, t] = Σ_d dO[t, h, d] · O[t, h, d]
    head = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    mask = (t[:, None] < n_tok) & (d[None, :] < HEAD_DIM)
    o = tl.load(O + t[:, None].to(tl.int64) * s_ot + head * s_oh + d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + t[:, None].to(tl.int64) * s_dt + head * s_dh + d[None, :], mask=mask, other=0.0)
    tl.store(DELTA + head.to(tl.int64) * n_tok + t, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=t < n_tok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    cu_seqlens, cu_blocks, n_seqs, search_steps, SEG,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_dot, s_doh, s_dkt, s_dkh, s_dvt, s_dvh, n_tok,
    sm_scale, softcap, window, group, causal,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, SEGMENTED: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    if pid >= tl.load(cu_blocks + n_seqs):
        return
    start, L, block = _locate(cu_seqlens, cu_blocks, pid, n_seqs, search_steps)
    c0 = block * BLOCK_N
    cols = c0 + tl.arange(0, BLOCK_N)  # this program's keys
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < HEAD_DIM
    k = _load_rows(K + kv_head * s_kh, start, cols, L, s_kt, offs_d, dmask)
    v = _load_rows(V + kv_head * s_vh, start, cols, L, s_vt, offs_d, dmask)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    lo, hi = _query_range(c0, L, window, causal, BLOCK_M, BLOCK_N)
    for g in range(group):  # every q head of the group, in order: deterministic, no atomics
        head = kv_head * group + g
        for m0 in range(lo, hi, BLOCK_M):
            rows = m0 + offs_m
            rmask = rows < L
            q = _load_rows(Q + head * s_qh, start, rows, L, s_qt, offs_d, dmask)
            do = _load_rows(DO + head * s_doh, start, rows, L, s_dot, offs_d, dmask)
            lse = tl.load(LSE + head.to(tl.int64) * n_tok + start + rows, mask=rmask, other=0.0) * LOG2E
            delta = tl.load(DELTA + head.to(tl.int64) * n_tok + start + rows, mask=rmask, other=0.0)
            s, t = _scores(q, k, sm_scale, softcap, PRECISION, UPCAST)
            p = tl.exp2(s * LOG2E - lse[:, None])
            if _needs_mask(m0, c0, L, window, causal, SEGMENTED, BLOCK_M, BLOCK_N):
                p = tl.where(_visible(rows, cols, L, window, causal, SEG, start, SEGMENTED), p, 0.0)
            dv += _mm(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
            dp = _mm(do, tl.trans(v), PRECISION, UPCAST)
            ds = p * (dp - delta[:, None])
            if softcap > 0:
                ds = ds * (1.0 - t * t)
            dk += _mm(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST)

    _store_rows(DK + kv_head * s_dkh, start, cols, L, s_dkt, offs_d, dmask, dk * sm_scale)
    _store_rows(DV + kv_head * s_dvh, start, cols, L, s_dvt, offs_d, dmask, dv)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    cu_seqlens, cu_blocks, n_seqs, search_steps, SEG,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_dot, s_doh, s_dqt, s_dqh, n_tok,
    sm_scale, softcap, window, group, causal,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, SEGMENTED: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    if pid >= tl.load(cu_blocks + n_seqs):
        return
    start, L, block = _locate(cu_seqlens, cu_blocks, pid, n_seqs, search_steps)
    r0 = block * BLOCK_M
    rows = r0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < HEAD_DIM
    rmask = rows < L
    K += (head // group) * s_kh
    V += (head // group) * s_vh
    q = _load_rows(Q + head * s_qh, start, rows, L, s_qt, offs_d, dmask)
    do = _load_rows(DO + head * s_doh, start, rows, L, s_dot, offs_d, dmask)
    lse = tl.load(LSE + head.to(tl.int64) * n_tok + start + rows, mask=rmask, other=0.0) * LOG2E
    delta = tl.load(DELTA + head.to(tl.int64) * n_tok + start + rows, mask=rmask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, hi = _key_range(r0, L, window, causal, BLOCK_M, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        k = _load_rows(K, start, cols, L, s_kt, offs_d, dmask)
        v = _load_rows(V, start, cols, L, s_vt, offs_d, dmask)
        s, t = _scores(q, k, sm_scale, softcap, PRECISION, UPCAST)
        p = tl.exp2(s * LOG2E - lse[:, None])
        if _needs_mask(r0, n0, L, window, causal, SEGMENTED, BLOCK_M, BLOCK_N):
            p = tl.where(_visible(rows, cols, L, window, causal, SEG, start, SEGMENTED), p, 0.0)
        dp = _mm(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        if softcap > 0:
            ds = ds * (1.0 - t * t)
        dq += _mm(ds.to(k.dtype), k, PRECISION, UPCAST)
    _store_rows(DQ + head * s_dqh, start, rows, L, s_dqt, offs_d, dmask, dq * sm_scale)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _schedule(cu_seqlens, block, keep=None):
    """Cumulative block counts per sample [B + 1] (on the device), B, and the binary search's depth.
    Samples with keep False (padding) get no blocks: no program, no work."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    counts = (lens + block - 1) // block
    if keep is not None:
        counts = counts * keep
    cu_blocks = torch.zeros(cu_seqlens.numel(), dtype=torch.int32, device=cu_seqlens.device)
    torch.cumsum(counts, 0, dtype=torch.int32, out=cu_blocks[1:])
    n_seqs = cu_seqlens.numel() - 1
    return cu_blocks, n_seqs, max(1, math.ceil(math.log2(n_seqs + 1)) + 1)


def _segment_pointer(segments, cu_seqlens):
    """The kernels' SEG: without segments any int32 pointer (never read: SEGMENTED is False)."""
    return cu_seqlens if segments is None else segments


def _block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def _delta_rows(block_d):
    return min(64, max(16, 4096 // block_d))  # rows of the delta kernel: 4096 elements per tile


def _entries(pass_, dtype, head_dim):
    """The table's tiles for a pass at this head dim and dtype."""
    block_d = _block_d(head_dim)
    if block_d > 256:
        raise ValueError(f"varlen_attention's Triton path supports head dims up to 256, got {head_dim}")
    return TILES[pass_][(max(64, block_d), 4 if dtype == torch.float32 else 2)]


def _tile(pass_, q, launch):
    """The tile a pass runs with: forced (tests), the default (interpreter, FASTTUNE_AUTOTUNE=0, a
    single entry), or the fastest entry, timed once per (dtype, head dim, length class, device)."""
    if FORCE_TILES is not None:
        return FORCE_TILES[pass_]
    entries = _entries(pass_, q.dtype, q.shape[-1])
    if len(entries) == 1 or interpreting() or os.environ.get("FASTTUNE_AUTOTUNE", "1") == "0":
        return entries[0]
    key = (pass_, q.dtype, q.shape[-1], triton.next_power_of_2(q.shape[0]), q.device)
    if key not in _TUNED:
        _TUNED[key] = min(entries, key=lambda tile: _time(launch, tile))
    return _TUNED[key]


def _time(launch, tile):
    from triton.runtime.errors import OutOfResources

    try:
        return triton.testing.do_bench(lambda: launch(tile), warmup=5, rep=20)
    except OutOfResources:  # more shared memory or registers than this GPU has
        return float("inf")


def _meta(q, segments=None):
    D = q.shape[-1]
    return dict(
        HEAD_DIM=D, BLOCK_D=_block_d(D),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=interpreting() and q.dtype == torch.bfloat16,
        SEGMENTED=segments is not None,
    )


def _forward(q, k, v, cu_seqlens, keep, segments, scale, softcap, window, causal):
    T, Hq, D = q.shape
    # Rows of skipped (padding) samples are never written: they start as zeros.
    o = empty(T, Hq, D, dtype=q.dtype, device=q.device) if keep is None else q.new_zeros(T, Hq, D)
    lse = empty(Hq, T, dtype=torch.float32, device=q.device)
    args = (scale, softcap, window, Hq // k.shape[1], causal)

    def launch(tile):
        bm, bn, warps, stages = tile
        cu_blocks, n_seqs, steps = _schedule(cu_seqlens, bm, keep)
        _fwd_kernel[(triton.cdiv(T, bm) + n_seqs, Hq)](
            q, k, v, o, lse, cu_seqlens, cu_blocks, n_seqs, steps, _segment_pointer(segments, cu_seqlens),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1), T,
            *args, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **_meta(q, segments),
        )

    launch(_tile("fwd", q, launch))
    return o, lse


def _backward(do, q, k, v, o, lse, cu_seqlens, keep, segments, scale, softcap, window, causal):
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    meta = _meta(q, segments)
    delta = empty(Hq, T, dtype=torch.float32, device=q.device)
    rows = _delta_rows(meta["BLOCK_D"])
    _delta_kernel[(triton.cdiv(T, rows), Hq)](
        o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), T,
        HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], BLOCK_T=rows,
    )
    new = torch.zeros if keep is not None else empty  # padding rows get zero gradients, unwritten
    dq, dk, dv = (new(*x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    args = (scale, softcap, window, Hq // Hkv, causal)

    def launch_dkdv(tile):
        bm, bn, warps, stages = tile
        cu_blocks, n_seqs, steps = _schedule(cu_seqlens, bn, keep)
        _bwd_dkdv_kernel[(triton.cdiv(T, bn) + n_seqs, Hkv)](
            q, k, v, do, lse, delta, dk, dv, cu_seqlens, cu_blocks, n_seqs, steps, _segment_pointer(segments, cu_seqlens),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), T,
            *args, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **meta,
        )

    def launch_dq(tile):
        bm, bn, warps, stages = tile
        cu_blocks, n_seqs, steps = _schedule(cu_seqlens, bm, keep)
        _bwd_dq_kernel[(triton.cdiv(T, bm) + n_seqs, Hq)](
            q, k, v, do, lse, delta, dq, cu_seqlens, cu_blocks, n_seqs, steps, _segment_pointer(segments, cu_seqlens),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), T,
            *args, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **meta,
        )

    launch_dkdv(_tile("dkdv", q, launch_dkdv))
    launch_dq(_tile("dq", q, launch_dq))
    return dq, dk, dv


# Forward and backward as torch.library custom ops, so that torch.compile(fullgraph=True) runs
# through them. Both backends go through the ops: the PyTorch path's backward recomputes the
# per-sample SDPA with autograd. Switches are plain values: softcap 0 and window NO_WINDOW are off.
def _attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                    keep: torch.Tensor | None, segments: torch.Tensor | None, causal: bool,
               scale: float, softcap: float, window: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """o [T, Hq, D] and the log-sum-exp [Hq, T] the Triton backward needs ([0] on the PyTorch path)."""
    if backend == "torch":
        return _attention_torch(q, k, v, cu_seqlens, keep, causal, scale, softcap or None,
                                None if window == NO_WINDOW else window, segments), q.new_empty(0, dtype=torch.float32)
    return _forward(q, k, v, cu_seqlens, keep, segments, scale, softcap, window, int(causal))


def _attention_fake(q, k, v, cu_seqlens, keep, segments, causal, scale, softcap, window, backend):
    lse = q.new_empty((q.shape[1], q.shape[0]) if backend != "torch" else (0,), dtype=torch.float32)
    return torch.empty_like(q), lse


def _attention_backward_impl(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                        lse: torch.Tensor, cu_seqlens: torch.Tensor, keep: torch.Tensor | None,
                        segments: torch.Tensor | None, causal: bool, scale: float, softcap: float,
                        window: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "torch":  # inside a compiled graph: autograd cannot run in an op, hence the explicit one
        return _attention_torch_backward(do, q, k, v, cu_seqlens, keep, causal, scale, softcap or None,
                                         None if window == NO_WINDOW else window, segments)
    do = do if do.stride(-1) == 1 else do.contiguous()
    return _backward(do, q, k, v, o, lse, cu_seqlens, keep, segments, scale, softcap, window, int(causal))


def _attention_backward_fake(do, q, k, v, o, lse, cu_seqlens, keep, segments, causal, scale, softcap, window,
                             backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_attention_backward = Op("varlen_attention_backward", _attention_backward_impl, _attention_backward_fake)


def _attention_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, keep, segments, *ctx.args = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens, keep, segments)  # o for delta = rowsum(dO ∘ O)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _attention_grad(ctx, do, _):
    dq, dk, dv = _attention_backward(do, *ctx.saved_tensors, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_attention = Op("varlen_attention", _attention_impl, _attention_fake, _attention_setup, _attention_grad)


def gpu_variants():
    """Every build the launchers can pick, for the ahead-of-time compile check (kernels/_aot.py):
    (name, kernel, signature, constexprs, num_warps, num_stages, is the default tile)."""
    kernels = {"fwd": _fwd_kernel, "dq": _bwd_dq_kernel, "dkdv": _bwd_dkdv_kernel}
    floats = ("sm_scale", "softcap")
    for dtype, ty in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        for D in HEAD_DIMS:
            meta = dict(HEAD_DIM=D, BLOCK_D=_block_d(D), PRECISION="ieee" if ty == "fp32" else "tf32", UPCAST=False,
                        SEGMENTED=False)
            for pass_, fn in kernels.items():
                sig = aot_signature(fn, ty, floats, fp32=("LSE", "DELTA"), i32=("cu_seqlens", "cu_blocks", "SEG"))
                for i, (bm, bn, warps, stages) in enumerate(_entries(pass_, dtype, D)):
                    name = f"attention.{pass_} {ty} D={D} tile={bm}x{bn} w{warps} s{stages}"
                    yield name, fn, sig, dict(meta, BLOCK_M=bm, BLOCK_N=bn), warps, stages, i == 0
                    if i == 0:  # prefix sharing builds its own variant of each default tile
                        yield (name + " segmented", fn, sig, dict(meta, BLOCK_M=bm, BLOCK_N=bn, SEGMENTED=True),
                               warps, stages, False)
            sig = aot_signature(_delta_kernel, ty, (), fp32=("DELTA",))
            yield (f"attention.delta {ty} D={D}", _delta_kernel, sig,
                   dict(HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_T=_delta_rows(_block_d(D))), 4, 3, True)


# --------------------------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------------------------


def _sample_mask(L, causal, window, device, segments=None):
    """[L, L] bool: may query i see key j within one sample (None: everything visible). `segments`
    [L]: key j is seen only from its own segment, unless it is of segment 0 (the shared prefix)."""
    if not causal and window is None and segments is None:
        return None
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(L, device=device)[None, :]
    ok = torch.ones(L, L, dtype=torch.bool, device=device)
    if causal:
        ok = ok & (j <= i)
    if window is not None:
        ok = ok & (i - j < window)
    if segments is not None:
        ok = ok & ((segments[None, :] == 0) | (segments[None, :] == segments[:, None]))
    return ok


def _attention_torch(q, k, v, cu_seqlens, keep, causal, scale, softcap, window, segments=None):
    """Each sample on its own: SDPA, or explicit scores when a softcap is asked for."""
    group = q.shape[1] // k.shape[1]
    out = []
    bounds = cu_seqlens.tolist()  # a host sync on CUDA: this path is for the CPU
    kept = [True] * (len(bounds) - 1) if keep is None else keep.tolist()
    for s, e, use in zip(bounds[:-1], bounds[1:], kept):
        if e == s:
            continue
        if not use:  # a padding sample: zeros, no work
            out.append(q.new_zeros(e - s, q.shape[1], q.shape[2]))
            continue
        qi, ki, vi = (x[s:e].transpose(0, 1) for x in (q, k, v))  # [H, L, D]
        mask = _sample_mask(e - s, causal, window, q.device, None if segments is None else segments[s:e])
        if softcap is None:  # 4D with GQA: torch's CPU flash kernel (3D inputs take its slower math path)
            oi = F.scaled_dot_product_attention(qi[None], ki[None], vi[None], attn_mask=mask, scale=scale,
                                                enable_gqa=group > 1)[0]
        else:
            ki, vi = ki.repeat_interleave(group, 0), vi.repeat_interleave(group, 0)
            scores = softcap * torch.tanh((qi.float() @ ki.float().transpose(1, 2)) * scale / softcap)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            oi = (scores.softmax(-1) @ vi.float()).to(q.dtype)
        out.append(oi.transpose(0, 1))
    return torch.cat(out) if out else torch.empty_like(q)


def _attention_torch_backward(do, q, k, v, cu_seqlens, keep, causal, scale, softcap, window, segments=None):
    """dq, dk, dv of `_attention_torch`, per sample in fp32 (autograd does not run inside a custom op):
    P = softmax(S), dV = Pᵀ dO, dS = P ∘ (dO Vᵀ - rowsum(dO ∘ O)), dQ = dS K·scale, dK = dSᵀ Q·scale,
    with the softcap's chain rule (1 - tanh²) and dK, dV summed over each kv head's q heads."""
    Hq, Hkv = q.shape[1], k.shape[1]
    group = Hq // Hkv
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    bounds = cu_seqlens.tolist()
    kept = [True] * (len(bounds) - 1) if keep is None else keep.tolist()
    for s, e, use in zip(bounds[:-1], bounds[1:], kept):
        if e == s or not use:
            continue
        qi, ki, vi, doi = (x[s:e].transpose(0, 1).float() for x in (q, k, v, do))  # [H, L, D]
        ki, vi = ki.repeat_interleave(group, 0), vi.repeat_interleave(group, 0)
        scores = qi @ ki.transpose(1, 2) * scale
        t = None
        if softcap is not None:
            t = torch.tanh(scores / softcap)
            scores = softcap * t
        mask = _sample_mask(e - s, causal, window, q.device, None if segments is None else segments[s:e])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        p = scores.softmax(-1)
        dvi = p.transpose(1, 2) @ doi
        dp = doi @ vi.transpose(1, 2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        if t is not None:
            ds = ds * (1.0 - t * t)
        dqi = ds @ ki * scale
        dki = ds.transpose(1, 2) @ qi * scale
        L, D = e - s, q.shape[2]
        dq[s:e] = dqi.transpose(0, 1).to(q.dtype)
        dk[s:e] = dki.view(Hkv, group, L, D).sum(1).transpose(0, 1).to(k.dtype)
        dv[s:e] = dvi.view(Hkv, group, L, D).sum(1).transpose(0, 1).to(v.dtype)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
    sample_mask: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention within each packed sample: q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens [B + 1].

    A drop-in for flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
    causal=...). `max_seqlen` is accepted for that compatibility and is not needed. `sample_mask`
    ([B] bool, optional) marks samples to skip, such as the padding of a padded batch: their rows
    cost no work, and their outputs and gradients are zeros. `segments` ([T] int, optional) shares a
    prefix within a sample (prefix sharing): a sample is its prefix (segment 0) followed by segments
    1, 2, ...; a token sees the prefix and, causally, its own segment only, so segments after the
    first are computed as if each followed the prefix alone (give them positions that continue the
    prefix's). Returns
    [T, Hq, D] in q's dtype. softcap and window as transformers' Gemma 2 passes them.
    """
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"expected q [T, Hq, D] and k, v [T, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"Hq = {q.shape[1]} must be a multiple of Hkv = {k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be [B + 1]: 0, then the end of each sample")
    if cu_seqlens.device.type == "cpu" and q.device.type == "cpu" and not torch.compiler.is_compiling():
        # free to check here (eager, on the host)
        c = cu_seqlens.tolist()
        if c[0] != 0 or c[-1] != q.shape[0] or any(b < a for a, b in zip(c, c[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to T = {q.shape[0]}, got {c[:8]}{'...' if len(c) > 8 else ''}")
    if window is not None and (window < 1 or not causal):
        raise ValueError(f"window must be >= 1 and used with causal=True, got window={window}, causal={causal}")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    be = pick_backend(backend, q.device)
    if be == "triton":
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        if q.shape[-1] > 256:
            raise ValueError(f"varlen_attention's Triton path supports head dims up to 256, got {q.shape[-1]}")
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    keep = None if sample_mask is None else sample_mask.to(device=q.device, dtype=torch.int32)
    if keep is not None and keep.shape != (cu.numel() - 1,):
        raise ValueError(f"sample_mask must be [B] = [{cu.numel() - 1}] (one flag per sample), got {tuple(keep.shape)}")
    seg = None
    if segments is not None:
        if segments.shape != (q.shape[0],):
            raise ValueError(f"segments must be [T] = [{q.shape[0]}] (one id per token), got {tuple(segments.shape)}")
        if not causal or window is not None:
            raise ValueError("segments (prefix sharing) need causal=True and no window (the window counts "
                             "positions, which a shared layout does not keep)")
        seg = segments.to(device=q.device, dtype=torch.int32)
    if be == "torch" and not torch.compiler.is_compiling():  # eager CPU path: autograd through SDPA
        return _attention_torch(q, k, v, cu, keep, bool(causal), float(scale), softcap,
                                None if window is None else int(window), seg)
    return _attention(q, k, v, cu, keep, seg, bool(causal), float(scale), float(softcap or 0.0),
                      NO_WINDOW if window is None else int(window), be)[0]
