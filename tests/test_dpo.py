"""`fasttune dpo` on the built-in tiny model: data formats, the reference, the loss against TRL's way, resume."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fasttune.builtin import byte_tokenizer
from fasttune.cli import main
from fasttune.config import DPOConfig, PrefDataConfig, DPOSection, load_config
from fasttune.masks import IGNORE
from fasttune.sources import DataError
from fasttune.dpo import DPOTask, train_dpo
from fasttune.models import load_model, load_tokenizer
from fasttune.preference import load_pairs

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
TOK = byte_tokenizer()
quiet = lambda *_: None  # noqa: E731


def config(tmp_path, *sets):
    base = [f'run.output_dir={json.dumps(str(tmp_path / "run"))}', f'data.train={json.dumps(str(DATA / "dpo_pairs.jsonl"))}',
            'data.eval=""', "model.load_in_4bit=false"]
    return load_config(ROOT / "examples" / "dpo.toml", base + list(sets), schema=DPOConfig)


def trained(ex):
    return TOK.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])


@pytest.mark.parametrize("name,fmt", [("dpo_pairs.jsonl", "prompt_chosen_rejected"), ("dpo_sharegpt.json", "sharegpt"),
                                      ("dpo_openai.jsonl", "openai")])
def test_formats(name, fmt):
    pairs, report = load_pairs(DATA / name, TOK, PrefDataConfig(), DPOSection())
    assert report.format == fmt and pairs
    p = pairs[0]
    assert trained(p.chosen).endswith("!<|im_end|>") and trained(p.rejected).endswith(".<|im_end|>")


def test_multi_turn_sharegpt_gives_two_pairs_with_the_right_prompts(tmp_path):
    rec = {"conversations": [
        {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "good1", "label": "chosen"},
        {"from": "gpt", "value": "bad1", "label": "rejected"}, {"from": "human", "value": "Q2"},
        {"from": "gpt", "value": "bad2", "label": "rejected"}, {"from": "gpt", "value": "good2", "label": "chosen"}]}
    path = tmp_path / "mt.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    pairs, _ = load_pairs(path, TOK, PrefDataConfig(), DPOSection())
    assert len(pairs) == 2
    assert trained(pairs[0].chosen) == "good1<|im_end|>" and trained(pairs[0].rejected) == "bad1<|im_end|>"
    assert trained(pairs[1].chosen) == "good2<|im_end|>" and trained(pairs[1].rejected) == "bad2<|im_end|>"
    second_prompt = TOK.decode(pairs[1].chosen.input_ids)
    assert "Q1" in second_prompt and "good1" in second_prompt and "bad1" not in second_prompt
    assert TOK.decode(pairs[1].rejected.input_ids).replace("bad2", "good2") == second_prompt


@pytest.mark.parametrize("record,expect", [
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "label": "chosen"},
                        {"from": "gpt", "value": "b", "label": "chosen"}, {"from": "gpt", "value": "c", "label": "rejected"}]},
     r"bad\.jsonl:1: conversations\[2\] is a second chosen candidate in the same turn"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "label": "chosen"},
                        {"from": "human", "value": "q2"}]},
     r"bad\.jsonl:1: .* has a chosen candidate but no rejected one"),
    ({"question": "q", "answer": "a"}, r"bad\.jsonl:1: not a preference record"),
])
def test_bad_records(tmp_path, record, expect):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=expect):
        load_pairs(path, TOK, PrefDataConfig(), DPOSection())


def test_overlong_error_and_full_finetune_needs_precompute(tmp_path, capsys):
    code = main(["dpo", str(ROOT / "examples/dpo.toml"), "--set", "dpo.max_len=40", "--set", 'data.overlong="error"',
                 "--set", f'run.output_dir={json.dumps(str(tmp_path / "r"))}'])
    assert code == 2 and "over dpo.max_len = 40" in capsys.readouterr().err
    code = main(["dpo", str(ROOT / "examples/dpo.toml"), "--set", 'model.finetune="full"',
                 "--set", f'run.output_dir={json.dumps(str(tmp_path / "r2"))}'])
    assert code == 2 and 'dpo.reference = "precompute"' in capsys.readouterr().err


def _task_and_model(tmp_path, *sets):
    cfg = config(tmp_path, *sets)
    tok = load_tokenizer(cfg.model)
    task = DPOTask(cfg, tok, quiet)
    model = load_model(cfg)
    torch.manual_seed(0)
    for n, p in model.named_parameters():  # a non-trivial adapter (LoRA B starts at 0)
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    return cfg, task, model


def test_reference_with_adapter_off_is_the_base_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from fasttune import builtin

    cfg, task, model = _task_and_model(tmp_path)
    batch = task.batch(task.pairs, [0, 1, 2])
    ref = task.reference_logps(model, batch, torch.device("cpu"))
    base = AutoModelForCausalLM.from_pretrained(builtin.resolve(cfg.model.path), attn_implementation="sdpa")
    with torch.no_grad():
        logits = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    y = batch.shift_labels
    want = (logits.log_softmax(-1).gather(-1, y.clamp_min(0)[..., None])[..., 0] * (y != IGNORE)).sum(-1)
    assert torch.allclose(ref.double(), want, rtol=1e-5)
    with torch.no_grad():
        policy = task.sequence_logps(model, batch, torch.device("cpu"))
    assert not torch.allclose(policy, ref, rtol=1e-3)  # and the adapter does change the policy


def test_loss_and_gradients_match_trl_with_full_logits(tmp_path):
    cfg, task, model = _task_and_model(tmp_path, 'dpo.loss_type="sigmoid"', "dpo.beta=0.2", "dpo.sft_weight=0.5")
    batch = task.batch(task.pairs, [3, 4, 5, 6])
    params = [p for p in model.parameters() if p.requires_grad]
    loss, stats = task.loss(model, batch, 4, torch.device("cpu"))
    ours = torch.autograd.grad(loss, params)

    # TRL's way: full logits of policy and reference, log_softmax, gather, sum, -logsigmoid(β·logits) + RPO NLL
    y = batch.shift_labels
    mask = y != IGNORE

    def seq_logps(m):
        logits = m(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        return (logits.log_softmax(-1).gather(-1, y.clamp_min(0)[..., None])[..., 0] * mask).sum(-1)

    with torch.no_grad(), model.disable_adapter():
        ref = seq_logps(model)
    pi = seq_logps(model)
    B = 4
    logits = (pi[:B] - ref[:B]) - (pi[B:] - ref[B:])
    trl = -F.logsigmoid(0.2 * logits).mean() + 0.5 * (-(pi[:B] / mask[:B].sum(-1))).mean()
    theirs = torch.autograd.grad(trl, params)
    assert torch.allclose(loss, trl, rtol=1e-5)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert stats["reward_margin"] == pytest.approx(float((0.2 * logits).mean()), rel=1e-4)


def test_precompute_gives_the_live_loss(tmp_path):
    cfg, live, model = _task_and_model(tmp_path)
    _, pre, _ = _task_and_model(tmp_path, 'dpo.reference="precompute"')
    run_dir = tmp_path / "cache"
    run_dir.mkdir()
    pre.setup(model, torch.device("cpu"), run_dir)
    assert list(run_dir.glob("reference_logps-train-*.pt"))
    batch_live, batch_pre = live.batch(live.pairs, [7, 8, 9]), pre.batch(pre.pairs, [7, 8, 9])
    with torch.no_grad():
        a = live.loss(model, batch_live, 3, torch.device("cpu"))[0]
        b = pre.loss(model, batch_pre, 3, torch.device("cpu"))[0]
    assert torch.allclose(a, b, rtol=1e-5)


def test_demo_learns_and_resumes_exactly(tmp_path):
    """The example's reward accuracy rises above 0.5; 6 steps = 3 steps, then resumed to 6."""
    same = ['train.lr_scheduler="constant"', "train.warmup_steps=0", "run.save_every=3"]  # max_steps changes
    full = train_dpo(config(tmp_path / "a", "train.max_steps=6", *same), log=quiet)
    assert full["last"]["reward_accuracy"] > 0.5
    train_dpo(config(tmp_path / "b", "train.max_steps=3", *same), log=quiet)
    train_dpo(config(tmp_path / "b", "train.max_steps=6", *same), log=quiet)
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / x / "run" / "metrics.jsonl")] for x in "ab"]
    assert losses[0] == losses[1]


def test_start_from_an_sft_adapter(tmp_path):
    """With model.adapter, the reference is that adapter: at the first step policy = reference, rewards 0."""
    from fasttune.config import SFTConfig
    from fasttune.sft import train_sft

    sft = load_config(ROOT / "examples/sft.toml", [f'run.output_dir={json.dumps(str(tmp_path / "sft"))}',
                                                   "train.max_steps=3", 'data.eval=""', "model.load_in_4bit=false",
                                                   f'data.train={json.dumps(str(DATA / "sft_alpaca.jsonl"))}'],
                      schema=SFTConfig)
    train_sft(sft, log=quiet)
    adapter = tmp_path / "sft" / "checkpoints" / "step-000003"
    cfg = config(tmp_path, f"model.adapter={json.dumps(str(adapter))}", "train.max_steps=2")
    train_dpo(cfg, log=quiet)
    first = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert abs(first["rewards_chosen"]) < 1e-5 and abs(first["loss"] - 0.693147) < 1e-4


def test_policy_and_reference_use_the_same_head_bias(tmp_path):
    """A head with a bias: at LoRA's init (B = 0) policy = reference, so rewards are 0 and the loss ln 2."""
    cfg = config(tmp_path)
    task = DPOTask(cfg, load_tokenizer(cfg.model), quiet)
    model = load_model(cfg)
    lm = model.get_base_model()
    head = torch.nn.Linear(lm.lm_head.in_features, lm.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(lm.lm_head.weight)
        head.bias.normal_(0, 1.0)
    head.requires_grad_(False)
    lm.lm_head = head
    with torch.no_grad():
        loss, stats = task.loss(model, task.batch(task.pairs, [0, 1, 2]), 3, torch.device("cpu"))
    assert abs(float(stats["rewards_chosen"])) < 1e-5 and abs(float(loss) - 0.693147) < 1e-5
