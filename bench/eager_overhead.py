"""Eager call overhead: forward + backward of each public kernel function at a tiny shape (where the
Python around the maths is most of the time), microseconds per call, the best of 7 rounds of 300, on
one thread of the CPU path. Prints one JSON object.

    python bench/eager_overhead.py

To compare with an older commit, check it out elsewhere and put its kernels first on the path as
`fasttune.kernels` (a folder holding fasttune/__init__.py and a link fasttune/kernels -> its kernels/),
then run this script once with PYTHONPATH set to that folder and once without, alternately.
"""
import json
import time

import torch
torch.set_num_threads(1)
import fasttune.kernels as K
torch.manual_seed(0)
N, H, V = 16, 32, 64
def run(name, fn, reps=300, rounds=7):
    best = 1e9
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best * 1e6
h = torch.randn(N, H, requires_grad=True); w = torch.randn(V, H, requires_grad=True); wf = torch.randn(V, H)
lab = torch.randint(0, V, (N,)); logits = torch.randn(N, V, requires_grad=True)
h3 = torch.randn(4, 4, H, requires_grad=True); lab3 = torch.randint(0, V, (4, 4)); cm = torch.ones(4, 4, dtype=torch.bool)
adv = torch.randn(4)
q = torch.randn(16, 2, 16, requires_grad=True); k = torch.randn(16, 2, 16, requires_grad=True); v = torch.randn(16, 2, 16, requires_grad=True)
cu = torch.tensor([0, 7, 16], dtype=torch.int32)
cases = {
 "fused_linear_cross_entropy": lambda: K.fused_linear_cross_entropy(h, w, lab).backward(),
 "fused_linear_cross_entropy frozen head": lambda: K.fused_linear_cross_entropy(h, wf, lab).backward(),
 "cross_entropy": lambda: K.cross_entropy(logits, lab).backward(),
 "linear_logprobs": lambda: K.linear_logprobs(h, w, lab).sum().backward(),
 "linear_logprobs frozen head": lambda: K.linear_logprobs(h, wf, lab).sum().backward(),
 "dpo_loss": lambda: K.dpo_loss(h3, w, lab3)[0].backward(),
 "grpo_loss": lambda: K.grpo_loss(h3, w, lab3, cm, adv)[0].backward(),
 "varlen_attention": lambda: K.varlen_attention(q, k, v, cu, causal=True).sum().backward(),
}
out = {n: round(run(n, f), 1) for n, f in cases.items()}
print(json.dumps(out))
