"""Memory a loaded model should not keep: the checkpoint file's pages.

transformers loads safetensors through a memory map and, when a tensor already has the compute dtype
and device, keeps the mapped tensor itself as the parameter (on the CPU: the embeddings, the norms,
the head). One such tensor keeps the whole file mapped, and every page read while loading (the
weights that were quantized to 4 bits included) stays in the process's resident memory for the whole
run: 435 MB of SmolLM2-135M's 538 MB fp32 file, a third of a QLoRA run's peak. Copying those few
tensors into memory of their own lets the map, and its pages, go.
"""

import torch


def release_checkpoint_pages(model) -> int:
    """Give every CPU parameter and buffer of `model` that is not 4-bit its own memory (a copy), so no
    tensor points into the checkpoint's memory map; returns the bytes copied."""
    copied = 0
    seen = set()
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for t in store.values():
                if t is None or id(t) in seen or t.device.type != "cpu" or t.dtype == torch.uint8:
                    continue  # uint8: bitsandbytes' packed 4-bit weights, made by quantization
                seen.add(id(t))
                t.data = t.data.clone()
                copied += t.numel() * t.element_size()
    return copied
