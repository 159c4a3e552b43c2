"""Built-in models that need no download: `model.path = "builtin:tiny-llama"`.

The model is a small Llama-architecture causal LM from a config with seeded random weights. The
tokenizer is byte-level (every UTF-8 byte is a token, plus ChatML's special tokens), with a ChatML
chat template. Both are saved once to a cache folder ($FASTTUNE_CACHE, default ~/.cache/fasttune)
and then loaded through the same `from_pretrained` path as any real model.
"""

import os
import shutil
import tempfile
from pathlib import Path

SPECIALS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MODELS = {
    # name: (hidden, intermediate, layers, heads, kv heads)
    "tiny-llama": (128, 384, 4, 4, 2),  # multiples of 64: bitsandbytes CPU inference needs whole 4-bit blocks
}
VERSION = 3  # bump when what is built changes, so old caches are not reused


def cache_dir() -> Path:
    return Path(os.environ.get("FASTTUNE_CACHE", Path.home() / ".cache" / "fasttune"))


def byte_tokenizer():
    """A byte-level tokenizer with ChatML special tokens, built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token=None,
        unk_token=None, chat_template=CHAT_TEMPLATE, model_max_length=4096,
    )


def build(name: str, seed: int = 0) -> Path:
    """The folder of built-in model `name` (built on first use, atomically)."""
    if name not in MODELS:
        raise ValueError(f"unknown built-in model {name!r}; built-in: {', '.join('builtin:' + m for m in MODELS)}")
    folder = cache_dir() / f"{name}-v{VERSION}-seed{seed}"
    if (folder / "config.json").is_file():
        return folder
    import torch
    import transformers

    hidden, inter, layers, heads, kv = MODELS[name]
    tok = byte_tokenizer()
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
        tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        # Wider than the usual 0.02: LoRA leaves lm_head frozen, and with rows of norm ~0.2 against
        # RMS-normalized states of norm ~11 no logit could move far enough for the loss to fall much.
        initializer_range=0.1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process built it first
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve(path: str, seed: int = 0) -> str:
    """A model path as from_pretrained takes it: built-in names become their cache folder, and a .gguf
    file the folder it is converted into (fasttune/gguf_model.py)."""
    if path.startswith("builtin:"):
        return str(build(path.split(":", 1)[1], seed))
    from . import gguf_model

    if gguf_model.is_gguf(path):
        return gguf_model.resolve(path)
    return path
