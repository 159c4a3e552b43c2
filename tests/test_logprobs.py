"""linear_logprobs, dpo_loss and grpo_loss against float64 references built on the full logits.

Fresh random inputs each run; both backends (Triton under the interpreter here).
"""

import pytest
import torch

from fasttune.kernels import dpo_loss, grpo_loss, linear_logprobs
from fasttune.kernels.dpo import LOSS_TYPES as DPO_TYPES
from fasttune.kernels.grpo import LOSS_TYPES as GRPO_TYPES
from fasttune.kernels.grpo import PER_TOKEN_COUNT
from reference import TOL, dpo_reference, grpo_reference, logprobs_reference, rel_err

BACKENDS = ["torch", "triton"]


def head(B, T, H=16, V=97, dtype=torch.float32, bias=False, train_w=True):
    h = torch.randn(B, T, H).to(dtype).requires_grad_()
    w = (torch.randn(V, H) * 0.5).to(dtype).requires_grad_(train_w)
    b = (torch.randn(V) * 0.3).to(dtype).requires_grad_() if bias else None
    return h, w, b


def logits64(h, w, b):
    """Leaf float64 copies and the full logits, for the reference's autograd."""
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_(w.requires_grad)
    b64 = None if b is None else b.detach().double().requires_grad_()
    z = h64 @ w64.T + (0 if b64 is None else b64)
    return z, [t for t in (h64, w64, b64) if t is not None and t.requires_grad]


def grads(out, params, up=None):
    return torch.autograd.grad(out, [p for p in params if p is not None and p.requires_grad], up)


def assert_close(got, want, tol, what):
    for i, (g, r) in enumerate(zip(got, want)):
        assert torch.isfinite(g).all(), (what, i)
        assert rel_err(g, r) < tol, (what, i, rel_err(g, r))


# ---- linear_logprobs ---------------------------------------------------------------------------

CASES = {
    "plain": {},
    "frozen_head": {"train_w": False},
    "bias": {"bias": True},
    "temperature": {"temperature": 0.7},
    "softcap_temperature": {"softcap": 2.0, "temperature": 1.3},
    "frozen_softcap_temp": {"train_w": False, "softcap": 3.0, "temperature": 0.9, "bias": True},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_logprobs_match_reference(backend, case):
    kw = dict(CASES[case])
    h, w, b = head(3, 11, bias=kw.pop("bias", False), train_w=kw.pop("train_w", True))
    y = torch.randint(0, 97, (3, 11))
    y[0, :4] = -100
    logp, ent = linear_logprobs(h, w, y, bias=b, backend=backend, return_entropy=True, chunk_size=7, **kw)
    assert logp.shape == y.shape and logp.dtype == torch.float32
    z, p64 = logits64(h, w, b)
    ref_logp, ref_ent = logprobs_reference(z, y, **kw)
    assert rel_err(logp, ref_logp) < TOL[torch.float32]
    assert rel_err(ent, ref_ent) < TOL[torch.float32]
    assert (logp[0, :4] == 0).all() and (ent[0, :4] == 0).all()
    up = torch.randn_like(logp)
    assert_close(grads(logp, (h, w, b), up), torch.autograd.grad(ref_logp, p64, up.double()),
                 TOL[torch.float32], case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train_w", [True, False])
def test_logprobs_bf16(backend, train_w):
    h, w, b = head(2, 9, dtype=torch.bfloat16, train_w=train_w)
    y = torch.randint(0, 97, (2, 9))
    logp = linear_logprobs(h, w, y, backend=backend, temperature=0.8)
    z, p64 = logits64(h, w, b)
    ref, _ = logprobs_reference(z, y, temperature=0.8)
    assert rel_err(logp, ref) < TOL[torch.bfloat16]
    up = torch.randn_like(logp)
    assert_close(grads(logp, (h, w), up), torch.autograd.grad(ref, p64, up.double()), TOL[torch.bfloat16], "bf16")


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_no_grad_is_reference_mode(backend):
    h, w, _ = head(2, 5)
    y = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        logp = linear_logprobs(h, w, y, backend=backend)
    assert not logp.requires_grad
    ref, _ = logprobs_reference(h.detach() @ w.detach().T, y)
    assert rel_err(logp, ref) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_all_masked_and_length_one(backend):
    h, w, _ = head(2, 1)
    y = torch.full((2, 1), -100)
    logp, ent = linear_logprobs(h, w, y, backend=backend, return_entropy=True)
    assert torch.equal(logp, torch.zeros(2, 1)) and torch.equal(ent, torch.zeros(2, 1))
    for g in grads(logp, (h, w), torch.randn_like(logp)):
        assert torch.equal(g, torch.zeros_like(g))
    y = torch.randint(0, 97, (2, 1))
    logp = linear_logprobs(h, w, y, backend=backend)
    ref, _ = logprobs_reference(h.detach() @ w.detach().T, y)
    assert rel_err(logp, ref) < TOL[torch.float32]


# ---- dpo_loss -----------------------------------------------------------------------------------


def dpo_batch(B=3, T=10, V=97, prompt=4):
    y = torch.randint(0, V, (2 * B, T))
    y[:, :prompt] = -100  # prompt
    y[1, -3:] = -100  # padding on one sequence
    y[2 * B - 1, -5:] = -100
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", DPO_TYPES)
def test_dpo_loss_types(backend, loss_type):
    h, w, _ = head(6, 10)
    y = dpo_batch()
    ref_logps = torch.randn(6) * 2 - 10
    eps = 0.1 if loss_type in ("sigmoid", "robust", "exo_pair") else 0.0
    loss, stats = dpo_loss(h, w, y, ref_logps=ref_logps, beta=0.3, loss_type=loss_type, label_smoothing=eps,
                           backend=backend, chunk_size=8)
    z, p64 = logits64(h, w, None)
    logp64, _ = logprobs_reference(z, y)
    ref_loss, rc, rr = dpo_reference(logp64, y, ref_logps, beta=0.3, loss_type=loss_type, label_smoothing=eps)
    assert rel_err(loss, ref_loss) < TOL[torch.float32], (loss, ref_loss)
    assert_close(grads(loss, (h, w)), torch.autograd.grad(ref_loss, p64), TOL[torch.float32], loss_type)
    assert rel_err(stats.chosen_rewards, rc) < TOL[torch.float32]
    assert rel_err(stats.rejected_rewards, rr) < TOL[torch.float32]
    # accuracy from our own rewards (checked above): a near-tie may flip between fp32 and fp64
    ours = (stats.chosen_rewards > stats.rejected_rewards).float().mean()
    assert stats.reward_accuracy.item() == ours.item()
    assert stats.reward_margin.item() == pytest.approx((rc - rr).mean().item(), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("average", [False, True])
def test_dpo_reference_free_frozen_head_and_average(backend, average):
    h, w, b = head(4, 7, train_w=False, bias=False)
    y = dpo_batch(B=2, T=7, prompt=2)
    loss, stats = dpo_loss(h, w, y, beta=0.1, average_log_prob=average, backend=backend)
    z, p64 = logits64(h, w, None)
    logp64, _ = logprobs_reference(z, y)
    ref_loss, _, _ = dpo_reference(logp64, y, None, beta=0.1, loss_type="sigmoid", average_log_prob=average)
    assert rel_err(loss, ref_loss) < TOL[torch.float32]
    assert_close(grads(loss, (h,)), torch.autograd.grad(ref_loss, p64), TOL[torch.float32], "frozen")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpo_fully_masked_sequence_and_length_one(backend):
    h, w, _ = head(4, 1)
    y = torch.randint(0, 97, (4, 1))
    y[1] = -100  # the second chosen sequence has no trained token at all
    loss, stats = dpo_loss(h, w, y, beta=0.2, average_log_prob=True, backend=backend)
    assert torch.isfinite(loss) and stats.chosen_tokens.tolist() == [1, 0]
    z, p64 = logits64(h, w, None)
    logp64, _ = logprobs_reference(z, y)
    ref_loss, _, _ = dpo_reference(logp64, y, None, beta=0.2, loss_type="sigmoid", average_log_prob=True)
    assert rel_err(loss, ref_loss) < TOL[torch.float32]
    g = grads(loss, (h, w))
    assert_close(g, torch.autograd.grad(ref_loss, p64), TOL[torch.float32], "masked")
    assert torch.equal(g[0][1], torch.zeros_like(g[0][1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpo_gradient_accumulation(backend):
    """4 pairs at once = 2 micro-batches of 2 pairs with num_pairs=4, summed."""
    B, T = 4, 6
    h, w, _ = head(2 * B, T)
    y = dpo_batch(B=B, T=T, prompt=2)
    ref_logps = torch.randn(2 * B) - 8
    full, _ = dpo_loss(h, w, y, ref_logps=ref_logps, backend=backend)
    g_full = grads(full, (h, w))
    total, gw = 0.0, torch.zeros_like(w)
    gh = torch.zeros_like(h)
    for part in (slice(0, 2), slice(2, 4)):
        idx = torch.cat([torch.arange(B)[part], B + torch.arange(B)[part]])
        hp = h.detach()[idx].requires_grad_()
        lp, _ = dpo_loss(hp, w, y[idx], ref_logps=ref_logps[idx], num_pairs=B, backend=backend)
        ghp, gwp = grads(lp, (hp, w))
        total, gw = total + lp, gw + gwp
        gh[idx] += ghp
    torch.testing.assert_close(total, full, rtol=1e-5, atol=1e-6)  # sums of ± terms: not relative
    assert rel_err(gh, g_full[0]) < 1e-5 and rel_err(gw, g_full[1]) < 1e-5


def test_dpo_bad_input():
    h, w, _ = head(3, 4)
    with pytest.raises(ValueError, match=r"\[2B, T, H\]"):
        dpo_loss(h, w, torch.zeros(3, 4, dtype=torch.long))
    h, w, _ = head(4, 4)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(h, w, torch.zeros(4, 4, dtype=torch.long), loss_type="dpo")
    with pytest.raises(ValueError, match="ref_logps"):
        dpo_loss(h, w, torch.zeros(4, 4, dtype=torch.long), ref_logps=torch.zeros(2))


# ---- grpo_loss ----------------------------------------------------------------------------------


def grpo_batch(B=4, T=9, V=97):
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 5:] = False  # a short completion
    mask[2, 2:] = False
    adv = torch.randn(B)
    return ids, mask, adv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", GRPO_TYPES)
@pytest.mark.parametrize("with_old", [False, True])
def test_grpo_loss_types(backend, loss_type, with_old):
    B, T = 4, 9
    h, w, _ = head(B, T)
    ids, mask, adv = grpo_batch(B, T)
    temp = 0.9
    z, p64 = logits64(h, w, None)
    logp64, ent64 = logprobs_reference(z, torch.where(mask, ids, -100), temperature=temp)
    old = (logp64.detach() + 0.6 * torch.randn(B, T)).float() if with_old else None
    ref = (logp64.detach() + 0.2 * torch.randn(B, T)).float()
    loss, stats = grpo_loss(h, w, ids, mask, adv, old_logps=old, ref_logps=ref, beta=0.05,
                            epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, temperature=temp,
                            backend=backend, chunk_size=5)
    ref_loss, kl, low, high = grpo_reference(logp64, mask, adv, old_logps=old, ref_logps=ref, beta=0.05,
                                             eps_low=0.2, eps_high=0.28, loss_type=loss_type)
    assert rel_err(loss, ref_loss) < TOL[torch.float32], (loss, ref_loss)
    assert_close(grads(loss, (h, w)), torch.autograd.grad(ref_loss, p64), TOL[torch.float32], loss_type)
    m = mask.double()
    assert rel_err(stats.kl, (kl * m).sum() / m.sum()) < 1e-4
    assert rel_err(stats.entropy, (ent64 * m).sum() / m.sum()) < 1e-4
    assert stats.clip_ratio_low.item() == pytest.approx(low.item(), abs=1e-6)
    assert stats.clip_ratio_high.item() == pytest.approx(high.item(), abs=1e-6)
    if with_old:
        assert 0 < stats.clip_ratio_region.item() < 1  # the noise on old_logps does clip some tokens


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", GRPO_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_grpo_sequence_level_and_per_token_advantages(backend, loss_type, level, per_token_adv):
    """GSPO's sequence ratio and REINFORCE++'s [B, T] advantages, against the float64 reference."""
    B, T = 5, 7
    h, w, b = head(B, T, bias=True)
    ids, mask, adv = grpo_batch(B, T)
    mask[3, :] = False  # a sequence with no completion token: ratio 1, no loss, no clip count
    # row 0: ratios ~0.45 with A < 0 (clipped low), row 1: ~2.2 with A > 0 (clipped high), rows 2, 4 near 1
    sign = torch.tensor([-1.0, 1.0, 1.0, -1.0, 1.0])
    shift = torch.tensor([-0.8, 0.8, 0.0, 0.0, 0.0])
    adv = (torch.rand(B, T) + 0.1) * sign[:, None] if per_token_adv else (torch.rand(B) + 0.1) * sign
    temp = 1.3
    z, p64 = logits64(h, w, b)
    logp64, _ = logprobs_reference(z, torch.where(mask, ids, -100), temperature=temp)
    old = (logp64.detach() - shift[:, None] + 0.1 * torch.randn(B, T)).float()
    ref = (logp64.detach() + 0.2 * torch.randn(B, T)).float()
    eps_high = 1.5 if loss_type == "cispo" else 0.28
    loss, stats = grpo_loss(h, w, ids, mask, adv, old_logps=old, ref_logps=ref, beta=0.03, epsilon_low=0.2,
                            epsilon_high=eps_high, loss_type=loss_type, importance_sampling_level=level,
                            temperature=temp, bias=b, backend=backend, chunk_size=4)
    ref_loss, _, low, high = grpo_reference(logp64, mask, adv, old_logps=old, ref_logps=ref, beta=0.03, eps_low=0.2,
                                            eps_high=eps_high, loss_type=loss_type, level=level)
    assert rel_err(loss, ref_loss) < TOL[torch.float32], (loss, ref_loss)
    assert_close(grads(loss, (h, w, b)), torch.autograd.grad(ref_loss, p64), TOL[torch.float32], (loss_type, level))
    assert stats.clip_ratio_low.item() == pytest.approx(low.item(), abs=1e-6)
    assert stats.clip_ratio_high.item() == pytest.approx(high.item(), abs=1e-6)
    assert 0 < stats.clip_ratio_region.item() < 1  # some ratios clip, not all


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_masked_sequence_and_length_one(backend):
    h, w, _ = head(3, 1, train_w=False)
    ids, mask, adv = torch.randint(0, 97, (3, 1)), torch.tensor([[True], [False], [True]]), torch.randn(3)
    for lt in GRPO_TYPES:
        loss, stats = grpo_loss(h, w, ids, mask, adv, loss_type=lt, backend=backend)
        (gh,) = grads(loss, (h,))
        assert torch.isfinite(loss) and torch.isfinite(gh).all() and torch.equal(gh[1], torch.zeros_like(gh[1]))
        z, p64 = logits64(h, w, None)
        logp64, _ = logprobs_reference(z, torch.where(mask, ids, -100))
        ref_loss, *_ = grpo_reference(logp64, mask, adv, loss_type=lt)
        assert rel_err(loss, ref_loss) < TOL[torch.float32]
        assert rel_err(gh, torch.autograd.grad(ref_loss, p64)[0]) < TOL[torch.float32]
    mask[:] = False
    loss, _ = grpo_loss(h, w, ids, mask, adv, backend=backend)
    assert loss.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", GRPO_TYPES)
def test_grpo_gradient_accumulation(backend, loss_type):
    """8 sequences at once = 2 micro-batches of 4 with the global num_items, summed."""
    B, T = 8, 6
    h, w, _ = head(B, T)
    ids, mask, adv = grpo_batch(B, T)
    old = torch.randn(B, T) * 0.1 - 4.0
    n_full = int(mask.sum()) if loss_type in PER_TOKEN_COUNT else B
    full, _ = grpo_loss(h, w, ids, mask, adv, old_logps=old, loss_type=loss_type, backend=backend)
    g_full = grads(full, (h, w))
    total, gw, gh = 0.0, torch.zeros_like(w), torch.zeros_like(h)
    for part in (slice(0, 4), slice(4, 8)):
        hp = h.detach()[part].requires_grad_()
        lp, _ = grpo_loss(hp, w, ids[part], mask[part], adv[part], old_logps=old[part], loss_type=loss_type,
                          num_items=n_full, max_completion_len=T, backend=backend)
        ghp, gwp = grads(lp, (hp, w))
        total, gw = total + lp, gw + gwp
        gh[part] = ghp
    torch.testing.assert_close(total, full, rtol=1e-5, atol=1e-6)  # sums of ± terms: not relative
    assert rel_err(gh, g_full[0]) < 1e-5 and rel_err(gw, g_full[1]) < 1e-5


def test_grpo_bad_input():
    h, w, _ = head(2, 3)
    ids, mask = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(h, w, ids, mask, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(h, w, ids, mask, torch.zeros(2), importance_sampling_level="sentence")
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(h, w, ids, mask, torch.zeros(2), beta=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(h, w, ids, mask, torch.zeros(2), loss_type="ppo")
