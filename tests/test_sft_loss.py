"""`train.loss = "dft"` and `train.class_weights` in `fasttune sft` on the built-in tiny model: the loss and
gradients against TRL's DFT formula and torch's weighted cross-entropy on full logits, the model's own
head, exact gradient accumulation, and config errors."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fasttune.batches import packed_batch
from fasttune.cli import main
from fasttune.config import load_config
from fasttune.data import load_sft
from fasttune.masks import IGNORE
from fasttune.kernels import revert
from fasttune.models import load_model, load_tokenizer
from fasttune.sft import SFTTask, train_sft

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
quiet = lambda *_: None  # noqa: E731


def config(tmp_path, *sets):
    base = [f"run.output_dir={json.dumps(str(tmp_path / 'run'))}", f"data.train={json.dumps(str(DATA / 'sft_alpaca.jsonl'))}",
            'data.eval=""', "model.load_in_4bit=false"]
    return load_config(ROOT / "examples" / "sft.toml", base + list(sets))


def _reference(model, batch, loss, weights):
    """From the model's full logits: TRL's dft (-logp · exp(logp).detach(), summed / the token count) or
    torch's cross_entropy(weight=...) (summed / Σ weights)."""
    kw = batch.model_kwargs(torch.device("cpu"))
    kw.pop("shift_labels")
    logits = model(**kw).logits.reshape(-1, model.config.vocab_size).double()
    y = batch.shift_labels.reshape(-1)
    keep = y != IGNORE
    logp = logits.log_softmax(-1).gather(1, y.clamp_min(0)[:, None])[:, 0] * keep
    w = keep.double() if weights is None else weights.double()[y.clamp_min(0)] * keep
    per_token = -logp * (logp.exp().detach() if loss == "dft" else 1.0) * w
    return per_token.sum() / w.sum()


@pytest.mark.parametrize("loss,weighted", [("dft", False), ("nll", True), ("dft", True)])
@pytest.mark.parametrize("head", ["fused", "model's own"])
def test_loss_and_gradients_match_full_logits(tmp_path, loss, weighted, head):
    sets = [f'train.loss="{loss}"'] + (['train.class_weights={"!" = 3.0, "<|im_end|>" = 0.25, "e" = 0.0}'] if weighted
                                       else [])
    cfg = config(tmp_path, *sets)
    tok = load_tokenizer(cfg.model)
    task = SFTTask(cfg, tok, quiet)
    model = load_model(cfg)
    torch.manual_seed(0)
    for n, p in model.named_parameters():  # a non-trivial adapter
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    if head != "fused":
        revert(model)
    batch = packed_batch(load_sft(DATA / "sft_alpaca.jsonl", tok, cfg.data)[0][:4])
    params = [p for p in model.parameters() if p.requires_grad]
    n = task.count(batch)
    ours = task.loss(model, batch, n, torch.device("cpu"))[0]
    g_ours = torch.autograd.grad(ours, params)
    weights = task.loss_options.get("class_weights")
    ref = _reference(model, batch, loss, weights)
    g_ref = torch.autograd.grad(ref, params)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    if weighted:  # the count is the summed weights of the trained tokens, and some were left out (weight 0)
        assert n != batch.trained and weights[tok.convert_tokens_to_ids("e")] == 0


def test_gradient_accumulation_with_class_weights_matches_one_big_batch(tmp_path):
    """1 × 4 accumulation = one micro-batch of 4: the normalizer is the summed weights of the whole step."""
    data = tmp_path / "four.jsonl"
    data.write_text("".join((DATA / "sft_alpaca.jsonl").read_text().splitlines(keepends=True)[:4]))
    rows = {}
    for name, (mbs, acc) in {"one_by_four": (1, 4), "four": (4, 1)}.items():
        cfg = config(tmp_path / name, f"data.train={json.dumps(str(data))}", "data.packing=false",
                     f"train.micro_batch_size={mbs}", f"train.grad_accum={acc}", "train.max_steps=1",
                     'train.loss="dft"', 'train.class_weights={"!" = 3.0, "a" = 0.5}')
        train_sft(cfg, log=quiet)
        rows[name] = [json.loads(line) for line in open(Path(cfg.run.output_dir) / "metrics.jsonl")]
    for a, b in zip(rows["one_by_four"], rows["four"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("sets,expect", [
    (['train.class_weights={"no such token" = 2.0}'], "train.class_weights: 'no such token' is not a token"),
    (['train.class_weights={"!" = -1.0}'], "train.class_weights['!'] must be a number >= 0"),
    (['train.loss="kto"'], "[train] loss = 'kto' is not one of 'nll', 'dft'"),
])
def test_bad_config_is_one_line(tmp_path, capsys, sets, expect):
    args = ["sft", str(ROOT / "examples/sft.toml"), "--set", f"run.output_dir={json.dumps(str(tmp_path / 'r'))}"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expect in err and len(err.strip().splitlines()) == 1, err


def test_dpo_has_no_sft_loss_keys(tmp_path, capsys):
    args = ["dpo", str(ROOT / "examples/dpo.toml"), "--set", 'train.loss="dft"']
    assert main(args) == 2 and "[train] loss is not a known key" in capsys.readouterr().err
