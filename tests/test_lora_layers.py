"""LoRA layers as one autograd node (fasttune/lora_layers.py): the same outputs and gradients as PEFT's own
forward, on a 4-bit and a dense base, with dropout, bias and rsLoRA; PEFT's forward wherever the fused
one does not apply; the CPU dequantization workspace equal to bitsandbytes' op, bit for bit."""

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fasttune import lora_layers
from fasttune.config import SFTConfig, load_config
from fasttune.models import load_model

ROOT = Path(__file__).resolve().parents[1]


def _fused_nodes(out) -> int:
    """How many fused LoRA nodes the graph of `out` holds."""
    seen, stack, n = set(), [out.grad_fn], 0
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        n += type(f).__name__ == "_LoRALinearBackward"
        stack.extend(g for g, _ in f.next_functions)
    return n


def _model(tmp_path, *sets):
    cfg = load_config(ROOT / "examples/sft.toml", [f'run.output_dir="{tmp_path}"', *sets], schema=SFTConfig)
    model = load_model(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # B starts at zero: give the adapter something to say
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _run(model, ids, weights, seed=0):
    """Logits and the gradients of all trainable parameters for sum(logits · weights)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks on both sides
    logits = model(input_ids=ids).logits
    (logits * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads, _fused_nodes(logits)


@pytest.mark.parametrize("four_bit,dropout,ckpt", [(True, 0.0, True), (True, 0.1, True), (False, 0.0, False),
                                                   (False, 0.1, True)])
def test_a_model_trains_as_with_peft_forward(tmp_path, four_bit, dropout, ckpt):
    model = _model(tmp_path, f"model.load_in_4bit={str(four_bit).lower()}", f"lora.dropout={dropout}",
                   f"train.gradient_checkpointing={str(ckpt).lower()}", "lora.rslora=true")
    model.train()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 200, (2, 37), generator=g)
    weights = torch.randn(2, 37, model.config.vocab_size, generator=g)
    ours, our_grads, fused = _run(model, ids, weights)
    n_layers = sum(1 for m in model.modules() if type(m) in lora_layers._lora_layer_types())
    assert fused == n_layers > 0  # every LoRA layer ran as one node
    lora_layers.revert(model)
    theirs, their_grads, none = _run(model, ids, weights)
    assert none == 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert our_grads.keys() == their_grads.keys() and len(our_grads) == 2 * n_layers
    for n in our_grads:
        scale = their_grads[n].abs().max().item()  # fp32 sums in another order: relative to the largest
        torch.testing.assert_close(our_grads[n], their_grads[n], rtol=1e-4, atol=1e-5 * scale, msg=n)
    assert lora_layers.apply(model) == n_layers  # and back again


def _layer(dtype, bias, dropout=0.0):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(48, 80, bias=bias)).to(dtype)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=24, lora_dropout=dropout, target_modules=["0"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    assert lora_layers.apply(model) == 1
    return model


@pytest.mark.parametrize("bias", [True, False])
def test_float64_forward_and_backward_equal_peft(bias):
    model = _layer(torch.float64, bias)
    x = torch.randn(3, 5, 48, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 5, 80, dtype=torch.float64)

    def run():
        x.grad = None
        model.zero_grad(set_to_none=True)
        y = model(x)
        y.backward(dy)
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return y.detach(), x.grad.clone(), grads, _fused_nodes(y)

    y1, dx1, g1, fused = run()
    lora_layers.revert(model)
    y2, dx2, g2, none = run()
    assert (fused, none) == (1, 0)
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx1, dx2, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_an_input_without_gradient_still_trains_the_adapter():
    model = _layer(torch.float64, True)
    x = torch.randn(7, 48, dtype=torch.float64)  # the first layer's input: no gradient wanted
    model(x).sum().backward()
    ours = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    lora_layers.revert(model)
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    for a, b in zip(ours, [p.grad for p in model.parameters() if p.requires_grad], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_peft_forward_wherever_the_fused_one_does_not_apply():
    model = _layer(torch.float32, True)
    x = torch.randn(4, 48, requires_grad=True)
    assert _fused_nodes(model(x)) == 1
    with model.disable_adapter():  # the base alone
        y = model(x)
        assert _fused_nodes(y) == 0
        torch.testing.assert_close(y, model.base_model.model[0].base_layer(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: PEFT's dtype rules, PEFT's forward
        assert _fused_nodes(model(x)) == 0
    model.add_adapter("second", LoraConfig(r=4, target_modules=["0"]))
    model.base_model.set_adapter(["default", "second"])  # two adapters at once
    assert _fused_nodes(model(x)) == 0
    model.base_model.set_adapter("second")  # one adapter again, another one: fused
    assert _fused_nodes(model(x)) == 1
    model.merge_adapter()
    assert _fused_nodes(model(x)) == 0


def test_the_cpu_workspace_dequantizes_as_bitsandbytes(tmp_path):
    import bitsandbytes.functional as bf

    assert lora_layers._probe_workspace()  # the direct call works with the installed bitsandbytes
    model = _model(tmp_path, "model.load_in_4bit=true")
    ptrs = set()
    for m in model.modules():
        if type(m) in lora_layers._lora_layer_types():
            w = m.base_layer.weight
            dense = lora_layers._dense_weight(m.base_layer, torch.float32)
            ptrs.add(dense.untyped_storage().data_ptr())
            assert torch.equal(dense, bf.dequantize_4bit(w.data, w.quant_state))
    assert len(ptrs) == 1  # one buffer for every layer
    g = torch.Generator().manual_seed(0)
    packed, qs = bf.quantize_4bit(torch.randn(64, 256, generator=g), quant_type="nf4", compress_statistics=True)
    assert qs.nested and not lora_layers._c_dequantize(packed, qs, torch.empty(64, 256))  # nested scales: bnb's op


def test_the_base_alone_runs_through_the_workspace(tmp_path, monkeypatch):
    model = _model(tmp_path, "model.load_in_4bit=true")
    calls = []
    dense = lora_layers._dense_weight
    monkeypatch.setattr(lora_layers, "_dense_weight", lambda *a: calls.append(1) or dense(*a))
    ids = torch.randint(3, 200, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), model.disable_adapter():  # GRPO's reference
        ours = model(input_ids=ids).logits
        n_layers = len(calls)
        lora_layers.revert(model)
        theirs = model(input_ids=ids).logits
    assert n_layers == sum(1 for m in model.modules() if type(m) in lora_layers._lora_layer_types()) > 0
    assert len(calls) == n_layers  # PEFT's forward did not come here
    assert torch.equal(ours, theirs)
    with torch.no_grad():  # and the adapter still matters
        assert not torch.equal(model(input_ids=ids).logits, theirs)
