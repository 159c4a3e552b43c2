"""varlen_attention against a float64 reference built from per-sample SDPA; both backends.

Fresh random inputs each run; the Triton kernels run under the interpreter with small tiles so
that every sample spans several blocks.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from fasttune.kernels import varlen_attention
from reference import TOL, rel_err

attn_mod = importlib.import_module("fasttune.kernels.attention")
BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Small tiles, so that every sample spans several blocks (and the key tile differs from the query tile)."""
    monkeypatch.setattr(attn_mod, "FORCE_TILES", {"fwd": (16, 16, 4, 1), "dq": (16, 32, 4, 1), "dkdv": (16, 32, 4, 1)})


def reference(q, k, v, lens, causal=True, softmax_scale=None, softcap=None, window=None):
    """Per-sample attention in float64 (SDPA with an explicit mask; explicit scores for softcap)."""
    group = q.shape[1] // k.shape[1]
    scale = softmax_scale or q.shape[-1] ** -0.5
    out, s = [], 0
    for L in lens:
        qi, ki, vi = (x[s : s + L].double().transpose(0, 1) for x in (q, k, v))
        ki, vi = ki.repeat_interleave(group, 0), vi.repeat_interleave(group, 0)
        i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
        mask = torch.ones(L, L, dtype=torch.bool)
        if causal:
            mask &= j <= i
        if window:
            mask &= i - j < window
        if softcap is None:
            oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
        else:
            sc = softcap * torch.tanh(qi @ ki.transpose(1, 2) * scale / softcap)
            oi = sc.masked_fill(~mask, float("-inf")).softmax(-1) @ vi
        out.append(oi.transpose(0, 1))
        s += L
    return torch.cat(out)


def run(lens, Hq, Hkv, D, backend, dtype=torch.float32, **kw):
    T = sum(lens)
    q, k, v = (torch.randn(T, h, D, dtype=dtype, requires_grad=True) for h in (Hq, Hkv, Hkv))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    o = varlen_attention(q, k, v, cu, max(lens), backend=backend, **kw)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference(q64, k64, v64, lens, **kw)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    tol = TOL[dtype] if dtype != torch.float32 else 1e-5
    assert o.shape == q.shape and o.dtype == dtype
    assert rel_err(o, ref) < tol, rel_err(o, ref)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) < tol, (name, rel_err(g, r))
    return o, grads


LENGTHS = {
    "mixed": [5, 1, 17, 33, 2, 16],
    "one_long_many_short": [1, 2, 1, 70, 3, 1, 1],
    "single": [29],
    "all_length_one": [1, 1, 1],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lens", list(LENGTHS))
@pytest.mark.parametrize("causal", [True, False])
def test_lengths(backend, lens, causal):
    run(LENGTHS[lens], 4, 2, 32, backend, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Hq,Hkv", [(3, 3), (8, 2), (7, 1)], ids=["mha", "gqa4", "gqa7"])
def test_gqa(backend, Hq, Hkv):
    run([9, 20, 3], Hq, Hkv, 16, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [64, 80, 128])
def test_head_dims(backend, D):
    run([7, 19], 2, 1, D, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [{"softcap": 5.0}, {"window": 6}, {"softcap": 3.0, "window": 20},
                                {"softmax_scale": 0.3}], ids=["softcap", "window", "both", "scale"])
def test_gemma_options(backend, kw):
    run([30, 4, 12], 4, 2, 16, backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    run([11, 25], 4, 2, 32, backend, dtype=dtype)


def test_backends_agree():
    T = 36  # samples of 13, 2 and 21 tokens
    q, k, v = (torch.randn(T, h, 16, requires_grad=True) for h in (4, 1, 1))
    cu = torch.tensor([0, 13, 15, 36], dtype=torch.int32)
    outs = {}
    for be in BACKENDS:
        o = varlen_attention(q, k, v, cu, 21, backend=be)
        outs[be] = (o, *torch.autograd.grad(o.square().sum(), (q, k, v)))
    for a, b in zip(outs["torch"], outs["triton"]):
        assert rel_err(a, b) < 1e-5


def test_no_attention_across_samples():
    """Changing one sample's tokens leaves every other sample's output untouched."""
    T = 30
    q, k, v = (torch.randn(T, 2, 16) for _ in range(3))
    cu = torch.tensor([0, 10, 18, 30], dtype=torch.int32)
    base = varlen_attention(q, k, v, cu, backend="triton")
    k2, v2 = k.clone(), v.clone()
    k2[10:18] += 5.0
    v2[10:18] -= 3.0
    moved = varlen_attention(q, k2, v2, cu, backend="triton")
    assert torch.equal(base[:10], moved[:10]) and torch.equal(base[18:], moved[18:])
    assert not torch.allclose(base[10:18], moved[10:18])


def test_bad_input():
    q = torch.randn(10, 3, 16)
    k = torch.randn(10, 2, 16)
    with pytest.raises(ValueError, match="multiple"):
        varlen_attention(q, k, k, torch.tensor([0, 10], dtype=torch.int32))
    k = torch.randn(10, 1, 16)
    with pytest.raises(ValueError, match="rise from 0"):
        varlen_attention(q, k, k, torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="window"):
        varlen_attention(q, k, k, torch.tensor([0, 10], dtype=torch.int32), causal=False, window=4)


def _table_tiles():
    """Every distinct tile of the launch table, with the passes that list it."""
    tiles = {}
    for pass_, by_shape in attn_mod.TILES.items():
        for entries in by_shape.values():
            for tile in entries:
                tiles.setdefault(tile, set()).add(pass_)
    return sorted(tiles)


@pytest.mark.parametrize("tile", _table_tiles(), ids=lambda t: "x".join(map(str, t)))
def test_every_table_tile(monkeypatch, tile):
    """Each tile the launcher may pick on a GPU, run under the interpreter with every pass forced to
    it: samples shorter than a tile, straddling its edges, and long enough for full (unmasked) tiles,
    with the window and softcap switches and without causality."""
    monkeypatch.setattr(attn_mod, "FORCE_TILES", {p: tile for p in ("fwd", "dq", "dkdv")})
    lens = [1, tile[0] + 3, 2 * max(tile[:2]) + 5]
    run(lens, 2, 1, 16, "triton")
    run(lens, 2, 1, 16, "triton", causal=False)
    run(lens, 2, 2, 16, "triton", window=tile[1] + 7, softcap=4.0)


def test_default_tiles_and_autotune_off_gpu():
    """Off the GPU the launcher takes each table row's first entry; the table serves every head dim
    the compile check covers, and refuses head dims past 256 with a clear error."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(attn_mod, "FORCE_TILES", None)
    try:
        q = torch.randn(5, 2, 64)
        for p in ("fwd", "dq", "dkdv"):
            assert attn_mod._tile(p, q, launch=None) == attn_mod.TILES[p][(64, 4)][0]
        for D in attn_mod.HEAD_DIMS:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                assert attn_mod._entries("fwd", dtype, D)
        with pytest.raises(ValueError, match="up to 256"):
            attn_mod._entries("fwd", torch.bfloat16, 320)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_samples_cost_nothing_and_read_zero(backend):
    """sample_mask False (padding): no blocks in the schedule, zero outputs and gradients; the other
    samples are untouched."""
    lens, keep = [9, 5, 20, 3], torch.tensor([True, False, True, False])
    T = sum(lens)
    q, k, v = (torch.randn(T, h, 16, requires_grad=True) for h in (4, 2, 2))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    o = varlen_attention(q, k, v, cu, sample_mask=keep, backend=backend)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    ref = varlen_attention(q, k, v, cu, backend=backend)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    pad = torch.zeros(T, dtype=torch.bool)
    pad[9:14] = pad[34:] = True
    assert torch.equal(o[pad], torch.zeros_like(o[pad])) and torch.allclose(o[~pad], ref[~pad], atol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g[pad], torch.zeros_like(g[pad])) and torch.allclose(g[~pad], r[~pad], atol=1e-5)
    cu_blocks, _, _ = attn_mod._schedule(cu, 16, keep.int())
    assert cu_blocks.tolist() == [0, 1, 1, 3, 3]  # 9 tokens: 1 block; 20 tokens: 2 blocks; padding: none


# ---- prefix sharing: segments ---------------------------------------------------------------------------------

# samples as (prefix length, [segment lengths]); a prefix of 0 tokens or a single segment is an ordinary sample
SHARED = {
    "grpo_like": [(11, [4, 7, 1, 5])],
    "mixed": [(3, [2, 9]), (0, [6]), (20, [17, 1, 3]), (1, [1]), (5, [16, 16])],
}


def _shared_layout(samples):
    """cu_seqlens and segment ids of the shared layout, and for the same samples written out unshared
    (each segment after its own copy of the prefix): the shared row of each unshared token, and the
    unshared samples' lengths."""
    cu, seg, rows, lens, t = [0], [], [], [], 0
    for p, parts in samples:
        prefix = list(range(t, t + p))
        seg += [0] * p
        t += p
        for i, n in enumerate(parts, 1):
            rows += prefix + list(range(t, t + n))
            lens.append(p + n)
            seg += [i] * n
            t += n
        cu.append(t)
    return torch.tensor(cu, dtype=torch.int32), torch.tensor(seg), torch.tensor(rows), lens


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SHARED))
@pytest.mark.parametrize("kw", [{}, {"softcap": 5.0}])
def test_segments_equal_the_prefix_written_out(backend, case, kw):
    """A prefix shared by several segments gives each segment what it would get after its own copy of
    the prefix, and the prefix's gradients are the sums over the copies (float64 reference on the
    written-out samples)."""
    cu, seg, rows, lens = _shared_layout(SHARED[case])
    T = int(cu[-1])
    q, k, v = (torch.randn(T, h, 16, requires_grad=True) for h in (4, 2, 2))
    o = varlen_attention(q, k, v, cu, segments=seg, backend=backend, **kw)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference(q64[rows], k64[rows], v64[rows], lens, **kw)  # every segment with its own prefix copy
    first = torch.full((T,), -1)
    first[rows.flip(0)] = torch.arange(len(rows) - 1, -1, -1)  # an unshared copy of each shared row
    ref_o = ref[first]
    assert rel_err(o, ref_o) < 1e-5, rel_err(o, ref_o)
    # the loss is each shared row's output once: weigh the copies so that only the first counts
    w = torch.zeros(len(rows), dtype=torch.float64)
    w[first] = 1.0
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double()[rows] * w[:, None, None])
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel_err(g, r) < 1e-5, (name, rel_err(g, r))


def test_segments_bad_input():
    q = torch.randn(6, 2, 16)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"segments must be \[T\]"):
        varlen_attention(q, q, q, cu, segments=torch.zeros(5, dtype=torch.int32))
    with pytest.raises(ValueError, match="causal=True and no window"):
        varlen_attention(q, q, q, cu, segments=torch.zeros(6, dtype=torch.int32), window=2)
