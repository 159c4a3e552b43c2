"""fasttune.kernels: Triton kernels for post-training, importable without the trainer.

Depends on torch and triton only: importing it never imports transformers, peft or bitsandbytes.
Tensors on CUDA take the Triton path; tensors on the CPU a chunked PyTorch path with the same
memory bound. FASTTUNE_BACKEND=triton|torch (or backend=...) forces one.

This is the fasttune-kernels distribution (kernels/pyproject.toml, `pip install ./kernels`): `fasttune`
is a namespace package shared with the trainer's distribution, so the import reads the same with or
without the trainer (kernels/README.md says why).
"""

from .attention import varlen_attention
from .cross_entropy import CEStats, cross_entropy, fused_linear_cross_entropy
from .dpo import DPOStats, dpo_loss
from .grpo import GRPOStats, grpo_loss
from .kto import KTOStats, kto_loss
from .logprobs import linear_logprobs


def apply(model, **kwargs):
    """Make a transformers causal LM use fasttune's attention and fused loss (see kernels/hf.py)."""
    from .hf import apply as _apply

    return _apply(model, **kwargs)


def revert(model):
    """Undo `apply`."""
    from .hf import revert as _revert

    return _revert(model)


def applied(model, **kwargs):
    """Context manager: fasttune's kernels inside the block only."""
    from .hf import applied as _applied

    return _applied(model, **kwargs)

__all__ = [
    "apply", "applied", "revert",
    "CEStats", "DPOStats", "GRPOStats", "KTOStats",
    "cross_entropy", "dpo_loss", "fused_linear_cross_entropy", "grpo_loss", "kto_loss", "linear_logprobs",
    "varlen_attention",
]
