"""What each benchmark runs: `make_case(kernel, provider, shape, dtype)` returns a callable that
does one forward + backward on inputs it built, and waits for the device.

Providers:
  fasttune       fasttune.kernels
  naive          the plain PyTorch a user would write (full logits, upcast to fp32 as HF models do)
  torch_chunked  torch's own F.linear_cross_entropy with LinearCrossEntropyOptions()
  torch_compile  torch.compile of the naive function
  liger          Liger-Kernel's fused linear cross-entropy (CUDA only)
  cce            cut-cross-entropy (CUDA only)
  matmul_floor   only the three matmuls of the head (logits, dh, dW): the time floor, not a loss
"""

import torch
import torch.nn.functional as F

from harness import Unavailable, device, sync

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cuda_only(name):
    if not torch.cuda.is_available():
        raise Unavailable(f"{name} runs on CUDA only")


def _flce_inputs(shape, dtype):
    g = torch.Generator().manual_seed(0)
    N, H, V = shape["N"], shape["H"], shape["V"]
    h = torch.randn(N, H, generator=g).to(device=device(), dtype=dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H**0.5).to(device=device(), dtype=dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g).to(device())
    return h, w, y


def _flce_loss(provider):
    """The loss function of one provider: (h, w, y) -> scalar."""
    if provider == "fasttune":
        from fasttune.kernels import fused_linear_cross_entropy

        return fused_linear_cross_entropy
    if provider == "naive":
        return lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y)
    if provider == "torch_chunked":
        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy with options")
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda h, w, y: F.linear_cross_entropy(h, w, y, options=opts)
    if provider == "torch_compile":
        return torch.compile(lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y))
    if provider == "liger":
        _cuda_only("Liger-Kernel")
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        except ImportError as e:
            raise Unavailable(f"liger-kernel not installed ({e})")
        return lambda h, w, y: liger_fused_linear_cross_entropy(h, w, y)
    if provider == "cce":
        _cuda_only("cut-cross-entropy")
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError as e:
            raise Unavailable(f"cut-cross-entropy not installed ({e})")
        return lambda h, w, y: linear_cross_entropy(h, w, y)
    raise Unavailable(f"no provider {provider!r} for fused_linear_cross_entropy")


def _flce_case(provider, shape, dtype):
    h, w, y = _flce_inputs(shape, DTYPES[dtype])
    if provider == "matmul_floor":
        _cuda_only("the matmul floor")  # on the CPU the naive path is the floor's fair stand-in
        g = torch.randn(h.shape[0], w.shape[0], device=h.device, dtype=h.dtype)

        def run():
            with torch.no_grad():
                torch.mm(h, w.t())
                torch.mm(g, w)
                torch.mm(g.t(), h)
            sync()

        return run
    loss_fn = _flce_loss(provider)

    def run():
        loss = loss_fn(h, w, y)
        loss.backward()
        h.grad = w.grad = None
        sync()

    return run


CASES = {"fused_linear_cross_entropy": _flce_case}


def make_case(kernel, provider, shape, dtype):
    if kernel not in CASES:
        raise KeyError(f"unknown benchmark kernel {kernel!r}; known: {sorted(CASES)}")
    return CASES[kernel](provider, shape, dtype)
