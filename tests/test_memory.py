"""A loaded model keeps no tensor in the checkpoint's memory map (fasttune/memory.py): else every page
read while loading stays resident for the whole run."""

import gc
from pathlib import Path

import torch

from fasttune.models import load_model
from test_train import config


def _mapped(folder) -> list[str]:
    folder = str(Path(folder).resolve())
    return [line.split()[-1] for line in open("/proc/self/maps") if folder in line and line.rstrip().endswith(".safetensors")]


def test_qlora_model_leaves_the_checkpoint_unmapped(tmp_path):
    from fasttune import builtin

    cfg = config(tmp_path)
    folder = builtin.resolve(cfg.model.path)
    model = load_model(cfg)
    gc.collect()
    assert not _mapped(folder), _mapped(folder)
    # and it still trains: the copied tensors are the ones the model uses (tied head = embeddings)
    base = model.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight or not base.config.tie_word_embeddings
    ids = torch.randint(1, 200, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
