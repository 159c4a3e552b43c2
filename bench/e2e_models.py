"""The models of the end-to-end benchmarks: real architectures, random weights, QLoRA, no download.

`CONFIGS` writes out the published configs (hidden size, layers, heads, kv heads, intermediate
size, vocabulary, RoPE) of Llama-3-8B, Llama-3.2-1B and Qwen2.5-7B, plus tiny ones of the same
architectures for the CPU. `build_qlora(name)` makes the model the way `fasttune.models.load_model`
ends up with it, without a checkpoint:
  1. the transformers model is built on the meta device (no memory);
  2. each decoder-layer Linear becomes a bitsandbytes NF4 `Linear4bit` (double quantization, compute
     dtype bf16 on CUDA), its random weight drawn on the device and quantized at once, one layer at a
     time, so an 8B model never holds more than one bf16 weight matrix beside its 4-bit ones;
  3. embeddings, norms and lm_head are materialized in the compute dtype (N(0, 0.02), norms 1; 0.2 for
     the tiny smoke models, see INIT_STD), RoPE
     buffers recomputed on the device;
  4. PEFT LoRA r=16, alpha=32 on every linear layer of the decoder (as `lora.target_modules =
     "all-linear"`; lm_head excluded, as PEFT does).
`weight_bytes` and `step_bytes` guess the memory from the config, so a shape that cannot fit is
skipped with its reason before it is tried.
"""

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

CONFIGS = {
    # meta-llama/Meta-Llama-3-8B
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=128256,
                         rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
    # Qwen/Qwen2.5-7B
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, rope_theta=1000000.0,
                       max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       use_sliding_window=False),
    # CPU smoke shapes of the same two architectures
    "llama-tiny": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, vocab_size=512, rope_theta=500000.0,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "qwen2-tiny": dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, vocab_size=512, rope_theta=1000000.0,
                       max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       use_sliding_window=False),
}
# Weight init std: 0.02 as published models are initialized; the tiny smoke models get 0.2, since at
# hidden size 64 with 0.02 the logits are nearly uniform and the loss barely depends on attention, so the
# providers' agreement would not notice samples attending across each other.
INIT_STD = {"llama-tiny": 0.2, "qwen2-tiny": 0.2}
LORA_R, LORA_ALPHA = 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_config(name):
    from transformers import AutoConfig

    spec = dict(CONFIGS[name])
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    cfg.pad_token_id = 0  # the samples never use id 0 (see e2e.py), so padding is unambiguous
    return cfg


def _dims(name):
    c = CONFIGS[name]
    H, L, I, V = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    hd = c.get("head_dim", H // c["num_attention_heads"])
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = [(H, q), (H, kv), (H, kv), (q, H), (H, I), (H, I), (I, H)]  # (in, out) of each Linear of a layer
    return H, L, I, V, shapes


def weight_bytes(name):
    """The model's memory: NF4 linears (with their statistics) and bf16 embeddings and head."""
    H, L, I, V, shapes = _dims(name)
    linear = L * sum(i * o for i, o in shapes)
    return int(linear * 0.53 + V * H * 2 * (1 if CONFIGS[name]["tie_word_embeddings"] else 2))


def step_bytes(name, tokens, logit_tokens, checkpointing):
    """A rough peak of one QLoRA training step over the weights: LoRA with its gradient and AdamW
    state, activations of `tokens` tokens (the layer inputs only with gradient checkpointing, plus
    one layer recomputed), and full fp32 logits for `logit_tokens` tokens (0 for a fused loss).
    On the high side; out-of-memory errors are caught anyway."""
    H, L, I, V, shapes = _dims(name)
    lora = L * sum(LORA_R * (i + o) for i, o in shapes) * 4 * 4
    per_layer = (14 * H + 5 * I) * 2  # bf16 activations one layer saves per token (attention, MLP, LoRA inputs)
    acts = tokens * (L * H * 2 + per_layer) if checkpointing else tokens * L * per_layer
    logits = logit_tokens * V * (2 + 4 + 4 + 4)  # bf16 logits, fp32 copy, log-softmax, its gradient
    return int(lora + acts + logits + 512 * 2**20)


def _materialize(module, dev, dtype, g, std):
    """Give every parameter still on the meta device real values: norms 1, the rest N(0, std)."""
    for mod_name, mod in module.named_modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.device.type != "meta":
                continue
            t = torch.empty(p.shape, device=dev, dtype=dtype)
            if "norm" in mod_name.rsplit(".", 1)[-1] or "norm" in type(mod).__name__.lower():
                t.fill_(1.0)
            else:
                t.normal_(0.0, std, generator=g)
            setattr(mod, pname, torch.nn.Parameter(t, requires_grad=False))


def _quantize_linears(model, dev, dtype, g, std):
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, compress_statistics=True, quant_type="nf4", device="meta")
                w = torch.empty(child.out_features, child.in_features, device=dev, dtype=dtype).normal_(0.0, std,
                                                                                                      generator=g)
                q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                             module=q).to(dev)  # quantized here; the bf16 `w` is freed
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(torch.empty(child.out_features, device=dev, dtype=dtype)
                                                .normal_(0.0, std, generator=g), requires_grad=False)
                setattr(parent, child_name, q)
                del w


def build_qlora(name, dev, dtype, *, seed=0, checkpointing=True):
    """The NF4 + LoRA PEFT model of config `name` on `dev`, random weights from `seed`; SDPA attention."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fasttune.models import keep_4bit_layout

    cfg = hf_config(name)
    with torch.device("meta"):
        # no dtype argument (older transformers call it torch_dtype): every parameter is made below, in `dtype`
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    g = torch.Generator(device=dev).manual_seed(seed)
    std = INIT_STD.get(name, 0.02)
    _quantize_linears(model, dev, dtype, g, std)
    keep_4bit_layout(model)  # one 4-bit layout in every pass, as fasttune.models.load_model does
    _materialize(model, dev, dtype, g, std)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=cfg).to(dev)  # built outside the meta context
    for n, b in model.named_buffers():
        assert b.device.type != "meta", f"buffer {n} left on the meta device"
    model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets; PEFT reads it
    model.config.use_cache = False  # training; generation asks for the cache itself
    if checkpointing:  # non-reentrant, as fasttune.models.load_model (renamed in transformers 5)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    # PEFT's init: A Kaiming, B zero. Give B small random values too, so the adapter is not a no-op
    # at the first step and the providers' agreement covers the LoRA path.
    for n, p in model.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(0.0, 0.02, generator=g)
    model.train()
    return model
