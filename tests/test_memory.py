"""A loaded model keeps no tensor in the checkpoint's memory map (fasttune/memory.py): else every page
read while loading stays resident for the whole run."""

import gc
from pathlib import Path

import torch

from fasttune.models import load_model
from test_train import config


def _mapped(folder) -> list[str]:
    folder = str(Path(folder).resolve())
    return [line.split()[-1] for line in open("/proc/self/maps") if folder in line and line.rstrip().endswith(".safetensors")]


def test_qlora_model_leaves_the_checkpoint_unmapped(tmp_path):
    from fasttune import builtin

    cfg = config(tmp_path)
    folder = builtin.resolve(cfg.model.path)
    model = load_model(cfg)
    gc.collect()
    assert not _mapped(folder), _mapped(folder)
    # the second load reads fasttune's 4-bit copy, mapped as well: its packed weights and scales are copied too
    from fasttune import quantized_cache

    del model
    model = load_model(cfg)
    gc.collect()
    copies = list(quantized_cache.cache_root().glob("*/model.safetensors"))
    assert copies and not any(_mapped(c.parent) for c in copies), [_mapped(c.parent) for c in copies]
    # and it still trains: the copied tensors are the ones the model uses (tied head = embeddings)
    base = model.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight or not base.config.tie_word_embeddings
    ids = torch.randint(1, 200, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_unnested_scales_give_the_same_weights_and_outputs():
    """unnest_absmax keeps a CPU model's double-quantized scales in fp32: bit for bit what each use computed."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    from fasttune.models import keep_4bit_layout, unnest_absmax

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(256, 384, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(384, 256) * 0.05, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")
    layer = torch.nn.Sequential(layer.to("cpu"))
    keep_4bit_layout(layer)
    w = layer[0].weight
    assert w.quant_state.nested
    x = torch.randn(5, 256, requires_grad=True)
    before_w, before_y = dequantize_4bit(w.data, w.quant_state), layer(x)
    before_g, = torch.autograd.grad(before_y.sum(), x)
    unnest_absmax(layer)
    assert not w.quant_state.nested and w.quant_state.absmax.dtype == torch.float32
    after_y = layer(x)
    assert torch.equal(dequantize_4bit(w.data, w.quant_state), before_w)
    assert torch.equal(after_y, before_y)
    assert torch.equal(torch.autograd.grad(after_y.sum(), x)[0], before_g)
