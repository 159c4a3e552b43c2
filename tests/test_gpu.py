"""Checks that only mean something on CUDA: no host syncs in the hot path, and host-side masks.

Skipped without a GPU (conftest). The rest of the suite also runs on CUDA when there is one.
"""

import pytest
import torch

from fasttune.kernels import dpo_loss, fused_linear_cross_entropy, grpo_loss, linear_logprobs
from reference import TOL, ce_reference, rel_err

pytestmark = pytest.mark.gpu


@pytest.fixture
def no_sync():
    """Any host-device synchronization inside the block raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    yield
    torch.cuda.set_sync_debug_mode("default")


def _head(N=512, H=256, V=32003, dtype=torch.bfloat16):
    h = torch.randn(N, H, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(V, H, device="cuda") / H**0.5).to(dtype).requires_grad_()
    return h, w


@pytest.mark.parametrize("labels_on", ["cuda", "cpu"])
def test_flce_has_no_host_sync(no_sync, labels_on):
    h, w = _head()
    y = torch.randint(0, w.shape[0], (h.shape[0],), device=labels_on)
    y[:100] = -100
    loss = fused_linear_cross_entropy(h, w, y, return_stats=True, num_items=torch.tensor(400.0, device="cuda"))[0]
    loss.backward()
    lp = linear_logprobs(h, w, y, temperature=0.7, return_entropy=True)[0]
    lp.sum().backward()


def test_dpo_grpo_have_no_host_sync(no_sync):
    h, w = _head(N=4 * 64)
    h3 = h.view(4, 64, -1)
    y = torch.randint(0, w.shape[0], (4, 64))
    y[:, :20] = -100
    dpo_loss(h3, w, y, ref_logps=torch.randn(4, device="cuda"), num_pairs=2)[0].backward()
    mask = torch.ones(4, 64, dtype=torch.bool)
    grpo_loss(h3, w, y.clamp_min(0), mask, torch.randn(4, device="cuda"), ref_logps=torch.randn(4, 64, device="cuda"),
              beta=0.1)[0].backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_host_labels_skip_masked_rows_and_agree(dtype):
    """Labels on the CPU with CUDA hidden states: masked rows are compacted away, same result."""
    h, w = _head(N=300, V=5003, dtype=dtype)
    y = torch.randint(0, w.shape[0], (300,))
    y[::3] = -100
    out = {}
    for where in ("cpu", "cuda"):
        loss = fused_linear_cross_entropy(h, w, y.to(where))
        out[where] = (loss, *torch.autograd.grad(loss, (h, w)))
    for a, b in zip(out["cpu"], out["cuda"]):
        assert rel_err(a, b) < TOL[dtype]
    ref = ce_reference(h.detach().double() @ w.detach().double().T, y.cuda())
    assert rel_err(out["cpu"][0], ref) < TOL[dtype]


def test_llama3_head_shape_bf16():
    """A full Llama-3-8B head step (N=2048) against the fp32 torch path on the same GPU."""
    h, w = _head(N=2048, H=4096, V=128256)
    y = torch.randint(0, 128256, (2048,), device="cuda")
    loss = fused_linear_cross_entropy(h, w, y)
    gh, gw = torch.autograd.grad(loss, (h, w))
    ref = torch.nn.functional.cross_entropy(h.detach().float() @ w.detach().float().T, y)
    assert rel_err(loss, ref) < 1e-2 and torch.isfinite(gh).all() and torch.isfinite(gw).all()
