"""fused_linear_cross_entropy and cross_entropy against a float64 reference, both backends.

Fresh random inputs each run (no fixed seed). The Triton path runs under the interpreter here.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from fasttune.kernels import cross_entropy, fused_linear_cross_entropy
from reference import TOL, ce_reference, rel_err

ce_mod = importlib.import_module("fasttune.kernels.cross_entropy")  # the module, not the function
BACKENDS = ["torch", "triton"]


@pytest.fixture(params=[None, 64], ids=["one-tile", "many-tiles"])
def block(request, monkeypatch):
    """Run the Triton kernel with its default vocabulary tile and with a small one (several tiles)."""
    if request.param is not None:
        monkeypatch.setattr(ce_mod, "ROW_TILES", ((request.param, 4),))


def make(N=37, H=32, V=203, dtype=torch.float32, ignore_frac=0.2, bias=False, scale=1.0):
    h = (torch.randn(N, H) * scale).to(dtype).requires_grad_()
    w = (torch.randn(V, H) / H**0.5).to(dtype).requires_grad_()
    b = (torch.randn(V) * 0.5).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, V, (N,))
    y[torch.rand(N) < ignore_frac] = -100
    return h, w, b, y


def reference(h, w, b, y, upstream=None, **kw):
    """Loss and gradients (h, w, b) of the float64 reference."""
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    logits = h64 @ w64.T + (0 if b64 is None else b64)
    loss = ce_reference(logits, y, **kw)
    loss.backward(upstream.double() if upstream is not None else None)
    return loss.detach(), h64.grad, w64.grad, None if b64 is None else b64.grad


def check(h, w, b, y, backend, tol=None, chunk_size=8, **kw):
    """Run fasttune (forward + backward) and compare loss and every gradient with the reference."""
    tol = tol or TOL[h.dtype]
    loss = fused_linear_cross_entropy(h, w, y, bias=b, backend=backend, chunk_size=chunk_size, **kw)
    up = torch.randn_like(loss) if kw.get("reduction") == "none" else None
    params = [t for t in (h, w, b) if t is not None]
    grads = torch.autograd.grad(loss, params, up)
    ref = reference(h, w, b, y, up, **{k: v for k, v in kw.items() if k != "return_stats"})
    assert loss.dtype == torch.float32
    assert rel_err(loss, ref[0]) < tol, (rel_err(loss, ref[0]), loss, ref[0])
    for name, g, r in zip("hwb", grads, [x for x in ref[1:] if x is not None]):
        assert g.dtype == {"h": h, "w": w, "b": b}[name].dtype
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) < tol, (name, rel_err(g, r))
    return loss, grads


OPTIONS = {
    "plain": {},
    "bias": {"_bias": True},
    "loss_mask_bool": {"_mask": "bool"},
    "loss_mask_float": {"_mask": "float"},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 2.0, "_scale": 3.0},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "num_items": {"num_items": 100},
    "num_items_tensor": {"num_items": "tensor"},
    "ignore_index_7": {"ignore_index": 7, "_ignore7": True},
    "all_mean": {"_bias": True, "_mask": "float", "label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 3.0, "_scale": 3.0},
    "all_none": {"_bias": True, "_mask": "bool", "label_smoothing": 0.05, "z_loss": 1e-3, "softcap": 3.0,
                 "reduction": "none"},
    "all_sum": {"_bias": True, "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 2.0, "reduction": "sum"},
    # the SFT loss family: DFT (token scaling) and class weights
    "dft": {"token_scaling": True, "_scale": 3.0},
    "dft_none": {"token_scaling": True, "reduction": "none", "_scale": 3.0},
    "dft_all": {"token_scaling": True, "_bias": True, "_mask": "float", "label_smoothing": 0.1, "z_loss": 1e-3,
                "softcap": 3.0, "_scale": 3.0},
    "class_weights": {"_class_weights": True},
    "class_weights_none": {"_class_weights": True, "reduction": "none"},
    "class_weights_dft_sum": {"_class_weights": True, "token_scaling": True, "_mask": "bool", "z_loss": 1e-3,
                              "reduction": "sum", "_scale": 2.0},
}


def build(opts, N=37, V=203, dtype=torch.float32):
    opts = dict(opts)
    h, w, b, y = make(N=N, V=V, dtype=dtype, bias=opts.pop("_bias", False), scale=opts.pop("_scale", 1.0))
    mask = opts.pop("_mask", None)
    if mask == "bool":
        opts["loss_mask"] = torch.rand(N) < 0.7
    elif mask == "float":
        opts["loss_mask"] = torch.rand(N) * 2
    if opts.pop("_ignore7", False):
        y[y == -100] = 3
        y[::3] = 7
    if opts.get("num_items") == "tensor":
        opts["num_items"] = torch.tensor(55.0)
    if opts.pop("_class_weights", False):  # some classes weigh 0, the rest in (0, 3)
        opts["class_weights"] = torch.rand(V) * 3 * (torch.rand(V) > 0.2)
    return h, w, b, y, opts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(OPTIONS))
def test_options_match_reference(backend, case, block):
    h, w, b, y, opts = build(OPTIONS[case])
    check(h, w, b, y, backend, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["plain", "all_mean", "all_none"])
def test_low_precision(backend, dtype, case):
    h, w, b, y, opts = build(OPTIONS[case], dtype=dtype)
    check(h, w, b, y, backend, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [2374, 32003])  # 151936 / 64, and Llama-2's 32000 + 3 added tokens
def test_vocab_not_power_of_two(backend, V):
    N = 5 if backend == "triton" else 33
    h, w, b, y = make(N=N, V=V, H=16, bias=True)
    check(h, w, b, y, backend, chunk_size=3, label_smoothing=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 5, 36, 37, 64, None])
def test_chunk_sizes(backend, chunk_size):
    h, w, b, y = make(N=37)
    check(h, w, b, y, backend, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_target_probability_near_one(backend, reduction, block):
    """A large logit on the label: p_y = 1 - O(1e-7). 1 - p_y must keep its relative precision."""
    N, H, V = 24, 16, 203
    h = torch.randn(N, H)
    h[:, 0] = 1.0
    w = torch.randn(V, H) * 0.1
    w[:, 0] = 0.0
    y = torch.full((N,), 11)
    w[11, 0] = 22.0  # logit of the label ≈ 22, the others ≈ 0: 1 - p_y ≈ V·e^-22 ≈ 6e-8
    h.requires_grad_()
    w.requires_grad_()
    loss, _ = check(h, w, None, y, backend, reduction=reduction, label_smoothing=0.0)
    assert (loss > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("how", ["ignore_index", "loss_mask", "num_items"])
def test_everything_masked(backend, reduction, how):
    h, w, b, y = make(N=9, bias=True)
    kw = {}
    if how == "ignore_index":
        y[:] = -100
    else:
        kw["loss_mask"] = torch.zeros(9, dtype=torch.bool)
        if how == "num_items":
            kw["num_items"] = 0
    loss, stats = fused_linear_cross_entropy(h, w, y, bias=b, reduction=reduction, backend=backend,
                                             return_stats=True, **kw)
    up = torch.randn_like(loss) if reduction == "none" else None
    grads = torch.autograd.grad(loss, (h, w, b), up)
    assert torch.equal(loss, torch.zeros_like(loss))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))
    assert stats.accuracy.item() == 0.0 and not torch.isnan(stats.lse).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_single_token(backend, reduction):
    h, w, b, y = make(N=1, ignore_frac=0.0, bias=True)
    check(h, w, b, y, backend, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_input_shape(backend):
    B, T, H, V = 3, 7, 16, 101
    h = torch.randn(B, T, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    y = torch.randint(0, V, (B, T))
    y[:, :2] = -100
    loss = fused_linear_cross_entropy(h, w, y, backend=backend)
    ref = F.cross_entropy((h @ w.T).reshape(-1, V).double(), y.reshape(-1))
    assert rel_err(loss, ref) < TOL[torch.float32]
    loss.backward()
    assert h.grad.shape == (B, T, H)


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_makes_microbatching_exact(backend):
    """One batch of 8 sequences = 8 micro-batches of 1, summed, with the global num_items."""
    B, T, H, V = 8, 6, 16, 97
    h = torch.randn(B, T, H)
    w = torch.randn(V, H, requires_grad=True)
    y = torch.randint(0, V, (B, T))
    y[torch.rand(B, T) < 0.4] = -100
    n = int((y != -100).sum())
    hb = h.clone().requires_grad_()
    full = fused_linear_cross_entropy(hb, w, y, num_items=n, backend=backend)
    gh_full, gw_full = torch.autograd.grad(full, (hb, w))
    total, gw_sum, gh_parts = 0.0, torch.zeros_like(w), []
    for i in range(B):
        hi = h[i : i + 1].clone().requires_grad_()
        li = fused_linear_cross_entropy(hi, w, y[i : i + 1], num_items=torch.tensor(n), backend=backend)
        gh, gw = torch.autograd.grad(li, (hi, w))
        total, gw_sum = total + li, gw_sum + gw
        gh_parts.append(gh)
    torch.testing.assert_close(total, full, rtol=1e-5, atol=1e-6)  # sums of ± terms: not relative
    assert rel_err(gw_sum, gw_full) < 1e-5
    assert rel_err(torch.cat(gh_parts), gh_full) < 1e-6
    # and it is the plain mean over the whole batch
    assert rel_err(full, F.cross_entropy((h @ w.detach().T).reshape(-1, V).double(), y.reshape(-1))) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_stats(backend):
    h, w, b, y = make(N=29, V=50, scale=3.0)
    logits = (h @ w.T).detach()
    y[:10] = logits[:10].argmax(1)  # surely correct
    y[10:13] = -100
    loss, stats = fused_linear_cross_entropy(h, w, y, backend=backend, return_stats=True)
    trained = y != -100
    lse_ref = torch.logsumexp(logits.double(), 1) * trained
    assert rel_err(stats.lse, lse_ref) < TOL[torch.float32]
    correct_ref = (logits.argmax(1) == y) & trained
    assert torch.equal(stats.correct, correct_ref)
    assert stats.accuracy.item() == pytest.approx(correct_ref.sum().item() / trained.sum().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree(backend):
    """The Triton kernel (interpreted) and the torch path give the same numbers."""
    h, w, b, y, opts = build(OPTIONS["all_none"])
    out = {}
    for be in BACKENDS:
        loss = fused_linear_cross_entropy(h, w, y, bias=b, backend=be, chunk_size=16, **opts)
        out[be] = (loss, *torch.autograd.grad(loss.sum(), (h, w, b)))
    for a, c in zip(out["torch"], out["triton"]):
        assert rel_err(a, c) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_no_grad(backend):
    h, w, b, y = make()
    w.requires_grad_(False)
    loss = fused_linear_cross_entropy(h, w, y, backend=backend)
    (gh,) = torch.autograd.grad(loss, (h,))
    ref = reference(h, w, None, y)
    assert rel_err(gh, ref[1]) < TOL[torch.float32]
    with torch.no_grad():
        loss2 = fused_linear_cross_entropy(h, w, y, backend=backend)
    assert not loss2.requires_grad and rel_err(loss2, ref[0]) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain", "all_mean", "all_none", "sum"])
def test_cross_entropy_on_logits(backend, dtype, case):
    opts = dict(OPTIONS[case])
    _, _, _, y, opts = build(opts)
    opts = {k: v for k, v in opts.items()}
    logits = (torch.randn(len(y), 203) * 3).to(dtype).requires_grad_()
    loss = cross_entropy(logits, y, backend=backend, **opts)
    up = torch.randn_like(loss) if opts.get("reduction") == "none" else None
    (g,) = torch.autograd.grad(loss, (logits,), up)
    l64 = logits.detach().double().requires_grad_()
    ref = ce_reference(l64, y, **opts)
    (g_ref,) = torch.autograd.grad(ref, (l64,), None if up is None else up.double())
    assert rel_err(loss, ref) < TOL[dtype]
    assert g.dtype == dtype and rel_err(g, g_ref) < TOL[dtype]


def test_cross_entropy_matches_torch_defaults():
    logits = torch.randn(4, 9, 33, requires_grad=True)
    y = torch.randint(0, 33, (4, 9))
    y[0] = -100
    ours = cross_entropy(logits, y)
    theirs = F.cross_entropy(logits.reshape(-1, 33), y.reshape(-1))
    assert rel_err(ours, theirs) < 1e-6


def test_bad_input_is_a_clear_error():
    h, w, b, y = make(N=10)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="labels has 9 elements"):
        fused_linear_cross_entropy(h, w, y[:9])
    with pytest.raises(ValueError, match="do not match"):
        fused_linear_cross_entropy(h, w[:, :5], y)
    with pytest.raises(TypeError, match="bfloat16"):
        fused_linear_cross_entropy(h, w.detach().bfloat16(), y)
    if h.device.type == "cpu":  # checked where it costs no host sync
        bad = y.clone()
        bad[3] = 203
        with pytest.raises(ValueError, match="label 203 at token 3"):
            fused_linear_cross_entropy(h, w, bad)
    with pytest.raises(ValueError, match="backend"):
        fused_linear_cross_entropy(h, w, y, backend="cuda")


# ---- the SFT loss family: DFT (token scaling) and class weights ------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["dft", "dft_none", "class_weights", "class_weights_dft_sum"])
def test_sft_family_on_logits(backend, case):
    _, _, _, y, opts = build(OPTIONS[case])
    logits = (torch.randn(len(y), 203) * 3).requires_grad_()
    loss = cross_entropy(logits, y, backend=backend, **opts)
    up = torch.randn_like(loss) if opts.get("reduction") == "none" else None
    (g,) = torch.autograd.grad(loss, (logits,), up)
    l64 = logits.detach().double().requires_grad_()
    ref = ce_reference(l64, y, **opts)
    (g_ref,) = torch.autograd.grad(ref, (l64,), None if up is None else up.double())
    assert rel_err(loss, ref) < TOL[torch.float32] and rel_err(g, g_ref) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_weights_match_torch(backend):
    """The class weights are F.cross_entropy's `weight`: same loss, same normalization by Σ c[y]."""
    h, w, b, y = make(N=29, V=101)
    c = torch.rand(101) * 2
    loss = fused_linear_cross_entropy(h, w, y, class_weights=c, backend=backend, chunk_size=8)
    theirs = F.cross_entropy((h @ w.T).double(), y, weight=c.double())
    assert rel_err(loss, theirs) < TOL[torch.float32]
    ours = cross_entropy(h @ w.T, y, class_weights=c, backend=backend)
    assert rel_err(ours, theirs) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_dft_matches_trl_formula(backend):
    """TRL's dft: per_token_loss = -logp · exp(logp).detach(), summed / the trained-token count."""
    h, w, b, y = make(N=31, V=101, scale=3.0)
    loss = fused_linear_cross_entropy(h, w, y, token_scaling=True, backend=backend, chunk_size=8)
    (gh,) = torch.autograd.grad(loss, (h,))
    h64 = h.detach().double().requires_grad_()
    logp = torch.log_softmax(h64 @ w.detach().double().T, -1)
    keep = y != -100
    lp = logp.gather(1, torch.where(keep, y, 0)[:, None]).squeeze(1) * keep
    ref = (-lp * lp.exp().detach()).sum() / keep.sum().clamp(min=1)
    ref.backward()
    assert rel_err(loss, ref) < TOL[torch.float32] and rel_err(gh, h64.grad) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_dft_target_probability_near_one(backend, reduction, block):
    """p_y = 1 - O(1e-7): the DFT loss ≈ the NLL ≈ 6e-8, kept to relative precision, gradients too."""
    N, H, V = 24, 16, 203
    h = torch.randn(N, H)
    h[:, 0] = 1.0
    w = torch.randn(V, H) * 0.1
    w[:, 0] = 0.0
    y = torch.full((N,), 11)
    w[11, 0] = 22.0
    h.requires_grad_()
    w.requires_grad_()
    loss, _ = check(h, w, None, y, backend, reduction=reduction, token_scaling=True)
    assert (loss > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("how", ["ignore_index", "zero_class_weights"])
def test_sft_family_everything_masked(backend, reduction, how):
    """Every token masked, or every target class weighing 0: loss 0, gradients 0, no NaN."""
    h, w, b, y = make(N=9, bias=True)
    c = torch.rand(203) + 0.5
    if how == "ignore_index":
        y[:] = -100
    else:
        y[:] = 5
        c[5] = 0.0
    loss = fused_linear_cross_entropy(h, w, y, bias=b, reduction=reduction, backend=backend, token_scaling=True,
                                      class_weights=c)
    up = torch.randn_like(loss) if reduction == "none" else None
    grads = torch.autograd.grad(loss, (h, w, b), up)
    assert torch.equal(loss, torch.zeros_like(loss))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


def test_sft_family_bad_input():
    h, w, b, y = make(N=10)
    with pytest.raises(ValueError, match=r"class_weights must be a float tensor \[V\] = \[203\]"):
        fused_linear_cross_entropy(h, w, y, class_weights=torch.ones(202))
    with pytest.raises(ValueError, match="class_weights with label_smoothing"):
        fused_linear_cross_entropy(h, w, y, class_weights=torch.ones(203), label_smoothing=0.1)
