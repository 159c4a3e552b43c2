"""Prefix sharing: a prefix that several sequences start with runs once, and nothing else changes.

The grouping rules on token lists; then, on a real (tiny) model with a LoRA adapter, the loss and the
adapter's gradients of a batch with shared prefixes equal those of the same examples unshared.
"""

import json
from pathlib import Path

import pytest
import torch

from fasttune.batches import packed_batch, shared_batch
from fasttune.config import load_config
from fasttune.data import load_sft
from fasttune.masks import IGNORE
from fasttune.models import load_model, load_tokenizer
from fasttune.prefix_sharing import given_groups, prefix_groups, shareable, shared_layout
from fasttune.sft import SFTTask

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
CPU = torch.device("cpu")
quiet = lambda *_: None  # noqa: E731


def test_shareable_is_the_first_trained_position():
    assert shareable([IGNORE, IGNORE, 5, IGNORE]) == 2
    assert shareable([7]) == 0
    assert shareable([IGNORE] * 3) == 3


def test_groups_share_what_every_member_allows():
    a = list(range(20)) + [100, 101]
    b = list(range(20)) + [200]
    c = list(range(12)) + [300] * 9
    d = [9] * 30
    groups = prefix_groups([a, b, c, d], limits=[30, 30, 30, 30])
    assert sorted((sorted(m), p) for m, p in groups) == [([0, 1, 2], 12), ([3], 0)]
    # a member's limit (its first trained position) caps the group's prefix; below MIN_SHARED it splits
    assert sorted((sorted(m), p) for m, p in prefix_groups([a, b], limits=[15, 30])) == [([0, 1], 15)]
    assert sorted((sorted(m), p) for m, p in prefix_groups([a, b], limits=[3, 30])) == [([0], 0), ([1], 0)]
    # every member keeps at least one token of its own
    assert given_groups([a, a[:5]], [99, 99], [[0, 1]]) == [([0, 1], 4)]
    assert given_groups([a, d], [99, 99], [[0, 1]]) == [([0], 0), ([1], 0)]


def test_layout_rows_and_positions():
    seqs = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [7, 7]]
    lay = shared_layout(seqs, [([0, 1], 3), ([2], 0)])
    assert lay.input_ids.tolist() == [[1, 2, 3, 4, 5, 9, 7, 7]]
    assert lay.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1]]
    assert lay.segment_ids.tolist() == [[0, 0, 0, 1, 1, 2, 0, 0]]
    assert lay.cu_seqlens.tolist() == [0, 6, 8] and lay.max_len == 6
    # each sequence's tokens, gathered back from the packed row, in its own layout (right-padded)
    assert lay.gather(lay.input_ids, pad=-1).tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 9, -1], [7, 7, -1, -1, -1]]


def _model_and_task(tmp_path):
    cfg = load_config(ROOT / "examples" / "sft.toml", [
        f"run.output_dir={json.dumps(str(tmp_path / 'run'))}", f"data.train={json.dumps(str(DATA / 'sft_alpaca.jsonl'))}",
        'data.eval=""', "model.load_in_4bit=false"])
    tok = load_tokenizer(cfg.model)
    task = SFTTask(cfg, tok, quiet)
    model = load_model(cfg)
    torch.manual_seed(0)
    for n, p in model.named_parameters():  # a non-trivial adapter
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    return cfg, tok, task, model


def test_sft_shared_rows_equal_unshared(tmp_path):
    cfg, tok, task, model = _model_and_task(tmp_path)
    examples = load_sft(DATA / "sft_alpaca.jsonl", tok, cfg.data)[0][:12]
    plain, shared = packed_batch(examples), shared_batch(examples)
    assert shared.segment_ids is not None and shared.input_ids.shape[1] < plain.input_ids.shape[1]
    assert shared.trained == plain.trained and shared.tokens == plain.tokens
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for batch in (plain, shared):
        loss = task.loss(model, batch, batch.trained, CPU)[0]
        results.append((loss, torch.autograd.grad(loss, params)))
    (a, ga), (b, gb) = results
    assert b.item() == pytest.approx(a.item(), rel=1e-5)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)  # fp32: the shared prefix sums in another order


def test_grpo_shared_prompts_equal_padded_rows(tmp_path):
    """GRPO's reference and training forwards: each prompt once for its group, the completions
    unpadded; the log-probs, the loss and its gradients equal the padded rows'."""
    import test_grpo

    cfg, task, model = test_grpo.task_and_model(tmp_path, "grpo.beta=0.1", "grpo.num_iterations=2")
    assert task.share
    torch.manual_seed(1)
    roll = task.rollout(task.prompts[:3])
    roll.advantages = torch.randn(len(roll.advantages))
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for share in (False, True):
        task.share = share
        loss = task.loss(model, roll, task.count(roll), CPU)[0]
        out.append((task.logps(model, roll), loss, torch.autograd.grad(loss, params)))
    (lp_a, a, ga), (lp_b, b, gb) = out
    m = roll.completion_mask
    assert torch.allclose(lp_a[m], lp_b[m], atol=1e-5) and torch.equal(lp_b[~m], torch.zeros_like(lp_b[~m]))
    assert b.item() == pytest.approx(a.item(), rel=1e-5)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "orpo"])
def test_dpo_pairs_share_their_prompt(tmp_path, loss_type):
    """Each pair's prompt runs once for both responses: the sequence log-probs, the loss (with the
    reference, and reference-free) and its gradients equal the padded pairs'."""
    import test_dpo

    cfg, task, model = test_dpo._task_and_model(tmp_path, f'dpo.loss_type="{loss_type}"')
    task.setup(model, CPU, tmp_path)
    assert task.share
    batch = task.batch(task.pairs, [0, 3, 4, 7])
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for share in (False, True):
        task.share = share
        with torch.no_grad():
            lp = task.sequence_logps(model, batch, CPU)
        loss = task.loss(model, batch, 4, CPU)[0]
        out.append((lp, loss, torch.autograd.grad(loss, params)))
    (lp_a, a, ga), (lp_b, b, gb) = out
    assert torch.allclose(lp_a, lp_b, rtol=1e-5)
    assert b.item() == pytest.approx(a.item(), rel=1e-5)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)
