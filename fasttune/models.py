"""Loading the model and tokenizer a run trains: QLoRA (4-bit NF4 base + LoRA), LoRA, or full.

The model comes from a local folder, a hub id, a .gguf file (converted once: fasttune/gguf_model.py)
or `builtin:<name>` (fasttune/builtin.py); then
`fasttune.kernels.apply` makes its attention varlen and its loss fused.
"""

from pathlib import Path

import torch

from . import builtin, lora_layers, quantized_cache
from .config import ConfigError


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(name: str, dev: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _remote(load, model_cfg, what):
    """load(), with a model that needs its own code, or a folder that cannot be read, turned into one
    line naming the key."""
    try:
        return load()
    except ConfigError:
        raise
    except (ValueError, OSError, KeyError) as e:
        if "trust_remote_code" in str(e):
            raise ConfigError(f"model.path = {model_cfg.path!r} needs its own Python code to load; if you trust it, "
                              "set model.trust_remote_code = true") from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConfigError(f"model.path = {model_cfg.path!r}: cannot load its {what}: {first}") from None


def load_tokenizer(model_cfg):
    from transformers import AutoTokenizer

    tok = _remote(lambda: AutoTokenizer.from_pretrained(builtin.resolve(model_cfg.path),
                                                      trust_remote_code=model_cfg.trust_remote_code),
                  model_cfg, "tokenizer")
    if model_cfg.chat_template:
        t = model_cfg.chat_template
        tok.chat_template = Path(t).read_text() if len(t) < 4096 and Path(t).is_file() else t
    if tok.chat_template is None:
        raise ConfigError(f"the tokenizer of {model_cfg.path} has no chat template; set model.chat_template")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def final_hidden(model, **inputs):
    """(hidden, head): the final hidden states [B, T, H] of `model` (a causal LM or a PEFT model around
    one) on `inputs`, scaled as its logits are and in the head's dtype, and its Head (weight, bias,
    softcap), for the fused log-prob kernels. Inputs the base model's forward does not take (position
    ids for ALiBi models) are left out."""
    import inspect

    from fasttune.kernels.hf import head_of

    head = head_of(model)
    inputs = {"use_cache": False, **inputs}  # hidden states only: no KV cache (it warns under gradient checkpointing)
    takes = inspect.signature(head.base.forward).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in takes.values()):
        inputs = {k: v for k, v in inputs.items() if k in takes}
    return head.scaled(head.base(**inputs).last_hidden_state), head


def keep_4bit_layout(model):
    """Stop bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU kernel.

    On CPUs with AVX512-BF16, bitsandbytes rewrites a Linear4bit's weight in place at its first
    forward under no_grad in eval mode (generation, evaluation, reference log-probs). That layout
    fails on layers narrower than a quantization block (tiny test models) and rounds the scales to
    bf16, so the same weights would give other log-probs in evaluation than in training, on some
    machines and not others. One layout keeps every pass, and every machine, on the same numbers.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def unnest_absmax(model):
    """Keep the 4-bit scales of a CPU model dequantized, in fp32.

    With double quantization (bnb_4bit_use_double_quant) every 64-weight block's scale is itself stored
    in 8 bits, and bitsandbytes dequantizes all of a layer's scales again on each use: on the CPU each
    forward, recompute and backward of every 4-bit layer, 3 % of a QLoRA step on SmolLM2. The base is
    frozen, so the scales are computed once here, exactly as each use computed them (the same values,
    the same results); the cost is 3 bytes per 64 weights (5 MB for SmolLM2). On a GPU the nested
    scales stay: there the memory matters more and the extra kernel is cheap."""
    from bitsandbytes.functional import dequantize_blockwise

    for module in model.modules():
        qs = getattr(getattr(module, "weight", None), "quant_state", None)
        if qs is None or not getattr(qs, "nested", False) or qs.absmax.device.type != "cpu":
            continue
        absmax = dequantize_blockwise(qs.absmax, qs.state2)
        absmax += qs.offset
        qs.absmax, qs.nested, qs.state2, qs.offset = absmax.float(), False, None, None


def load_model(cfg, dev=None, *, trainable=True, lora=True, quiet=False):
    """The model of `cfg.model` and `cfg.lora` on `dev`, with fasttune's kernels applied. `lora=False`:
    the base alone (4-bit if the run is QLoRA), as inference compares against."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    import fasttune.kernels
    from fasttune.kernels.hf import unsupported

    dev = dev or device()
    m = cfg.model
    dtype = compute_dtype(m.compute_dtype, dev)
    path = builtin.resolve(m.path)
    kwargs = {"dtype": dtype}
    quantized = m.finetune == "lora" and m.load_in_4bit
    if quantized:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=m.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=m.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}

    def load_from(folder, quantize=True):
        kw = kwargs if quantize else {k: v for k, v in kwargs.items() if k != "quantization_config"}
        try:
            return _remote(lambda: transformers.AutoModelForCausalLM.from_pretrained(
                folder, trust_remote_code=m.trust_remote_code, **kw), m, "model")
        except OSError as e:
            raise ConfigError(f"model.path = {m.path!r} could not be loaded: {e}") from None

    if quantized and m.cache_4bit and not m.trust_remote_code:
        settings = {"quant_type": m.bnb_4bit_quant_type, "double_quant": m.bnb_4bit_use_double_quant,
                    "dtype": str(dtype)}
        model = quantized_cache.load(path, settings, load_from)
    else:
        model = load_from(path)
    if not quantized:
        model.to(dev)
    elif dev.type == "cpu":
        keep_4bit_layout(model)
        unnest_absmax(model)
    if dev.type == "cpu":
        from .memory import release_checkpoint_pages

        release_checkpoint_pages(model)  # the loaded file's pages would stay resident for the whole run
    if cfg.train.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if m.finetune == "lora" and lora:
        if m.adapter:
            model = PeftModel.from_pretrained(model, m.adapter, is_trainable=trainable)
        else:
            lora = cfg.lora
            model = get_peft_model(model, LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                use_rslora=lora.rslora, task_type="CAUSAL_LM",
            ))
        lora_layers.apply(model)
    why = unsupported(model)
    if why is not None:
        if getattr(cfg.data, "packing", False):
            raise ConfigError(f"model.path = {m.path!r}: {why}, so fasttune's varlen attention cannot keep packed "
                              "samples apart; set data.packing = false to train it padded")
        if not quiet:
            print(f"fasttune: {why}; training it with its own attention and loss (padded batches)", flush=True)
        return model
    fasttune.kernels.apply(model)
    return model
