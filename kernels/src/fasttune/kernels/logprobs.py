"""Per-token log-probabilities of the labels under a linear head: the primitive of DPO and GRPO.

    linear_logprobs(hidden, weight, labels)[t] = log softmax(hidden_t @ weight.T / T)[labels_t]

without building the [N, V] logits. It is the chunked head of cross_entropy.py with the
per-token loss -log p(label) (weight 1 on trained tokens, 0 on ignored ones), negated:

- forward: one matmul per chunk and a row pass for lse (and the entropy);
- backward: takes any upstream gradient per token. With a frozen head (LoRA) dh per token is
  formed in the forward and the backward scales its rows, so the whole op costs 2 matmuls;
  with a trainable head the backward recomputes each chunk (4 matmuls).
- Under torch.no_grad() no gradient work is done: the cheap way to get reference log-probs.

Ignored tokens get log-prob 0 and entropy 0; with labels on the host they cost no matmul work.
"""

import torch

from ._backend import chunk_rows, pick_backend
from .cross_entropy import HeadOptions, check_args, check_head, head_op, prepare_head


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
):
    """log softmax(hidden @ weight.T / temperature)[labels] per token, fp32, in labels' shape.

    hidden [..., H], weight [V, H], labels [...] already shifted. `softcap` (the model's final
    logit softcap, Gemma 2) is applied before the temperature. With return_entropy, also
    returns each token's entropy of softmax(logits / temperature) (no gradient flows through it).
    """
    check_head(hidden, weight, bias)
    labels_shape = labels.shape
    N = hidden.numel() // hidden.shape[-1]
    check_args(labels, N, None, "none", 0.0, 0.0, softcap, "hidden")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    h, labels, weights, select = prepare_head(hidden, weight, labels, ignore_index=ignore_index, loss_mask=None)
    o = HeadOptions(pick_backend(backend, h.device), chunk_rows(weight.shape[0], h.device, h.dtype, chunk_size),
              softcap=softcap, inv_temp=1.0 / temperature, entropy=return_entropy)
    one = torch.ones((), device=h.device)
    b = None if bias is None else bias.to(h.dtype)
    nll, _, _, entropy = head_op(h, weight, b, labels, weights, select, one, "none", o)[:4]
    logp = (-nll).reshape(labels_shape)
    if return_entropy:
        return logp, entropy.reshape(labels_shape)
    return logp
