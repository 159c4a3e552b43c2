"""fasttune.kernels.apply on real transformers models (tiny configs, random weights), PEFT and 4-bit.

Each family runs through both backends: the PyTorch path and the Triton kernels (interpreted here).
"""

import warnings

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import fasttune.kernels as K
from fasttune.kernels.hf import head_of
from reference import rel_err

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=6),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16),
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                                                attn_logit_softcapping=20.0, final_logit_softcapping=5.0),
    "gemma3": lambda: transformers.Gemma3TextConfig(**COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                                                    layer_types=["sliding_attention", "full_attention"]),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=32, output_router_logits=True,
                                                     router_aux_loss_coef=0.01),
    "phi3": lambda: transformers.Phi3Config(**COMMON, pad_token_id=0),
    # MLA: queries and keys 24 wide, values 16 (padded for the kernel, as flash-attention users do)
    "deepseek_v3": lambda: transformers.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, moe_intermediate_size=32,
                                                         n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=16,
                                                         q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16,
                                                         v_head_dim=16, first_k_dense_replace=1, n_group=1, topk_group=1),
}
# Logit scaling read from the config (Granite divides the logits by logits_scaling)
SCALED = {"granite": lambda: transformers.GraniteConfig(**COMMON, logits_scaling=4.0)}
BACKENDS = ["torch", "triton"]


def model_of(family, seed=0):
    torch.manual_seed(seed)
    impl = "eager" if family == "gemma2" else "sdpa"
    return AutoModelForCausalLM.from_config({**FAMILIES, **SCALED}[family](), attn_implementation=impl).float()


def param_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("FASTTUNE_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("family", list(FAMILIES) + list(SCALED))
@pytest.mark.parametrize("via", ["position_ids", "cu_seq_lens"])
def test_packed_equals_one_by_one(family, via, backend):
    """A packed row of 3 samples: same per-sample losses and same gradients as 3 separate runs."""
    model = K.apply(model_of(family))
    model.config.output_router_logits = False  # MoE load balancing is over the batch, not a per-sample sum
    lens = [7, 12, 5]
    samples = [torch.randint(0, 97, (L,)) for L in lens]
    n_items = sum(L - 1 for L in lens)

    per_sample = []
    for s in samples:
        out = model(s[None], labels=s[None], num_items_in_batch=n_items)
        out.loss.backward()
        per_sample.append(out.loss.detach())
    separate = param_grads(model)
    model.zero_grad()

    ids = torch.cat(samples)[None]
    labels = torch.cat([torch.cat([torch.tensor([-100]), s[1:]]) for s in samples])[None]
    pos = torch.cat([torch.arange(L) for L in lens])[None]
    kw = {"position_ids": pos}
    if via == "cu_seq_lens":
        cu = torch.tensor([0, 7, 19, 24], dtype=torch.int32)
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=12, max_length_k=12)
    out = model(ids, labels=labels, num_items_in_batch=n_items, **kw)
    assert out.logits is None
    out.loss.backward()
    packed = param_grads(model)
    assert rel_err(out.loss, sum(per_sample)) < 1e-5
    for name, g in separate.items():
        assert rel_err(packed[name], g) < 1e-4, name

    # per-sample losses from the packed run's hidden states
    with torch.no_grad():
        head = head_of(model)
        hidden = head.scaled(head.base(ids, **kw).last_hidden_state[0])
        shifted = torch.cat([labels[0, 1:], torch.tensor([-100])])
        tok = K.fused_linear_cross_entropy(hidden, head.weight, shifted, reduction="none", softcap=head.softcap)
        sums = torch.stack([p.sum() for p in tok.split(lens)]) / n_items
    assert rel_err(sums, torch.stack(per_sample)) < 1e-5


@pytest.mark.parametrize("family", list(FAMILIES) + list(SCALED))
def test_patched_loss_equals_unpatched(family, backend):
    """An ordinary padded batch: the patched model's loss and gradients are the model's own."""
    model = model_of(family)
    ids = torch.randint(0, 97, (2, 14))
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, 10:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    ref = model(ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    want = param_grads(model)
    model.zero_grad()
    with K.applied(model):
        got = model(ids, attention_mask=mask, labels=labels)
        got.loss.backward()
    assert rel_err(got.loss, ref.loss) < 1e-5
    for name, g in want.items():
        assert rel_err(param_grads(model)[name], g) < 1e-4, name


def test_revert_and_generate():
    model = model_of("llama")
    ids = torch.randint(0, 97, (2, 6))
    want = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    K.apply(model)
    assert model.config._attn_implementation == "fasttune"
    got = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)  # KV cache: the fallback path
    assert torch.equal(got, want)
    assert model(ids).logits is not None  # no labels: the model's own forward
    K.revert(model)
    assert model.config._attn_implementation == "sdpa" and "forward" not in vars(model)
    assert model(ids, labels=ids).logits is not None


def test_unsupported_model_is_left_alone():
    """Bloom computes its attention itself (ALiBi), not through transformers' attention interface."""
    model = AutoModelForCausalLM.from_config(transformers.BloomConfig(n_layer=1, hidden_size=32, n_head=2,
                                                                      vocab_size=50))
    with pytest.warns(UserWarning, match="attention interface"):
        K.apply(model)
    assert model.config._attn_implementation != "fasttune" and "forward" not in vars(model)


def test_peft_lora_model(backend):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model_of("qwen2"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ids = torch.randint(0, 97, (2, 9))
    ref = model(ids, labels=ids)
    ref.loss.backward()
    want = param_grads(model)
    model.zero_grad()
    K.apply(model)
    got = model(ids, labels=ids)
    got.loss.backward()
    assert got.logits is None and rel_err(got.loss, ref.loss) < 1e-5
    grads = param_grads(model)
    assert want and all("lora_" in n for n in grads)
    for name, g in want.items():
        assert rel_err(grads[name], g) < 1e-4, name


def test_bitsandbytes_4bit_with_lora(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    model_of("llama").save_pretrained(tmp_path)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb, device_map="cpu")
    import bitsandbytes as bnb_lib

    assert isinstance(base.model.layers[0].self_attn.q_proj, bnb_lib.nn.Linear4bit)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    ids = torch.randint(0, 97, (2, 8))
    ref = model(ids, labels=ids).loss
    K.apply(model)
    got = model(ids, labels=ids)
    got.loss.backward()
    assert got.logits is None and rel_err(got.loss, ref) < 1e-5
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


def test_custom_4d_mask_is_honoured():
    """A 4D mask given by the caller (here: block the first two keys) takes the fallback with that mask."""
    model = model_of("llama")
    ids = torch.randint(0, 97, (1, 8))
    mask = torch.tril(torch.ones(8, 8, dtype=torch.bool))
    mask[:, :2] = False
    mask[:2, :2] = torch.eye(2, dtype=torch.bool)  # the first rows must see something
    mask4d = mask[None, None]
    want = model(ids, attention_mask=mask4d).logits
    with K.applied(model):
        got = model(ids, attention_mask=mask4d).logits
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("family", ["gemma2", "granite", "llama"])
def test_head_log_probs_equal_the_model_logits(family):
    """The fused log-probs DPO and GRPO use (final_hidden + linear_logprobs with the head's softcap and
    logit scaling) equal log_softmax of the model's own logits, unpatched and on a PEFT model."""
    from peft import LoraConfig, get_peft_model

    from fasttune.models import final_hidden

    model = model_of(family)
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding, as GRPO's prompts
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    with torch.no_grad():
        want = torch.log_softmax(model(ids, attention_mask=mask, position_ids=pos).logits.double(), -1)
        want = want[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        for m in (model, K.apply(get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")))):
            hidden, head = final_hidden(m, input_ids=ids, attention_mask=mask, position_ids=pos)
            got = K.linear_logprobs(hidden, head.weight, labels, bias=head.bias, softcap=head.softcap)
            ok = mask[:, :-1].bool()  # the state at t is real
            assert rel_err(got[:, :-1][ok], want[ok]) < 1e-5


@pytest.mark.parametrize("family,why", [
    ("gpt_oss", "attention sinks"),  # its softmax has a sink term the kernel does not compute
    ("lfm2", "conv layers besides attention"),  # convolutions would carry state across packed samples
])
def test_models_apply_would_get_wrong_are_refused(family, why):
    from fasttune.kernels.hf import unsupported

    cfg = {
        "gpt_oss": lambda: transformers.GptOssConfig(**COMMON, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                                     layer_types=["sliding_attention", "full_attention"]),
        "lfm2": lambda: transformers.Lfm2Config(**{k: v for k, v in COMMON.items() if k != "tie_word_embeddings"},
                                                layer_types=["conv", "full_attention"]),
    }[family]()
    assert why in unsupported(AutoModelForCausalLM.from_config(cfg))
