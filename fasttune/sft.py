"""`fasttune sft`: supervised fine-tuning on the shared loop (fasttune/train.py).

- Data: SFT examples (Alpaca, ShareGPT, OpenAI messages; fasttune/data.py), in packed rows of
  `train.micro_batch_size` tokens (best-fit decreasing) or padded micro-batches of that many
  sequences (fasttune/batches.py).
- Loss: `lm_loss`, the fused linear + cross-entropy that `apply()` installed on the model's head, summed
  over trained tokens and divided by the count over the whole accumulated batch; for a model it could
  not patch, the same loss on the model's logits. `train.loss = "dft"` scales each token's loss by its
  probability, `train.class_weights` weighs chosen tokens (and the normalizer is then their summed weight).
- Eval: the same loss per trained token on `data.eval`, each `run.eval_every` steps; `metrics` adds
  perplexity and token accuracy for `fasttune eval`, `check` shows the data for `fasttune check`.
"""

import math

import torch

from .batches import Stream, epoch_plan, make_batch, packing_efficiency
from .config import ConfigError
from .data import load_sft
from .prefix_sharing import available, check_received


def lm_loss(model, batch, n_items, dev, options=None):
    """The batch's loss summed over trained tokens / n_items: from the fused head `apply()` installed,
    or, for a model it could not patch, from the model's logits. `options`: the SFT loss family
    (token_scaling, class_weights) for the fused cross-entropy."""
    from fasttune.kernels import cross_entropy
    from fasttune.kernels.hf import fused_loss

    options = options or {}
    kw = batch.model_kwargs(dev)
    if options and not fused_loss(model):  # the model's own head: our loss on its logits
        kw.pop("shift_labels")
        out = model(**kw)
    else:
        out = model(**kw, num_items_in_batch=n_items, **options)
    if batch.segment_ids is not None:
        check_received()
    if out.loss is not None:
        return out.loss
    return cross_entropy(out.logits.flatten(0, -2), batch.shift_labels.reshape(-1), reduction="mean",
                         num_items=n_items, **options)


def _batches(examples, cfg, pad_id, model):
    """Every example of `examples` in micro-batches, in one fixed order (evaluation)."""
    lengths = [len(e.input_ids) for e in examples]
    plan = epoch_plan(lengths, packing=cfg.data.packing, micro_batch_size=cfg.train.micro_batch_size, seed=0, epoch=0)
    share = cfg.data.prefix_sharing and available(model)
    return [make_batch([examples[i] for i in g], cfg.data.packing, pad_id, share) for g in plan]


def eval_loss(model, examples, cfg, pad_id, dev, autocast) -> float:
    """Mean loss per trained token over `examples`."""
    batches = _batches(examples, cfg, pad_id, model)
    n = sum(b.trained for b in batches)
    model.eval()
    total = 0.0
    with torch.no_grad(), autocast():
        for b in batches:
            total += float(lm_loss(model, b, n, dev))
    model.train()
    return total


class SFTTask:
    """SFT on the shared loop: packed (or padded) rows, loss normalized by trained tokens."""

    name = "sft"
    panels, timings = (), ()
    run = None  # set by the loop; unused

    def __init__(self, cfg, tok, log, dist=None):
        self.cfg, self.tok = cfg, tok
        if not cfg.data.train:
            raise ConfigError("data.train is empty: set it to a JSON or JSONL file of examples")
        if cfg.data.packing and cfg.train.micro_batch_size < cfg.data.max_seq_len:
            raise ConfigError(f"with data.packing, train.micro_batch_size is tokens per row and must be >= "
                              f"data.max_seq_len ({cfg.train.micro_batch_size} < {cfg.data.max_seq_len})")
        self.loss_options = sft_loss_options(cfg.train, tok)  # checked before the data is read
        examples, report = load_sft(cfg.data.train, tok, cfg.data)
        log(report.summary())
        self.eval_examples = load_sft(cfg.data.eval, tok, cfg.data)[0] if cfg.data.eval else None
        lengths = [len(e.input_ids) for e in examples]
        d, t = cfg.data, cfg.train

        def plan(epoch):
            return epoch_plan(lengths, packing=d.packing, micro_batch_size=t.micro_batch_size, seed=t.seed, epoch=epoch)

        self.share = False  # prefix sharing: decided in setup, when the model is known
        self.stream = Stream(plan, lambda g: make_batch([examples[i] for i in g], d.packing, tok.pad_token_id,
                                                        self.share))
        if d.packing:
            rows = self.stream.plan(0)
            log(f"packing: {len(rows)} rows of {t.micro_batch_size} tokens per epoch, "
                f"{100 * packing_efficiency(lengths, rows, t.micro_batch_size):.1f}% filled")

    def setup(self, model, dev, run_dir, dist=None):
        self.share = self.cfg.data.prefix_sharing and self.cfg.data.packing and available(model)

    def count(self, batch):
        if "class_weights" in self.loss_options:  # the mean divides by the summed weights of the trained tokens
            y = batch.shift_labels
            return float(self.loss_options["class_weights"][y.clamp_min(0)][y != -100].sum())
        return batch.trained

    def loss(self, model, batch, n_items, dev):
        weights = self.loss_options.get("class_weights")
        V = model.get_output_embeddings().weight.shape[0]
        if weights is not None and weights.shape[0] < V:  # a head padded beyond the tokenizer: those classes weigh 1
            self.loss_options["class_weights"] = torch.cat([weights, torch.ones(V - weights.shape[0])])
        return lm_loss(model, batch, n_items, dev, self.loss_options), {}

    def evaluate(self, model, dev, autocast):
        return eval_loss(model, self.eval_examples, self.cfg, self.tok.pad_token_id, dev, autocast) if self.eval_examples else None


def sft_loss_options(t, tok) -> dict:
    """train.loss and train.class_weights as fused_linear_cross_entropy's options."""
    options = {"token_scaling": True} if t.loss == "dft" else {}
    if t.class_weights:
        V = len(tok)
        weights = torch.ones(V)
        for token, w in t.class_weights.items():
            i = tok.convert_tokens_to_ids(token)
            if not isinstance(i, int) or not 0 <= i < V or tok.convert_ids_to_tokens(i) != token:
                raise ConfigError(f"train.class_weights: {token!r} is not a token of the tokenizer; keys are tokens "
                                  f"as the tokenizer spells them, e.g. {tok.eos_token or tok.convert_ids_to_tokens(V - 1)!r}")
            if not isinstance(w, (int, float)) or w < 0:
                raise ConfigError(f"train.class_weights[{token!r}] must be a number >= 0, got {w!r}")
            weights[i] = float(w)
        options["class_weights"] = weights
    return options


def train_sft(cfg, log=print) -> dict:
    """Train `cfg` (an SFTConfig); returns the summary."""
    from .train import train

    return train(cfg, SFTTask, log)


def check(cfg, tok):
    """`fasttune check`: the examples of data.train and data.eval, how they pack, the first one marked."""
    from .batches import packing_rows
    from .checks import marked

    for name in ("train", "eval"):
        path = getattr(cfg.data, name)
        if not path:
            continue
        examples, report = load_sft(path, tok, cfg.data)
        print(f"[{name}] " + report.summary())
        lengths = [len(e.input_ids) for e in examples]
        if cfg.data.packing:
            rows = packing_rows(lengths, cfg.train.micro_batch_size)
            print(f"  packing: {len(rows)} rows of {cfg.train.micro_batch_size} tokens, "
                  f"{100 * packing_efficiency(lengths, rows, cfg.train.micro_batch_size):.1f}% filled")
        else:
            print(f"  no packing: micro-batches of {cfg.train.micro_batch_size} sequences, padded to the longest")
        if name == "train":
            ex = examples[0]
            print(f"  first example ({ex.where}), trained tokens between « and »:\n"
                  + "\n".join("    " + line for line in marked(tok, ex.input_ids, ex.labels).splitlines()))
    print("ok: the config and the data are valid")


def metrics(cfg, tok, model, dev, split, log):
    """`fasttune eval`: loss per trained token, perplexity and token accuracy on data.eval (or data.train)."""
    from .masks import IGNORE
    from .models import final_hidden

    examples, report = load_sft(getattr(cfg.data, split), tok, cfg.data)
    log(report.summary())
    batches = _batches(examples, cfg, tok.pad_token_id, model)
    n = sum(b.trained for b in batches)
    if n == 0:
        raise ConfigError(f"data.{split} has no trained tokens to evaluate")
    loss, correct = 0.0, 0
    for b in batches:
        loss += float(lm_loss(model, b, n, dev))
        kwargs = b.model_kwargs(dev)
        labels = kwargs.pop("shift_labels").reshape(-1)
        hidden, head = final_hidden(model, **kwargs)
        hidden = hidden.reshape(-1, head.weight.shape[1])
        rows = (labels != IGNORE).nonzero().squeeze(1)
        for s in range(0, len(rows), 1024):  # the trained rows' logits, a chunk at a time (argmax: softcap is monotone)
            r = rows[s : s + 1024]
            logits = torch.nn.functional.linear(hidden[r.to(dev)], head.weight, head.bias)
            correct += int((logits.argmax(-1).cpu() == labels[r]).sum())
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0)), "eval_token_accuracy": correct / n,
            "eval_trained_tokens": n, "eval_examples": len(examples)}
