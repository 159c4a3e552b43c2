"""Each LoRA layer as one autograd node: y = x Wᵀ + s·(x Aᵀ) Bᵀ (+ the base's bias).

PEFT runs a LoRA layer as six operations: the base layer (for QLoRA bitsandbytes' 4-bit matmul), a
defensive copy of its output, x Aᵀ, (x Aᵀ) Bᵀ, the scaling and the sum, each a pass over the layer's
output and a node that autograd keeps and walks back through. Here the adapter's product is accumulated
into the base's output by one matmul (`addmm_`, the scaling as its alpha), and the backward is written
out:

    dx = dy W + s·(dy B) A       (the second product accumulated into the first)
    dB = s·dyᵀ (x Aᵀ)             (x Aᵀ, [tokens, r], kept from the forward)
    dA = s·(dy B)ᵀ x

W is the frozen base weight; a 4-bit one is dequantized again in the backward, as bitsandbytes does (it
is never kept). With lora dropout, A and B see dropout(x) and the base sees x, as in PEFT.

Only `forward` of each PEFT LoRA layer is replaced: parameters, adapters, saving and merging stay PEFT's.
A call runs here when it computes what PEFT would: one active plain LoRA adapter (no DoRA or other
variant), not merged, adapters enabled, no autocast, the input in the adapter's dtype and the base's
compute dtype, a frozen base; anything else (several adapters, mixed-batch `adapter_names`, a bf16
model under autocast on a GPU) runs PEFT's own forward. On a GPU it is used only with gradients on, so
that decoding keeps bitsandbytes' 4-bit matrix-vector kernels. With the adapters off (GRPO's
reference), a CPU 4-bit base without gradients is dequantized into the same workspace as below. The
result equals PEFT's up to float rounding (tests/test_lora_layers.py).
"""

import types

import torch
from torch import nn


def _dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight [out, in] in `dtype`. A 4-bit one is dequantized: on the CPU into one
    buffer that every layer reuses (valid until the next call), elsewhere into a new tensor."""
    w = base.weight
    qs = getattr(w, "quant_state", None)
    if qs is None:
        return w
    if w.device.type == "cpu":
        out = _dequantize_into_workspace(w, dtype)
        if out is not None:
            return out
    import bitsandbytes.functional as bf

    return bf.dequantize_4bit(w.data, qs).to(dtype)


# The CPU workspace. bitsandbytes dequantizes each use into a new tensor (several MB per layer, three
# times per layer and step under gradient checkpointing); glibc keeps such freed blocks and hands them
# out again poorly, so a QLoRA step grew the process by ~300 MB (SmolLM2) and paid page faults for it.
# One buffer, reused, costs the largest layer's weight once. bitsandbytes has no CPU kernel that writes
# into a given tensor, so its CPU library's dequantization function is called directly; it is checked
# once against bitsandbytes' own op on a probe weight, and any difference (another version's signature,
# say) turns the workspace off for the run.
_workspace: dict[torch.dtype, torch.Tensor] = {}
_workspace_ok: bool | None = None


def _c_dequantize(packed, qs, out) -> bool:
    """bitsandbytes' CPU dequantization of `packed` (4-bit, qs's layout) into `out`; False if unavailable."""
    import ctypes

    try:
        from bitsandbytes.cextension import lib
        from bitsandbytes.functional import get_ptr
    except ImportError:
        return False
    # fp32 only (the CPU's compute dtype): the one the probe checks, and no rounding question against
    # bitsandbytes' dequantize-then-cast
    fn = getattr(lib, f"cdequantize_blockwise_cpu_{qs.quant_type}_fp32", None) if out.dtype == torch.float32 else None
    m, n = qs.shape
    if (fn is None or qs.nested or qs.absmax.dtype != torch.float32 or qs.blocksize >= 2048 or n % 2
            or not packed.is_contiguous() or not qs.absmax.is_contiguous()):
        return False
    fn(get_ptr(packed.view(torch.uint8)), get_ptr(qs.absmax), get_ptr(out), ctypes.c_longlong(qs.blocksize),
       ctypes.c_longlong(m), ctypes.c_longlong(n))
    return True


def dequantize_into(weight, out: torch.Tensor) -> bool:
    """A CPU 4-bit weight (bitsandbytes Params4bit) dequantized into `out` ([out, in], contiguous), as
    bitsandbytes' op would; False (nothing written) where the direct call does not apply."""
    global _workspace_ok
    if _workspace_ok is None:
        _workspace_ok = _probe_workspace()
    qs = getattr(weight, "quant_state", None)
    if (not _workspace_ok or qs is None or weight.device.type != "cpu" or len(qs.shape) != 2
            or tuple(out.shape) != tuple(qs.shape) or not out.is_contiguous()):
        return False
    return _c_dequantize(weight.data, qs, out)


def _dequantize_into_workspace(weight, dtype) -> torch.Tensor | None:
    numel = weight.quant_state.shape[0] * weight.quant_state.shape[1]
    buf = _workspace.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = _workspace[dtype] = torch.empty(numel, dtype=dtype)
    out = buf[:numel].view(weight.quant_state.shape)
    return out if dequantize_into(weight, out) else None


def _probe_workspace() -> bool:
    """Does the direct call give bitsandbytes' own dequantization, bit for bit?"""
    try:
        import bitsandbytes.functional as bf

        g = torch.Generator().manual_seed(0)
        w = torch.randn(48, 128, generator=g)
        ok = True
        for quant_type in ("nf4", "fp4"):
            packed, qs = bf.quantize_4bit(w, blocksize=64, quant_type=quant_type)
            out = torch.full(tuple(qs.shape), float("nan"))
            ok = ok and _c_dequantize(packed, qs, out) and torch.equal(out, bf.dequantize_4bit(packed, qs))
        return bool(ok)
    except Exception:  # noqa: BLE001 - any failure means: use bitsandbytes' allocating op
        return False


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_drop, A, B, base, scaling):
        n_in = x.shape[-1]
        x2 = x.reshape(-1, n_in)
        xa = (x2 if x_drop is None else x_drop.reshape(-1, n_in)) @ A.t()  # [N, r]
        bias = base.bias
        y = torch.nn.functional.linear(x2, _dense_weight(base, x.dtype), None if bias is None else bias.to(x.dtype))
        y.addmm_(xa, B.t(), alpha=scaling)
        ctx.save_for_backward(x, x_drop, xa, A, B)
        ctx.base, ctx.scaling = base, scaling
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, x_drop, xa, A, B = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_drop, need_A, need_B = ctx.needs_input_grad[:4]
        n_in = x.shape[-1]
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = d_drop = dA = dB = None
        dyb = dy2 @ B if (need_x or need_drop or need_A) else None  # [N, r]
        if need_x:
            dx = dy2 @ _dense_weight(ctx.base, dy.dtype)
            if x_drop is None:
                dx.addmm_(dyb, A, alpha=s)
            dx = dx.view(x.shape)
        if need_drop:
            d_drop = torch.mm(dyb, A).mul_(s).view(x_drop.shape)
        if need_A:
            dA = torch.mm(dyb.t(), (x if x_drop is None else x_drop).reshape(-1, n_in)).mul_(s)
        if need_B:
            dB = torch.mm(dy2.t(), xa).mul_(s)
        return dx, d_drop, dA, dB, None, None


def _fusable(layer, x) -> str | None:
    """The active adapter's name if this call may run as one node (see the module's docstring), else None."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if (name not in layer.lora_A or name in getattr(layer, "lora_variant", {})
            or getattr(layer, "use_dora", {}).get(name)):
        return None
    dev = x.device.type
    if torch.is_autocast_enabled(dev) or (dev != "cpu" and not torch.is_grad_enabled()):
        return None
    base = layer.base_layer
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    w = base.weight
    if not (x.dtype == A.dtype == B.dtype) or w.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    qs = getattr(w, "quant_state", None)
    if qs is not None:  # bitsandbytes 4-bit: computes in its compute dtype, in the usual layout only
        if getattr(qs, "packing_format_for_cpu", False) or getattr(base, "compute_dtype", None) not in (None, x.dtype):
            return None
    elif type(base) is not nn.Linear or w.dtype != x.dtype:
        return None
    return name


def _base_alone(layer, x) -> bool:
    """Adapters off (a reference forward, say) on a CPU 4-bit base without gradients: the base's product
    through the workspace. (With gradients autograd would keep the workspace, which the next layer
    overwrites; those calls stay bitsandbytes'.)"""
    base = layer.base_layer
    qs = getattr(base.weight, "quant_state", None)
    return (layer.disable_adapters and not layer.merged and x.device.type == "cpu" and not torch.is_grad_enabled()
            and qs is not None and not getattr(qs, "packing_format_for_cpu", False)
            and getattr(base, "compute_dtype", None) in (None, x.dtype) and not torch.is_autocast_enabled("cpu"))


def _forward(self, x, *args, **kwargs):
    if not (args or kwargs) and _base_alone(self, x):
        bias = self.base_layer.bias
        return torch.nn.functional.linear(x, _dense_weight(self.base_layer, x.dtype),
                                          None if bias is None else bias.to(x.dtype))
    name = None if args or kwargs else _fusable(self, x)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    drop = self.lora_dropout[name]
    x_drop = drop(x) if isinstance(drop, nn.Dropout) and drop.p > 0 and self.training else None
    return _LoRALinear.apply(x, x_drop, self.lora_A[name].weight, self.lora_B[name].weight, self.base_layer,
                             self.scaling[name])


def _lora_layer_types():
    from peft.tuners.lora import layer

    types_ = [layer.Linear]
    try:
        from peft.tuners.lora import bnb

        types_.append(bnb.Linear4bit)
    except (ImportError, AttributeError):  # PEFT without bitsandbytes support
        pass
    return tuple(types_)


def apply(model: nn.Module) -> int:
    """Run `model`'s LoRA linear layers (PEFT's, plain or over a bitsandbytes 4-bit base) as one autograd
    node each where they can (see above). Idempotent; returns how many layers it covers."""
    kinds = _lora_layer_types()
    n = 0
    for module in model.modules():
        if type(module) in kinds:
            module.forward = types.MethodType(_forward, module)
            n += 1
    return n


def revert(model: nn.Module) -> None:
    """PEFT's own forward again on every layer `apply` covered."""
    for module in model.modules():
        f = module.__dict__.get("forward")
        if isinstance(f, types.MethodType) and f.__func__ is _forward:
            del module.forward
