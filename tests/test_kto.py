"""KTO: kto_loss against a float64 full-logits reference, the task against TRL's KTOTrainer (the real
trainer on the built-in model), unpaired data and pairs, bad input, and the example learning."""

import json
from pathlib import Path

import pytest
import torch

from fasttune.builtin import byte_tokenizer
from fasttune.cli import main
from fasttune.config import KTOConfig, load_config
from fasttune.masks import IGNORE
from fasttune.kernels import kto_loss
from fasttune.kernels.kto import LOSS_TYPES, kto_kl
from reference import logprobs_reference, rel_err

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
TOK = byte_tokenizer()
quiet = lambda *_: None  # noqa: E731


def kto_reference(logp, labels, desirable, ref, kl, *, beta, loss_type, wd, wu, num_items=None):
    """TRL's KTO losses in float64 from per-token log-probs [B, T]."""
    seq = (logp * (labels != IGNORE)).sum(-1)
    r = seq - ref.double()
    if loss_type == "kto":
        z0 = torch.as_tensor(kl, dtype=torch.float64)
        chosen, rejected = 1 - torch.sigmoid(beta * (r - z0)), 1 - torch.sigmoid(beta * (z0 - r))
    else:
        chosen, rejected = 1 - torch.sigmoid(beta * r), torch.sigmoid(beta * r)
    losses = torch.where(desirable, wd * chosen, wu * rejected)
    return losses.sum() / (len(seq) if num_items is None else num_items)


def inputs(B, T, H=16, V=97):
    h = torch.randn(B, T, H, requires_grad=True)
    w = torch.randn(V, H) * 0.5  # frozen, as under LoRA
    y = torch.randint(0, V, (B, T))
    y[:, : T // 3] = IGNORE
    return h, w, y


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_kto_loss_matches_float64_reference(backend, loss_type):
    B, T = 5, 13
    h, w, y = inputs(B, T)
    desirable = torch.tensor([True, False, True, True, False])
    ref = torch.randn(B) * 3 - 20
    kl = torch.rand(()) * 2
    loss, s = kto_loss(h, w, y, desirable, ref_logps=ref, kl=kl if loss_type == "kto" else None, beta=0.3,
                       loss_type=loss_type, desirable_weight=1.5, undesirable_weight=0.7, num_items=8, backend=backend)
    (gh,) = torch.autograd.grad(loss, [h])
    h64 = h.detach().double().requires_grad_()
    logp, _ = logprobs_reference(h64 @ w.double().T, y)
    want = kto_reference(logp, y, desirable, ref, kl, beta=0.3, loss_type=loss_type, wd=1.5, wu=0.7, num_items=8)
    (gw,) = torch.autograd.grad(want, [h64])
    assert rel_err(loss, want) < 1e-5
    assert rel_err(gh, gw) < 1e-4
    seq = (logp.detach() * (y != IGNORE)).sum(-1)
    assert torch.allclose(s.rewards.double(), 0.3 * (seq - ref.double()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kto_hard_cases(backend):
    """A fully masked completion (no gradient, no NaN), length-1 sequences, one class only."""
    h, w, y = inputs(3, 1)
    y[1] = IGNORE
    loss, s = kto_loss(h, w, y, torch.tensor([True, True, True]), ref_logps=torch.zeros(3), kl=torch.tensor(0.0),
                       backend=backend)
    (g,) = torch.autograd.grad(loss, [h])
    assert torch.isfinite(loss) and torch.isfinite(g).all() and torch.all(g[1] == 0)
    assert float(s.rewards_rejected) == 0.0  # no undesirable completion: 0, not NaN
    h, w, y = inputs(2, 4)
    y[:] = IGNORE  # everything masked: r = 0 - ref; with ref = 0 each loss is 1 - σ(0) = 0.5
    loss, _ = kto_loss(h, w, y, torch.tensor([True, False]), ref_logps=torch.zeros(2), kl=0.0, backend=backend)
    (g,) = torch.autograd.grad(loss, [h])
    assert float(loss) == pytest.approx(0.5) and torch.all(g == 0)


def test_kl_reference_point_is_clamped_and_detached():
    a = torch.tensor([-5.0, -7.0], requires_grad=True)
    assert float(kto_kl(a, torch.tensor([-4.0, -6.0]))) == 0.0  # mean log-ratio -1 -> clamped at 0
    z = kto_kl(a, torch.tensor([-6.0, -9.0]))
    assert float(z) == pytest.approx(1.5) and not z.requires_grad


def test_gradient_accumulation_equals_one_batch():
    h, w, y = inputs(6, 7)
    d = torch.tensor([True, False, True, False, False, True])
    ref, kl = torch.randn(6) - 10, torch.tensor(0.4)
    full, _ = kto_loss(h, w, y, d, ref_logps=ref, kl=kl)
    (g1,) = torch.autograd.grad(full, [h])
    parts = [kto_loss(h[i : i + 2], w, y[i : i + 2], d[i : i + 2], ref_logps=ref[i : i + 2], kl=kl, num_items=6)[0]
             for i in (0, 2, 4)]
    (g2,) = torch.autograd.grad(sum(parts), [h])
    assert torch.allclose(full, sum(parts), rtol=1e-6) and torch.allclose(g1, g2, rtol=1e-5, atol=1e-7)


def test_kto_loss_bad_input():
    h, w, y = inputs(2, 3)
    with pytest.raises(ValueError, match="loss_type"):
        kto_loss(h, w, y, torch.tensor([True, False]), ref_logps=torch.zeros(2), loss_type="nope")
    with pytest.raises(ValueError, match="desirable and ref_logps"):
        kto_loss(h, w, y, torch.tensor([True]), ref_logps=torch.zeros(2))


# ---- the task ---------------------------------------------------------------------------------


def config(tmp_path, *sets):
    base = [f'run.output_dir={json.dumps(str(tmp_path / "run"))}', f'data.train={json.dumps(str(DATA / "kto_unpaired.jsonl"))}',
            'data.eval=""', "model.load_in_4bit=false"]
    return load_config(ROOT / "examples" / "kto.toml", base + list(sets), schema=KTOConfig)


def test_unpaired_data_and_pairs(tmp_path):
    from fasttune.unpaired import load_unpaired, mismatched

    cfg = config(tmp_path)
    items, report = load_unpaired(DATA / "kto_unpaired.jsonl", TOK, cfg.data, cfg.kto)
    rows = [json.loads(line) for line in open(DATA / "kto_unpaired.jsonl")]
    assert len(items) == 300 and report.desirable == sum(r["label"] for r in rows)
    for it, r in zip(items[:5], rows):
        trained = TOK.decode([i for i, lab in zip(it.example.input_ids, it.example.labels) if lab != IGNORE])
        assert trained.startswith(r["completion"]) and it.desirable == r["label"]
    kl = mismatched(items[:3], 256)  # prompt i, completion i-1
    for i in range(3):
        j = (i - 1) % 3
        assert kl[i].input_ids == items[i].example.input_ids[: items[i].prompt_len] + \
            items[j].example.input_ids[items[j].prompt_len :]
    # pairs, with from_pairs: chosen -> desirable, rejected -> undesirable, in order
    cfg = config(tmp_path, "kto.from_pairs=true")
    for name in ("dpo_pairs.jsonl", "dpo_sharegpt.json", "dpo_openai.jsonl"):
        items, report = load_unpaired(DATA / name, TOK, cfg.data, cfg.kto)
        assert [it.desirable for it in items[:4]] == [True, False, True, False] and "from pairs" in report.format


def test_bad_input_is_one_line(tmp_path, capsys):
    pairs = json.dumps(str(DATA / "dpo_pairs.jsonl"))
    cfg_path = ROOT / "examples" / "kto.toml"
    assert main(["kto", str(cfg_path), "--set", f"data.train={pairs}", "--set", 'data.eval=""']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dpo_pairs.jsonl" in err and "kto.from_pairs = true" in err
    unpaired = json.dumps(str(DATA / "kto_unpaired.jsonl"))
    assert main(["dpo", str(ROOT / "examples" / "dpo.toml"), "--set", f"data.train={unpaired}", "--set", 'data.eval=""']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "kto_unpaired.jsonl" in err and "fasttune kto" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "completion": "c", "label": "yes"}) + "\n")
    assert main(["kto", str(cfg_path), "--set", f"data.train={json.dumps(str(bad))}", "--set", 'data.eval=""']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.jsonl" in err and "'label' must be true or false" in err
    assert main(["kto", str(cfg_path), "--set", "train.micro_batch_size=1"]) == 2
    assert "train.micro_batch_size must be >= 2" in capsys.readouterr().err


def _trl_inputs(batch):
    """Our micro-batch in the form TRL's KTO collator gives (completion_mask on unshifted positions)."""
    def side(b, prefix):
        completion = torch.zeros_like(b.input_ids)
        completion[:, 1:] = (b.shift_labels[:, :-1] != IGNORE).long()
        return {f"{prefix}input_ids": b.input_ids, f"{prefix}attention_mask": b.attention_mask,
                f"{prefix}completion_mask": completion}

    return {**side(batch, ""), **side(batch.kl, "KL_"), "label": batch.desirable.clone()}


def test_loss_and_gradients_match_trl_kto_trainer(tmp_path):
    """The same micro-batch through TRL's KTOTrainer._compute_loss (its real trainer, on the same PEFT
    model, reference = adapter off) and through ours: loss and LoRA gradients agree."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig as TRLConfig, KTOTrainer

    from fasttune import builtin
    from fasttune.kto import KTOTask

    cfg = config(tmp_path, "kto.beta=0.5", "kto.desirable_weight=1.3", "kto.undesirable_weight=0.8")
    task = KTOTask(cfg, TOK, quiet)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(builtin.resolve(cfg.model.path), attn_implementation="sdpa")
    args = TRLConfig(output_dir=str(tmp_path / "trl"), beta=0.5, desirable_weight=1.3, undesirable_weight=0.8,
                     per_device_train_batch_size=6, report_to=[], use_cpu=True, bf16=False)
    ds = Dataset.from_list([json.loads(line) for line in open(DATA / "kto_unpaired.jsonl")][:12])
    trainer = KTOTrainer(model=base, args=args, train_dataset=ds, processing_class=TOK,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    model = trainer.model
    with torch.no_grad():  # move the adapter off zero so that policy != reference and the KL term is not 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    batch = task.batch(task.items, [0, 1, 2, 3, 4, 5])
    params = [p for p in model.parameters() if p.requires_grad]
    theirs = trainer._compute_loss(model, _trl_inputs(batch), False)
    g_theirs = torch.autograd.grad(theirs, params)
    ours, stats = task.loss(model, batch, 6, torch.device("cpu"))
    g_ours = torch.autograd.grad(ours, params)
    assert float(stats["kl"]) > 0  # the reference point is in play
    assert torch.allclose(ours, theirs, rtol=1e-5)
    assert float(stats["kl"]) == pytest.approx(trainer._metrics["train"]["kl"][-1], rel=1e-4)
    for a, b in zip(g_ours, g_theirs):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_example_learns(tmp_path):
    """examples/kto.toml: reward accuracy near 1 on the held-out completions within a few dozen steps."""
    from fasttune.kto import train_kto

    cfg = config(tmp_path, f'data.eval={json.dumps(str(DATA / "kto_unpaired_eval.jsonl"))}', "train.max_steps=30",
                 "run.eval_every=30")
    out = train_kto(cfg, log=quiet)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows[0]["reward_accuracy"] == 0.0  # every reward is 0 at the first step
    assert sum(r["reward_accuracy"] for r in rows[-10:]) / 10 >= 0.9
    assert out["last"]["eval_reward_accuracy"] >= 0.85
    assert out["last"]["eval_loss"] < 0.45
