"""ORPO, SimPO and CPO (kernels/preference.py) against a float64 full-logits reference, against TRL's own
loss methods on the same log-probs, and against TRL's ORPOTrainer / CPOTrainer forward on a real model.

Fresh random inputs each run. The Triton path runs under the interpreter here.
"""

import pytest
import torch
import torch.nn.functional as F

from fasttune.kernels.preference import preference_loss
from reference import TOL, logprobs_reference, preference_reference, rel_err

BACKENDS = ["torch", "triton"]


def make(B=3, T=11, H=16, V=97, scale=2.0, bias=False):
    h = (torch.randn(2 * B, T, H) * scale).requires_grad_()
    w = (torch.randn(V, H) / H**0.5).requires_grad_()
    b = (torch.randn(V) * 0.5).requires_grad_() if bias else None
    y = torch.randint(0, V, (2 * B, T))
    for i in range(2 * B):  # a prompt of 1..3 tokens, then the response, then padding
        p, end = int(torch.randint(1, 4, ())), int(torch.randint(5, T + 1, ()))
        y[i, :p] = -100
        y[i, end:] = -100
    return h, w, b, y


def reference(h, w, b, y, softcap=None, **kw):
    """Loss and gradients (h, w, b) of the float64 full-logits reference."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (h, w, b)]
    h64, w64, b64 = leaves
    logits = h64 @ w64.T + (0 if b64 is None else b64)
    logp, _ = logprobs_reference(logits, y, softcap=softcap)
    loss = preference_reference(logp, y, **kw)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return loss.detach(), grads


CASES = {
    "orpo": dict(loss_type="orpo", beta=0.1),
    "orpo_beta": dict(loss_type="orpo", beta=0.7, _bias=True, softcap=4.0),
    "simpo": dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0),
    "simpo_nll_smooth": dict(loss_type="simpo", beta=2.5, simpo_gamma=1.2, cpo_alpha=0.3, label_smoothing=0.1),
    "cpo": dict(loss_type="cpo", beta=0.1, cpo_alpha=1.0),
    "cpo_avg_smooth": dict(loss_type="cpo", beta=0.5, cpo_alpha=2.0, average_log_prob=True, label_smoothing=0.2),
    "cpo_counts": dict(loss_type="cpo", beta=0.2, num_pairs=7, num_chosen_tokens=23),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(backend, case):
    kw = dict(CASES[case])
    h, w, b, y = make(bias=kw.pop("_bias", False))
    loss, stats = preference_loss(h, w, y, bias=b, backend=backend, chunk_size=8, **kw)
    params = [t for t in (h, w, b) if t is not None]
    grads = torch.autograd.grad(loss, params)
    ref, ref_grads = reference(h, w, b, y, **kw)
    assert loss.dtype == torch.float32 and rel_err(loss, ref) < TOL[torch.float32], (loss, ref)
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all() and rel_err(g, r) < TOL[torch.float32]
    beta = kw["beta"]
    assert torch.allclose(stats.chosen_rewards, beta * stats.chosen_logps.detach())
    assert stats.reward_accuracy == (stats.chosen_rewards > stats.rejected_rewards).float().mean()


class _Accel:  # the one attribute TRL's loss methods read from the accelerator
    device = torch.empty(0).device  # where the tests' tensors are (CUDA on a GPU machine)


def _trl_orpo(beta):
    from types import SimpleNamespace

    from trl.experimental.orpo import ORPOTrainer

    return lambda c, r: ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=beta, accelerator=_Accel()), c, r)


def _trl_cpo(**attrs):
    from types import SimpleNamespace

    from trl.experimental.cpo import CPOTrainer

    ns = SimpleNamespace(alpha=0.0, accelerator=_Accel(), **attrs)
    return lambda c, r: CPOTrainer.cpo_loss(ns, c, r)


@pytest.mark.parametrize("case", ["orpo", "orpo_beta", "simpo", "simpo_nll_smooth", "cpo", "cpo_avg_smooth"])
def test_matches_trl_loss_methods_on_the_same_logps(case):
    """Our sequence log-probs fed to TRL's odds_ratio_loss / cpo_loss, plus TRL's NLL term
    (nn.CrossEntropyLoss over the chosen half), give our loss."""
    kw = dict(CASES[case])
    h, w, b, y = make(B=4, bias=kw.pop("_bias", False))
    loss, s = preference_loss(h, w, y, bias=b, backend="torch", **kw)
    B = 4
    logits = h @ w.T + (0 if b is None else b)
    if kw.get("softcap"):
        logits = kw["softcap"] * torch.tanh(logits / kw["softcap"])
    nll = torch.nn.CrossEntropyLoss()(logits[:B].reshape(-1, logits.shape[-1]), y[:B].reshape(-1))
    c, r = s.chosen_logps.detach(), s.rejected_logps.detach()
    if kw["loss_type"] == "orpo":
        losses, cr, rr, ratio, log_odds = _trl_orpo(kw["beta"])(c, r)
        trl = nll - losses.mean()
        assert torch.allclose(s.log_odds_ratio, ratio, rtol=1e-5) and torch.allclose(s.log_odds_chosen, log_odds,
                                                                                     rtol=1e-5, atol=1e-6)
    else:
        fn = _trl_cpo(loss_type="sigmoid" if kw["loss_type"] == "cpo" else "simpo", beta=kw["beta"],
                      simpo_gamma=kw.get("simpo_gamma", 0.5), label_smoothing=kw.get("label_smoothing", 0.0))
        losses, cr, rr = fn(c, r)
        trl = losses.mean() + kw.get("cpo_alpha", 1.0) * nll
    assert rel_err(loss, trl) < 1e-5, (loss, trl)
    assert torch.allclose(s.chosen_rewards, cr) and torch.allclose(s.rejected_rewards, rr)


# ---- TRL's whole forward on a real (tiny) model ----------------------------------------------


def _tiny_model():
    from transformers import AutoModelForCausalLM

    from fasttune import builtin

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(builtin.resolve("builtin:tiny-llama"), attn_implementation="eager",
                                                dtype=torch.float32).to(torch.empty(0).device)


def _trl_batch(B, prompt_len, V, gen):
    """TRL's tokenized pair batch: chosen_/rejected_ input_ids, attention_mask, labels (prompt and
    padding -100), right-padded, different lengths."""
    batch, cpu = {}, torch.device("cpu")  # made on the host (the generator's device), then moved
    for side in ("chosen", "rejected"):
        lengths = [prompt_len + int(torch.randint(2, 9, (), generator=gen, device=cpu)) for _ in range(B)]
        T = max(lengths)
        ids = torch.zeros(B, T, dtype=torch.long, device=cpu)
        mask = torch.zeros(B, T, dtype=torch.long, device=cpu)
        labels = torch.full((B, T), -100, device=cpu)
        for i, n in enumerate(lengths):
            ids[i, :n] = torch.randint(1, V, (n,), generator=gen, device=cpu)
            mask[i, :n] = 1
            labels[i, prompt_len:n] = ids[i, prompt_len:n]
        ids[:, :prompt_len] = ids[0, :prompt_len]  # the same prompt on both sides
        batch |= {f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels}
    return {k: v.to(torch.empty(0).device) for k, v in batch.items()}


def _ours(model, trl_cls, batch, **kw):
    cat = trl_cls.concatenated_inputs(batch, padding_value=0)
    out = model.model(input_ids=cat["concatenated_input_ids"], attention_mask=cat["concatenated_attention_mask"])
    shift = F.pad(cat["concatenated_labels"], (0, 1), value=-100)[:, 1:]
    return preference_loss(out.last_hidden_state, model.lm_head.weight, shift, backend="torch", **kw)[0]


@pytest.mark.parametrize("loss_type", ["orpo", "simpo", "cpo"])
def test_matches_trl_trainer_forward_on_a_model(loss_type):
    """TRL's get_batch_loss_metrics (its forward, log-probs, NLL and loss) on the same model and
    batch: same loss and gradients. ORPO's NLL in TRL also covers the prompt: a 1-token prompt (never
    a target after the shift) makes the two the same; with a longer prompt they differ by design."""
    from accelerate import Accelerator
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    model = _tiny_model()
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (), device="cpu")))
    V = model.config.vocab_size
    if loss_type == "orpo":
        batch, cls, beta = _trl_batch(3, 1, V, gen), ORPOTrainer, 0.3
        trainer = object.__new__(cls)
        vars(trainer).update(is_encoder_decoder=False, padding_value=0, aux_loss_enabled=False, beta=beta)
        kw = dict(loss_type="orpo", beta=beta)
    else:
        batch, cls, beta = _trl_batch(3, 4, V, gen), CPOTrainer, 2.0 if loss_type == "simpo" else 0.1
        trainer = object.__new__(cls)
        vars(trainer).update(is_encoder_decoder=False, pad_token_id=0, aux_loss_enabled=False, beta=beta, alpha=0.0,
                             loss_type="sigmoid" if loss_type == "cpo" else "simpo", simpo_gamma=0.7, cpo_alpha=0.5,
                             label_smoothing=0.0)
        kw = dict(loss_type=loss_type, beta=beta, simpo_gamma=0.7, cpo_alpha=0.5)
    trainer.accelerator = Accelerator(cpu=not torch.cuda.is_available())
    params = [p for p in model.parameters() if p.requires_grad]
    theirs, _ = cls.get_batch_loss_metrics(trainer, model, batch)
    g_theirs = torch.autograd.grad(theirs, params, allow_unused=True)
    ours = _ours(model, cls, batch, **kw)
    g_ours = torch.autograd.grad(ours, params, allow_unused=True)
    assert rel_err(ours, theirs) < 1e-5, (ours, theirs)
    for a, b in zip(g_ours, g_theirs):
        if b is not None:
            assert rel_err(a, b) < 1e-4


# ---- hard cases ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["orpo", "simpo", "cpo"])
def test_empty_sides_and_length_one(backend, loss_type):
    """A pair whose rejected side has no trained token, a chosen side of one token, and a batch
    with nothing trained at all: finite loss, finite gradients, no NaN."""
    h, w, b, y = make(B=3)
    y[3] = -100  # pair 0: empty rejected
    y[1] = -100
    y[1, 4] = 7  # pair 1: a one-token chosen
    loss, s = preference_loss(h, w, y, loss_type=loss_type, beta=0.5, backend=backend)
    grads = torch.autograd.grad(loss, (h, w))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    if loss_type == "orpo":  # the empty pair's odds term is left out; its chosen tokens still count in the NLL
        assert torch.equal(grads[0][3], torch.zeros_like(grads[0][3]))
        logp, _ = logprobs_reference(h.detach().double() @ w.detach().double().T, y)
        keep = [1, 2, 4, 5]
        nll_all = -logp[:3].sum() / (y[:3] != -100).sum()
        nll_kept = -logp[[1, 2]].sum() / (y[[1, 2]] != -100).sum()
        ref = preference_reference(logp[keep], y[keep], loss_type="orpo", beta=0.5, num_pairs=3) - nll_kept + nll_all
        assert rel_err(loss, ref) < TOL[torch.float32]
    y[:] = -100
    loss, s = preference_loss(h, w, y, loss_type=loss_type, beta=0.5, backend=backend)
    grads = torch.autograd.grad(loss, (h, w))
    assert torch.isfinite(loss) and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_orpo_chosen_probability_near_one(backend):
    """π_c ≈ -1e-7 (the model all but certain of the chosen): log(1 - e^π) must stay finite and exact."""
    B, T, H, V = 2, 6, 8, 67
    h = torch.randn(2 * B, T, H)
    h[..., 0] = 1.0
    w = torch.randn(V, H) * 0.1
    w[:, 0] = 0.0
    y = torch.randint(0, V, (2 * B, T))
    y[:B] = 11
    w[11, 0] = 21.0  # p(11) = 1 - O(1e-7) on every position
    y[:, 0] = -100
    h.requires_grad_()
    w.requires_grad_()
    loss, s = preference_loss(h, w, y, loss_type="orpo", beta=0.2, backend=backend)
    assert (s.chosen_logps < 0).all() and (s.chosen_logps > -1e-5).all()
    grads = torch.autograd.grad(loss, (h, w))
    ref, ref_grads = reference(h, w, None, y, loss_type="orpo", beta=0.2)
    assert rel_err(loss, ref) < 1e-4
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-3


@pytest.mark.parametrize("loss_type", ["orpo", "cpo"])
def test_counts_make_microbatching_exact(loss_type):
    """Two micro-batches with the whole batch's num_pairs and num_chosen_tokens sum to the whole."""
    h, w, b, y = make(B=4)
    whole, _ = preference_loss(h, w, y, loss_type=loss_type, beta=0.3, backend="torch")
    g_whole = torch.autograd.grad(whole, (h, w))
    n_tok = int((y[:4] != -100).sum())
    parts = []
    for idx in ([0, 1, 4, 5], [2, 3, 6, 7]):
        parts.append(preference_loss(h[idx], w, y[idx], loss_type=loss_type, beta=0.3, num_pairs=4,
                                     num_chosen_tokens=n_tok, backend="torch")[0])
    total = parts[0] + parts[1]
    g_parts = torch.autograd.grad(total, (h, w))
    assert rel_err(total, whole) < 1e-6
    for a, b in zip(g_parts, g_whole):
        assert rel_err(a, b) < 1e-5


def test_bad_input_is_a_clear_error():
    h, w, b, y = make()
    with pytest.raises(ValueError, match="loss_type must be one of"):
        preference_loss(h, w, y, loss_type="sigmoid")
    with pytest.raises(ValueError, match="label_smoothing is not part of ORPO"):
        preference_loss(h, w, y, loss_type="orpo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="cpo_alpha must be >= 0"):
        preference_loss(h, w, y, loss_type="cpo", cpo_alpha=-1.0)
    with pytest.raises(ValueError, match=r"hidden must be \[2B, T, H\]"):
        preference_loss(h[:5], w, y[:5], loss_type="cpo")
