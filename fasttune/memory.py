"""Memory a loaded model should not keep: the checkpoint file's pages.

transformers loads safetensors through a memory map and, when a tensor already has the compute dtype
and device, keeps the mapped tensor itself as the parameter (on the CPU: the embeddings, the norms,
the head). One such tensor keeps the whole file mapped, and every page read while loading (the
weights that were quantized to 4 bits included) stays in the process's resident memory for the whole
run: 435 MB of SmolLM2-135M's 538 MB fp32 file, a third of a QLoRA run's peak. Copying those few
tensors into memory of their own lets the map, and its pages, go. A base read from fasttune's 4-bit
copy (fasttune/quantized_cache.py) is mapped the same way, its packed weights and their scales
included: copied too, the copy's 161 MB of pages go and 53 MB of weights stay.
"""

import torch


def release_checkpoint_pages(model) -> int:
    """Give every CPU parameter and buffer of `model`, and the scales of its 4-bit weights, memory of
    their own (a copy), so no tensor points into the checkpoint's memory map; returns the bytes copied."""
    copied = 0
    seen = set()  # ids of the tensors (parameters, buffers, scales) already given their own memory

    def own(t):
        nonlocal copied
        if t is None or id(t) in seen or t.device.type != "cpu":
            return t
        copied += t.numel() * t.element_size()
        t = t.clone()
        seen.add(id(t))
        return t

    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for t in store.values():
                if t is None or id(t) in seen or t.device.type != "cpu":
                    continue
                seen.add(id(t))
                t.data = t.data.clone()
                copied += t.numel() * t.element_size()
                qs = getattr(t, "quant_state", None)  # bitsandbytes' 4-bit weight: its scales too
                for state in (qs, getattr(qs, "state2", None)):
                    if state is not None:
                        state.absmax, state.code = own(state.absmax), own(state.code)
                if qs is not None and isinstance(qs.offset, torch.Tensor):
                    qs.offset = own(qs.offset)
    return copied
