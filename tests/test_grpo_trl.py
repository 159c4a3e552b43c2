"""fasttune's fused grpo_loss against TRL 1.16's own GRPOTrainer loss (`GRPOTrainer._compute_loss`) on
the same model and the same tensors: token and sequence (GSPO) ratios, cispo, per-sequence and
per-token advantages, with the KL term; loss, gradients and clip metrics.

TRL 1.16 multiplies the KL term by the importance ratio by default (use_bias_correction_kl=True);
fasttune's loss is the plain k3 term, so the comparison runs TRL with that option off. TRL's
GRPOConfig also turns on bf16 autocast by default on the CPU: off here, both sides in float32.
"""

import pytest
import torch

from fasttune.builtin import build, byte_tokenizer
from fasttune.kernels import grpo_loss, linear_logprobs
from fasttune.models import final_hidden
from reference import rel_err

B, P, C, TEMP = 4, 5, 6, 0.9


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(build("tiny-llama"), dtype=torch.float32)


def trl_trainer(model, tmp_path, **kw):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=B, num_generations=2,
                      max_completion_length=C, temperature=TEMP, bf16=False, use_bias_correction_kl=False,
                      report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, **kw)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["ab", "cd", "ef", "gh"]}),
                          processing_class=byte_tokenizer())
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which we do not run
    return trainer


CASES = [  # loss_type, importance_sampling_level, per-token advantages
    ("dapo", "token", False), ("dapo", "sequence", False), ("grpo", "sequence", False), ("dr_grpo", "sequence", False),
    ("dapo", "sequence", True), ("cispo", "token", False), ("cispo", "sequence", False), ("cispo", "token", True),
]


@pytest.mark.parametrize("loss_type,level,per_token", CASES)
def test_grpo_loss_equals_trl(model, tmp_path, loss_type, level, per_token):
    eps_high = 1.2 if loss_type == "cispo" else 0.28
    beta = 0.05
    trainer = trl_trainer(model, tmp_path, loss_type=loss_type, importance_sampling_level=level, beta=beta,
                          epsilon=0.2, epsilon_high=eps_high)
    g = torch.Generator().manual_seed(7)
    V = model.config.vocab_size
    prompt_ids, completion_ids = torch.randint(4, V, (B, P), generator=g), torch.randint(4, V, (B, C), generator=g)
    cmask = torch.ones(B, C, dtype=torch.long)
    cmask[1, 3:] = 0
    cmask[2, 1:] = 0  # a completion of one token
    ids = torch.cat([prompt_ids, completion_ids], 1)
    model.train()

    def ours_hidden():
        h, head = final_hidden(model, input_ids=ids, attention_mask=torch.ones_like(ids))
        return h[:, P - 1 : P - 1 + C], head

    with torch.no_grad():
        h, head = ours_hidden()
        logp = linear_logprobs(h, head.weight, torch.where(cmask.bool(), completion_ids, -100), temperature=TEMP)
    shift = torch.tensor([-0.7, 0.7, 0.0, 0.1])[:, None]  # low and high ratios in rows 0 and 1
    old = logp - shift + 0.2 * torch.randn(B, C, generator=g)
    ref = logp + 0.2 * torch.randn(B, C, generator=g)
    sign = torch.tensor([-1.0, 1.0, 1.0, -1.0])
    adv = ((torch.rand(B, C, generator=g) + 0.1) * sign[:, None]) if per_token else (torch.rand(B, generator=g) + 0.1) * sign

    inputs = dict(prompt_ids=prompt_ids, prompt_mask=torch.ones(B, P, dtype=torch.long), completion_ids=completion_ids,
                  completion_mask=cmask, advantages=adv, old_per_token_logps=old, ref_per_token_logps=ref,
                  num_items_in_batch=cmask.sum().float())
    params = [p for p in model.parameters() if p.requires_grad]
    theirs = trainer._compute_loss(model, inputs)
    g_theirs = torch.autograd.grad(theirs, params)

    h, head = ours_hidden()
    n_items = int(cmask.sum()) if loss_type in ("dapo", "cispo") else B
    ours, stats = grpo_loss(h, head.weight, completion_ids, cmask, adv, old_logps=old, ref_logps=ref, beta=beta,
                            epsilon_low=0.2, epsilon_high=eps_high, loss_type=loss_type, importance_sampling_level=level,
                            temperature=TEMP, num_items=n_items, max_completion_len=C)
    g_ours = torch.autograd.grad(ours, params)

    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7), (ours, theirs)
    for a, b in zip(g_ours, g_theirs):
        assert rel_err(a, b) < 1e-4
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert stats.kl.item() == pytest.approx(logged["kl"], rel=1e-5)
    if loss_type == "cispo":
        assert stats.clip_ratio_high.item() == pytest.approx(logged["cispo_clip_ratio"], abs=1e-6)
        assert stats.clip_ratio_high.item() > 0
    else:
        assert stats.clip_ratio_low.item() == pytest.approx(logged["clip_ratio/low_mean"], abs=1e-6)
        assert stats.clip_ratio_high.item() == pytest.approx(logged["clip_ratio/high_mean"], abs=1e-6)
        assert stats.clip_ratio_region.item() == pytest.approx(logged["clip_ratio/region_mean"], abs=1e-6)
        assert 0 < stats.clip_ratio_region.item() < 1
