"""fasttune.kernels inside other trainers: the Hugging Face Trainer and TRL's SFTTrainer.

A tiny Llama learns counting sequences (token t + 1 follows token t) in a few dozen steps; the
spies prove that fasttune's attention and fused loss did the work.
"""

import pytest
import torch
import transformers
from datasets import Dataset
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments

import fasttune.kernels as K
import fasttune.kernels.hf as hf

V = 97


@pytest.fixture
def spies(monkeypatch):
    calls = {"attention": 0, "loss": 0}

    def spy(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(hf, "varlen_attention", spy("attention", hf.varlen_attention))
    monkeypatch.setattr(hf, "fused_linear_cross_entropy", spy("loss", hf.fused_linear_cross_entropy))
    return calls


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                   eos_token_id=2)
    return K.apply(AutoModelForCausalLM.from_config(cfg))


def counting(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 80, (n,), generator=g).tolist()
    lens = torch.randint(6, 24, (n,), generator=g).tolist()
    return [[4 + (s + i) % 90 for i in range(L)] for s, L in zip(starts, lens)]


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def common_args(tmp_path):
    return dict(output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=8, learning_rate=3e-3,
                lr_scheduler_type="constant", logging_steps=5, report_to=[], use_cpu=True, save_strategy="no",
                seed=0, disable_tqdm=True)


def test_hf_trainer_padding_free(tmp_path, spies):
    """transformers' DataCollatorWithFlattening packs each batch into one row (position_ids restart)."""
    ds = Dataset.from_list([{"input_ids": x} for x in counting(320)])
    trainer = Trainer(model=tiny_llama(), args=TrainingArguments(**common_args(tmp_path)), train_dataset=ds,
                      data_collator=transformers.DataCollatorWithFlattening())
    trainer.train()
    seen = losses(trainer)
    assert seen[-1] < 0.5 * seen[0], seen
    assert spies["attention"] > 0 and spies["loss"] > 0


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": 4 + i for i in range(90)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.mark.parametrize("packing", [False, True])
def test_trl_sft_trainer(tmp_path, spies, packing):
    """TRL (>= 1.16) computes the SFT loss with its own fused LM head (`fused_lm_head=True`), so
    there fasttune provides the attention: packed rows (packing=True) go through varlen."""
    from trl import SFTConfig, SFTTrainer

    texts = [" ".join(f"w{t - 4}" for t in x) for x in counting(320, seed=1)]
    args = SFTConfig(**common_args(tmp_path), max_length=64, packing=packing, dataset_text_field="text")
    trainer = SFTTrainer(model=tiny_llama(), args=args, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=word_tokenizer())
    trainer.train()
    seen = losses(trainer)
    assert seen[-1] < 0.5 * seen[0], seen
    assert spies["attention"] > 0
