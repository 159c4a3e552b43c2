"""fasttune.kernels: Triton kernels for post-training, importable without the trainer.

Depends on torch and triton only: importing it never imports transformers, peft or bitsandbytes.
Tensors on CUDA take the Triton path; tensors on the CPU a chunked PyTorch path with the same
memory bound. FASTTUNE_BACKEND=triton|torch (or backend=...) forces one.
"""

from .attention import varlen_attention
from .cross_entropy import CEStats, cross_entropy, fused_linear_cross_entropy
from .dpo import DPOStats, dpo_loss
from .grpo import GRPOStats, grpo_loss
from .logprobs import linear_logprobs

__all__ = [
    "CEStats", "DPOStats", "GRPOStats",
    "cross_entropy", "dpo_loss", "fused_linear_cross_entropy", "grpo_loss", "linear_logprobs", "varlen_attention",
]
