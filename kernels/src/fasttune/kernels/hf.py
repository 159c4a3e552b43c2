"""Make a Hugging Face causal LM use fasttune's kernels: `apply(model)`, `revert(model)`, `applied(model)`.

- Attention: `varlen_attention` is registered with transformers' AttentionInterface (and a mask
  function with AttentionMaskInterface) as "fasttune" and selected. It finds the samples of each
  row from `cu_seq_lens_q` (transformers' padding-free path), else from `position_ids` restarting
  at 0 and the padding mask, so a packed row never attends across samples and an ordinary batch
  gets ordinary causal attention. Boundaries are found on the device without a host sync.
  Calls it cannot take (a KV cache during generation, attention dropout) go to a plain masked
  SDPA with the same semantics.
  `segment_ids` ([B, S] int, passed to the model's forward with `cu_seq_lens_q`) share a prompt
  within a sample (see varlen_attention's `segments`); `SEGMENTS_SEEN` records the attention modules
  that received them.
- Loss: when `labels` (or `shift_labels`) are passed, the CausalLM's forward computes the loss with
  `fused_linear_cross_entropy` from the last hidden states and returns `logits=None`, as
  Liger-Kernel does. `num_items_in_batch` (from the HF Trainer) is honoured, and so is Gemma 2's
  final logit softcap. `token_scaling` and `class_weights` passed to the forward go to the loss (the
  SFT loss family: DFT and class weights).
Works on PEFT models (the LoRA-wrapped base model is patched) and on bitsandbytes 4-bit models.
transformers is imported only when these functions are called.
"""

import contextlib
import types
from dataclasses import dataclass
import warnings

import torch
import torch.nn.functional as F

from .attention import varlen_attention
from .cross_entropy import fused_linear_cross_entropy

NAME = "fasttune"
_registered = False


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


def _mask_function(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask=None, **kwargs):
    """Hand the 2D padding mask through untouched (no `.all()` check: that would sync)."""
    return None if attention_mask is None else attention_mask[:, -kv_length:]


def _cu_seqlens(B, S, position_ids, padding_mask, device):
    """Sample boundaries of the flattened [B·S] tokens: a sample starts at each row's start, where
    position_ids return to 0, and where the padding mask switches. Fixed size B·S + 1 on CUDA
    (searchsorted, no sync; trailing empty samples cost nothing); exact on the CPU. Also which
    samples are real tokens (None without a padding mask): padding samples cost the kernel no work."""
    starts = torch.zeros(B, S, dtype=torch.bool, device=device)
    starts[:, 0] = True
    if position_ids is not None and position_ids.shape[-1] == S:
        starts |= position_ids.to(device).expand(B, S) == 0
    if padding_mask is not None:
        pm = padding_mask.to(device=device, dtype=torch.bool)
        starts[:, 1:] |= pm[:, 1:] != pm[:, :-1]
    flat = starts.reshape(-1)
    if device.type == "cpu" and not torch.compiler.is_compiling():  # a compiled graph takes the fixed size
        idx = flat.nonzero().squeeze(1)
        cu = torch.cat([idx, torch.tensor([B * S], device=device)]).to(torch.int32)
    else:
        sample = torch.cumsum(flat, 0, dtype=torch.int32) - 1  # sample index of each token
        grid = torch.arange(B * S + 1, device=device, dtype=torch.int32)
        cu = torch.searchsorted(sample, grid, out_int32=True)  # first token of sample j (T if none)
    if padding_mask is None:
        return cu, None
    real = padding_mask.to(device=device, dtype=torch.bool).reshape(-1)
    return cu, real[cu[:-1].clamp(max=B * S - 1).long()]  # a sample is real if its first token is


def _fallback(query, key, value, mask, scaling, softcap, window, dropout):
    """Masked attention for calls varlen cannot take: causal with the cache offset, padding, window.
    A 4D `mask` (bool, or additive float) given by the caller is used as it is."""
    B, Hq, S, D = query.shape
    Sk = key.shape[2]
    group = Hq // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    if mask is not None and mask.dim() == 4:
        ok = mask[..., -Sk:]
        if ok.dtype != torch.bool:
            ok = ok.to(query.dtype)
    else:
        i = torch.arange(S, device=query.device)[:, None] + (Sk - S)
        j = torch.arange(Sk, device=query.device)[None, :]
        ok = j <= i
        if window is not None:
            ok = ok & (i - j < window)
        ok = ok[None, None].expand(B, 1, S, Sk)
        if mask is not None:
            ok = ok & mask[:, None, None, -Sk:].to(torch.bool)
    if softcap is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=ok, dropout_p=dropout, scale=scaling)
    else:
        scores = softcap * torch.tanh((query @ key.transpose(-1, -2)) * scaling / softcap)
        scores = scores.masked_fill(~ok, float("-inf")) if ok.dtype == torch.bool else scores + ok
        probs = scores.softmax(-1).to(value.dtype)
        out = F.dropout(probs, dropout) @ value
    return out.transpose(1, 2).contiguous()


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
               softcap=None, **kwargs):
    """transformers attention function: query [B, Hq, S, D], key/value [B, Hkv, Sk, D] -> [B, S, Hq, D]."""
    B, Hq, S, D = query.shape
    scaling = D**-0.5 if scaling is None else scaling
    # Under autocast q, k (after RoPE) and v can arrive in different dtypes: use autocast's.
    dev = query.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else query.dtype
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    padding_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    segments = kwargs.get("segment_ids")
    if key.shape[2] != S or (dropout and module.training) or (attention_mask is not None and padding_mask is None):
        if segments is not None:
            raise ValueError("segment_ids (prefix sharing) need the packed path: no KV cache, no attention "
                             "dropout, no 4D mask")
        return _fallback(query, key, value, attention_mask, scaling, softcap, sliding_window,
                         dropout if module.training else 0.0), None
    cu, real = kwargs.get("cu_seq_lens_q"), None
    if cu is None:
        cu, real = _cu_seqlens(B, S, kwargs.get("position_ids"), padding_mask, query.device)
    Dv = value.shape[-1]
    if Dv != D:  # MLA (DeepSeek-V3): values narrower than queries; pad them, as flash-attention users do
        value = F.pad(value, (0, D - Dv))
    q = query.transpose(1, 2).reshape(B * S, Hq, D)
    k = key.transpose(1, 2).reshape(B * S, key.shape[1], D)
    v = value.transpose(1, 2).reshape(B * S, value.shape[1], D)
    if segments is not None:
        SEGMENTS_SEEN.add(id(module))
        segments = segments.reshape(B * S)
    o = varlen_attention(q, k, v, cu, causal=True, softmax_scale=scaling, softcap=softcap, window=sliding_window,
                         sample_mask=real, segments=segments)
    return o.view(B, S, Hq, D)[..., :Dv], None


# ids of the attention modules that were called with `segment_ids`: how a caller checks that a model
# hands the keyword down to its attention (a model that drops it would let segments see each other)
SEGMENTS_SEEN: set[int] = set()


def _register():
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(NAME, _attention)
        AttentionMaskInterface.register(NAME, _mask_function)
        _registered = True


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def _causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                       inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    """The CausalLM forward with the fused loss; without labels it is the model's own forward."""
    shift_labels = kwargs.pop("shift_labels", None)
    if past_key_values is not None:  # newer transformers name the cache `cache`; pass on only what was given
        kwargs["past_key_values"] = past_key_values
    if labels is None and shift_labels is None:
        return self._fasttune_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      inputs_embeds=inputs_embeds, use_cache=use_cache, logits_to_keep=logits_to_keep,
                                      **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = kwargs.pop("num_items_in_batch", None)
    options = {k: kwargs.pop(k) for k in ("token_scaling", "class_weights") if k in kwargs}  # the SFT loss family
    cfg = self.config
    router = kwargs.pop("output_router_logits", getattr(cfg, "output_router_logits", False))
    if router:
        kwargs["output_router_logits"] = True
    # a loss keeps no KV cache unless asked (config.use_cache would make one, and warn under gradient checkpointing)
    out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          inputs_embeds=inputs_embeds, use_cache=bool(use_cache), **kwargs)
    lm = head_of(self)
    hidden = lm.scaled(out.last_hidden_state)
    if shift_labels is None:  # as transformers' ForCausalLMLoss: token t predicts label t + 1
        shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
    loss = fused_linear_cross_entropy(
        hidden, lm.weight, shift_labels, bias=lm.bias,  # host labels: no sync
        num_items=num_items, softcap=lm.softcap, **options,
    )
    aux = None
    if router and getattr(out, "router_logits", None) is not None:  # MoE load balancing, as the model adds it
        import sys

        balance = getattr(sys.modules[type(self).__module__], "load_balancing_loss_func")
        aux = balance(out.router_logits, self.num_experts, self.num_experts_per_tok, attention_mask)
        loss = loss + self.router_aux_loss_coef * aux.to(loss.device)
    # the cache under the name this transformers gives it (`cache` since 5.x; the old name warns there)
    cache = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    fields = {"loss": loss, "logits": None, cache: getattr(out, cache, None), "hidden_states": out.hidden_states,
              "attentions": out.attentions}
    if aux is not None:
        from transformers.modeling_outputs import MoeCausalLMOutputWithPast

        return MoeCausalLMOutputWithPast(aux_loss=aux, **fields)
    return CausalLMOutputWithPast(**fields)


@dataclass
class Head:
    """What turns a causal LM's final hidden states into its logits, for the fused kernels:
    logits = softcap(scale * hidden @ weight.T + bias). `base` gives the final hidden states."""

    base: torch.nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    softcap: float | None

    def scaled(self, hidden):
        """hidden × scale, in the head's dtype: logit scaling is linear, so it goes on the hidden states."""
        hidden = hidden * self.scale if self.scale != 1.0 else hidden
        return hidden.to(self.weight.dtype)


def head_of(model) -> Head:
    """The Head of a transformers causal LM, or of a PEFT model around one. Cohere multiplies the
    logits by `logit_scale`, Granite divides them by `logits_scaling`; Gemma 2 softcaps them last."""
    lm = _causal_lm(model)
    cfg = lm.config
    base = lm.base_model if lm.base_model is not lm else lm.get_decoder()
    head = lm.get_output_embeddings()
    if base is lm or not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{type(lm).__name__} has no base model with a linear output head")
    scale = getattr(cfg, "logit_scale", None) or 1.0
    if getattr(cfg, "logits_scaling", None):
        scale = scale / cfg.logits_scaling
    return Head(base, head.weight, head.bias, float(scale), getattr(cfg, "final_logit_softcapping", None))


ATTENTION_LAYERS = {"full_attention", "sliding_attention"}  # config.layer_types the kernel computes


def unsupported(model) -> str | None:
    """Why `apply` cannot handle this model, or None. It handles a causal LM whose attention goes
    through transformers' attention interface and whose head is a plain Linear over a base model."""
    lm = _causal_lm(model)
    cfg = getattr(lm, "config", None)
    name = type(lm).__name__
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return f"{name} is not a decoder-only causal LM"
    if not getattr(type(lm), "_supports_attention_backend", False):
        return f"{name} does not route its attention through transformers' attention interface"
    if getattr(lm, "base_model", lm) is lm:
        return f"{name} has no base model under its head"
    # token mixing other than softmax attention (LFM2's convolutions, linear attention, Mamba) would
    # carry state across packed samples; attention sinks (GPT-OSS) change the softmax itself
    others = set(getattr(cfg, "layer_types", None) or ()) - ATTENTION_LAYERS
    if others:
        return f"{name} has {', '.join(sorted(others))} layers besides attention"
    if any(getattr(m, "sinks", None) is not None for m in lm.modules()):
        return f"{name} uses attention sinks"
    return None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _causal_lm(model):
    """The transformers CausalLM inside `model` (itself, or the base model of a PEFT model)."""
    inner = model
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def apply(model, *, attention: bool = True, loss: bool = True):
    """Make a transformers causal LM (or a PEFT model around one) use fasttune's kernels.

    Any causal LM whose attention goes through transformers' attention interface (Llama, Mistral,
    Qwen2/2.5/3, Qwen3-MoE, Gemma 2/3, Phi-3, Cohere, Granite, ...); another model gets one warning
    and is returned unchanged (see `unsupported`). Returns `model`. Undo with `revert(model)`, or
    scope with `applied`.
    """
    lm = _causal_lm(model)
    why = unsupported(model)
    if why is not None:
        warnings.warn(f"fasttune.kernels.apply: not supported: {why}; the model is left as it was", stacklevel=2)
        return model
    if getattr(lm, "_fasttune_state", None) is not None:
        return model
    state = {"attn": lm.config._attn_implementation, "loss": False}
    if attention:
        _register()
        lm.set_attn_implementation(NAME)
    if loss:
        head = lm.get_output_embeddings()
        if type(head) is torch.nn.Linear:
            lm._fasttune_forward = lm.forward
            lm.forward = types.MethodType(_causal_lm_forward, lm)
            state["loss"] = True
        else:
            warnings.warn(f"fasttune.kernels.apply: lm_head is a {type(head).__name__}, not a plain Linear (is it "
                          "adapted by LoRA or quantized?); the loss is left to the model", stacklevel=2)
    lm._fasttune_state = state
    return model


def varlen_attention_applied(model) -> bool:
    """Does `model` attend with fasttune's varlen attention (after `apply`)? Then packed rows,
    `cu_seq_lens_q` and `segment_ids` are honoured."""
    return _causal_lm(model).config._attn_implementation == NAME


def fused_loss(model) -> bool:
    """Does `model` compute its loss with fasttune's fused head (after `apply`)?"""
    state = getattr(_causal_lm(model), "_fasttune_state", None)
    return bool(state and state["loss"])


def revert(model):
    """Undo `apply`: the model's own attention implementation and forward come back."""
    lm = _causal_lm(model)
    state = getattr(lm, "_fasttune_state", None)
    if state is None:
        return model
    if lm.config._attn_implementation == NAME:
        lm.set_attn_implementation(state["attn"])
    if state["loss"]:
        del lm.forward, lm._fasttune_forward
    lm._fasttune_state = None
    return model


@contextlib.contextmanager
def applied(model, **kwargs):
    """`with applied(model): ...` uses fasttune's kernels inside the block only."""
    apply(model, **kwargs)
    try:
        yield model
    finally:
        revert(model)
