"""Shared plumbing for the kernels: which path runs, output buffers, chunk sizes.

- Backend: tensors on CUDA take the Triton path, tensors on the CPU the PyTorch path.
  `FASTTUNE_BACKEND=triton|torch` or a `backend=` argument forces one. On the CPU the Triton
  path runs under Triton's interpreter, which needs `TRITON_INTERPRET=1` set before triton
  is imported (tests/conftest.py does that).
- Triton is optional at import time (it is a Linux-only dependency): without it, the kernels'
  `@triton.jit` functions are defined against a stand-in and only the torch path can run.
- `FASTTUNE_NAN_FILL=1` makes `empty()` fill new output buffers with NaN, so a row a kernel
  forgot to write shows up in the tests instead of passing with stale memory.
"""

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - platforms without triton
    HAS_TRITON = False

    class _Stub:
        @staticmethod
        def constexpr(value=None):  # stands in for the annotation and for tl.constexpr(value)
            return value

        @staticmethod
        def jit(fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _Stub()

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pick_backend(backend: str | None, device: torch.device) -> str:
    """Resolve `backend` (argument, then FASTTUNE_BACKEND, then the device) to "triton" or "torch"."""
    choice = backend or os.environ.get("FASTTUNE_BACKEND") or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r} (check FASTTUNE_BACKEND)")
    if choice == "auto":
        choice = "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    if choice == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                "backend='triton' on a CPU tensor needs Triton's interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported, or use backend='torch'"
            )
    return choice


def empty(*shape, dtype, device) -> torch.Tensor:
    """An output buffer; NaN-filled when FASTTUNE_NAN_FILL=1 so unwritten rows are caught by tests."""
    if os.environ.get("FASTTUNE_NAN_FILL") == "1" and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# Bytes of logits one chunk may hold; a chunk's rows are this budget over the bytes of a row.
# On the GPU the chunk is in the input dtype and the Triton kernel keeps its fp32 maths in
# registers. On the CPU the torch path works on fp32 rows, in place for fp32 inputs (a second
# chunk-sized temporary for other dtypes or with a softcap). Larger chunks re-read the fp32
# weight-gradient accumulator fewer times, which is what the CPU's time depends on.
DEFAULT_CHUNK_BYTES = {"cuda": 256 * 2**20, "cpu": 64 * 2**20}


def chunk_rows(vocab: int, device: torch.device, dtype: torch.dtype, chunk_size: int | None) -> int:
    """Rows per chunk: `chunk_size` if given, else FASTTUNE_CHUNK_BYTES (or the default) / row bytes."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
        return int(chunk_size)
    budget = int(os.environ.get("FASTTUNE_CHUNK_BYTES", 0)) or DEFAULT_CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES["cuda"])
    row_bytes = vocab * (torch.finfo(dtype).bits // 8 if device.type == "cuda" else 4)
    rows = max(1, budget // row_bytes)
    if rows >= 128:  # whole tiles for the matmuls
        rows -= rows % 64
    return rows


def aot_signature(fn, dtype: str, floats=(), fp32=(), i32=(), scalars=()) -> dict:
    """The signature `triton.compile` needs for `fn`, for the ahead-of-time compile check: pointers
    (names in upper case, or ending in _ptr) point at `dtype` unless listed
    in `fp32` or `i32`, or named in `scalars` (i32); `floats` are
    fp32 scalars; parameters annotated constexpr are constexprs; every other one is an i32 scalar."""
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in fp32:
            sig[p.name] = "*fp32"
        elif p.name in i32:
            sig[p.name] = "*i32"
        elif (p.name.isupper() or p.name.endswith("_ptr")) and p.name not in scalars:
            sig[p.name] = "*" + dtype
        else:
            sig[p.name] = "fp32" if p.name in floats else "i32"
    return sig


class Op:
    """A kernel entry point registered as the torch.library custom op `fasttune::<name>`, with a fake
    implementation and, if given, autograd (`setup_context(ctx, inputs, output)`, `backward(ctx, *grads)`).

    Calling it inside torch.compile goes through the custom op, so a compiled graph holds one opaque
    call and no graph break. Calling it eagerly runs the same forward, setup and backward as a
    torch.autograd.Function, which skips the custom-op dispatcher's per-call cost.
    """

    def __init__(self, name, impl, fake, setup_context=None, backward=None):
        self.op = torch.library.custom_op(f"fasttune::{name}", impl, mutates_args=())
        self.op.register_fake(fake)
        self.impl = self.eager = impl
        if backward is not None:
            self.op.register_autograd(backward, setup_context=setup_context)

            def forward(ctx, *args):  # ctx-style forward: no per-call signature binding
                out = impl(*args)
                setup_context(ctx, args, out)
                return out

            attrs = {"forward": staticmethod(forward), "backward": staticmethod(backward)}
            self.eager = type(name, (torch.autograd.Function,), attrs).apply

    def __call__(self, *args):
        return self.op(*args) if _traced(args) else self.eager(*args)

    def no_autograd(self, *args):
        """The forward alone, for a backward that calls the op again."""
        return self.op(*args) if _traced(args) else self.impl(*args)


def _traced(args) -> bool:
    """Inside torch.compile: dynamo tracing, or AOTAutograd tracing a backward (fake or functional
    tensor subclasses among the arguments)."""
    # every op's first argument is a tensor, and under AOTAutograd all of them are subclasses
    return torch.compiler.is_compiling() or type(args[0]) not in (torch.Tensor, torch.nn.Parameter)
