"""torch.compile(fullgraph=True) runs through fasttune's kernels without graph breaks.

The head (`fasttune::linear_ce`: fused_linear_cross_entropy, linear_logprobs and so dpo_loss and
grpo_loss), `fasttune::cross_entropy` and `fasttune::varlen_attention` are torch.library custom ops
with fake implementations and registered autograd. Each public function is compiled with
fullgraph=True on the CPU (torch path; aot_eager, which runs dynamo and AOTAutograd with the fake
implementations, plus one inductor build) and must give eager's values and gradients; opcheck
tests each op's registration; and a tiny Llama after `apply()` compiles whole.
"""

import pytest
import torch

from fasttune.kernels import cross_entropy, dpo_loss, fused_linear_cross_entropy, grpo_loss, linear_logprobs
from fasttune.kernels import varlen_attention

torch._dynamo.config.cache_size_limit = 64


def _both(fn, inputs, backend="aot_eager"):
    """(eager outputs, eager grads), (compiled outputs, compiled grads) of fn's scalar loss."""
    results = []
    for run in (fn, torch.compile(fn, fullgraph=True, backend=backend)):
        xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
        out = run(*xs)
        loss = out if out.dim() == 0 else out.float().square().sum()
        grads = torch.autograd.grad(loss, [x for x in xs if x.requires_grad])
        results.append((out.detach(), grads))
    return results


def _close(a, b):
    (oa, ga), (ob, gb) = a, b
    torch.testing.assert_close(ob, oa, rtol=1e-5, atol=1e-6)
    assert len(ga) == len(gb)
    for x, y in zip(ga, gb):  # fp32 sums in other orders (eager attention is torch's CPU flash kernel)
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)


def _head(N=23, H=16, V=37):
    h = torch.randn(N, H, requires_grad=True)
    w = (torch.randn(V, H) / H**0.5).requires_grad_()
    y = torch.randint(0, V, (N,))
    y[::4] = -100
    return h, w, y


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_linear_cross_entropy(reduction):
    h, w, y = _head()
    mask = torch.rand(y.shape) > 0.3
    fn = lambda h, w: fused_linear_cross_entropy(h, w, y, loss_mask=mask, reduction=reduction,  # noqa: E731
                                                 num_items=40 if reduction == "mean" else None, z_loss=1e-3)
    _close(*_both(fn, [h, w]))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_sft_loss_family(reduction):
    """DFT (token scaling) and class weights."""
    h, w, y = _head()
    c = torch.rand(w.shape[0]) + 0.2
    fn = lambda h, w: fused_linear_cross_entropy(h, w, y, reduction=reduction, token_scaling=True,  # noqa: E731
                                                 class_weights=c)
    _close(*_both(fn, [h, w]))
    logits = torch.randn(19, 41, requires_grad=True)
    c41 = torch.rand(41) + 0.2
    _close(*_both(lambda z: cross_entropy(z, y[:19], reduction=reduction, token_scaling=True, class_weights=c41),
                  [logits]))


def test_fused_linear_cross_entropy_inductor():
    h, w, y = _head()
    _close(*_both(lambda h, w: fused_linear_cross_entropy(h, w, y, label_smoothing=0.1), [h, w], "inductor"))


def test_frozen_head_per_token():
    """reduction none with a frozen head: dh per token formed in the forward, rows scaled after."""
    h, w, y = _head()
    w.requires_grad_(False)
    _close(*_both(lambda h: fused_linear_cross_entropy(h, w, y, reduction="none"), [h]))


def test_cross_entropy():
    logits = torch.randn(19, 41, requires_grad=True)
    y = torch.randint(0, 41, (19,))
    y[3] = -100
    _close(*_both(lambda z: cross_entropy(z, y, softcap=10.0), [logits]))


def test_linear_logprobs():
    h, w, y = _head()
    _close(*_both(lambda h, w: linear_logprobs(h, w, y, temperature=0.7), [h, w]))


def test_dpo_loss():
    B, T, H, V = 2, 9, 16, 31
    hidden = torch.randn(2 * B, T, H, requires_grad=True)
    w = torch.randn(V, H) / H**0.5
    labels = torch.randint(0, V, (2 * B, T))
    labels[:, :3] = -100
    ref = torch.randn(2 * B)
    _close(*_both(lambda x: dpo_loss(x, w, labels, ref_logps=ref, beta=0.2)[0], [hidden]))


@pytest.mark.parametrize("loss_type", ["orpo", "simpo", "cpo"])
def test_preference_loss(loss_type):
    from fasttune.kernels import preference_loss

    B, T, H, V = 2, 9, 16, 31
    hidden = torch.randn(2 * B, T, H, requires_grad=True)
    w = torch.randn(V, H) / H**0.5
    labels = torch.randint(0, V, (2 * B, T))
    labels[:, :3] = -100
    _close(*_both(lambda x: preference_loss(x, w, labels, loss_type=loss_type, beta=0.2)[0], [hidden]))


@pytest.mark.parametrize("kw", [{}, {"loss_type": "cispo", "importance_sampling_level": "sequence", "epsilon_high": 5.0}],
                         ids=["token", "gspo-cispo-per-token-adv"])
def test_grpo_loss(kw):
    B, T, H, V = 4, 7, 16, 29
    hidden = torch.randn(B, T, H, requires_grad=True)
    w = torch.randn(V, H) / H**0.5
    ids = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.2
    adv = torch.randn(B, T) if kw else torch.randn(B)
    ref = torch.randn(B, T) - 3
    _close(*_both(lambda x: grpo_loss(x, w, ids, mask, adv, ref_logps=ref, beta=0.04, **kw)[0], [hidden]))


@pytest.mark.parametrize("kw", [{}, {"softcap": 5.0, "window": 4}, {"causal": False}], ids=["causal", "gemma", "full"])
def test_varlen_attention(kw):
    T = 20
    q = torch.randn(T, 4, 16, requires_grad=True)
    k = torch.randn(T, 2, 16, requires_grad=True)
    v = torch.randn(T, 2, 16, requires_grad=True)
    cu = torch.tensor([0, 7, 8, 20], dtype=torch.int32)
    _close(*_both(lambda q, k, v: varlen_attention(q, k, v, cu, **kw), [q, k, v]))


def test_opcheck():
    """The ops' schemas, fake implementations and autograd registrations agree with their kernels."""
    h, w, y = _head(N=6, V=11)
    weights = (y != -100).float()
    n = weights.sum()
    args = (h, w, None, y, weights, weights, n, "mean", 0.0, 0.0, None, 1.0, False, False, "torch", 4, True, True, False)
    # linear_ce's AOT-dispatch check is left to the compile tests above: opcheck's harness also
    # differentiates the op's non-differentiable gradient outputs, which its partitioner rejects.
    torch.library.opcheck(torch.ops.fasttune.linear_ce.default, args, test_utils=("test_schema", "test_faketensor"))
    z = torch.randn(6, 11, requires_grad=True)
    torch.library.opcheck(torch.ops.fasttune.cross_entropy.default,
                          (z, y, weights, n, "sum", 0.0, 0.0, None, False, "torch", 4))
    # the DFT variants (token scaling)
    torch.library.opcheck(torch.ops.fasttune.linear_ce.default, args[:13] + (True,) + args[14:],
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fasttune.cross_entropy.default,
                          (z, y, weights, n, "mean", 0.0, 0.0, None, True, "torch", 4))
    q = torch.randn(9, 2, 8, requires_grad=True)
    kv = torch.randn(9, 1, 8, requires_grad=True)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    torch.library.opcheck(torch.ops.fasttune.varlen_attention.default,
                          (q, kv, kv.detach().clone().requires_grad_(), cu, None, None, True, 0.3, 0.0, 1 << 30, "torch"))
    seg = torch.tensor([0, 0, 1, 2, 0, 0, 0, 1, 1], dtype=torch.int32)  # prefix sharing: segments
    torch.library.opcheck(torch.ops.fasttune.varlen_attention.default,
                          (q, kv, kv.detach().clone().requires_grad_(), cu, None, seg, True, 0.3, 0.0, 1 << 30, "torch"))


def test_tiny_llama_after_apply():
    """A whole transformers model with fasttune's attention and fused loss, compiled fullgraph."""
    transformers = pytest.importorskip("transformers")
    from fasttune.kernels import applied

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 64, (2, 12))
    labels = ids.clone()
    labels[:, :3] = -100
    position_ids = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12)  # two samples per row

    def step(ids, labels):
        return model(input_ids=ids, labels=labels, position_ids=position_ids).loss

    with applied(model):
        eager = step(ids, labels)
        g_eager = torch.autograd.grad(eager, list(model.parameters()))
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(ids, labels)
        g_comp = torch.autograd.grad(compiled, list(model.parameters()))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_eager, g_comp):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", [None, "aot_eager"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_masked_rows_on_the_host_skip_the_matmuls(backend, reduction):
    """Labels on the host: masked rows never reach the head's matmuls, eager or compiled. Masked rows
    of hidden hold NaN; had they been multiplied into the weight gradient (0 · NaN), it would be NaN."""
    h, w, y = _head(N=20)
    y[:] = -100
    y[[1, 5, 9, 14, 18]] = torch.randint(0, 37, (5,))
    h.data[y == -100] = float("nan")
    fn = lambda h, w: fused_linear_cross_entropy(h, w, y, reduction=reduction).sum()  # noqa: E731
    run = fn if backend is None else torch.compile(fn, fullgraph=True, backend=backend)
    loss = run(h, w)
    gh, gw = torch.autograd.grad(loss, [h, w])
    assert torch.isfinite(loss) and torch.isfinite(gw).all() and torch.isfinite(gh[y != -100]).all()
    assert (gh[y == -100] == 0).all()
