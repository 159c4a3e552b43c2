"""The 4-bit copy of a QLoRA base (fasttune/quantized_cache.py): made by the first load, read by the next
ones, the same numbers either way, remade when damaged or when the model changes."""

import json
import os
import shutil

import bitsandbytes as bnb
import pytest
import torch

from fasttune import builtin
from fasttune.models import load_model
from test_train import config


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A config on a private copy of the built-in model, and an empty cache folder."""
    folder = tmp_path / "model"
    shutil.copytree(builtin.resolve("builtin:tiny-llama"), folder)
    monkeypatch.setenv("FASTTUNE_4BIT_CACHE", str(tmp_path / "cache"))
    return config(tmp_path, model={"path": str(folder)}), folder, tmp_path / "cache"


def _logits(model):
    ids = torch.tensor([[1, 5, 9, 42, 7, 3, 100, 11]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def _copies(cache):
    return sorted(p for p in cache.iterdir() if not p.name.startswith(".")) if cache.is_dir() else []


def _no_quantizing(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("quantized again instead of reading the 4-bit copy")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", refuse)


def test_the_second_load_reads_the_copy_and_gives_the_same_numbers(setup, monkeypatch, tmp_path):
    cfg, folder, cache = setup
    first = _logits(load_model(cfg))
    (copy,) = _copies(cache)
    assert (copy / "config.json").is_file() and "quantization_config" in json.loads((copy / "config.json").read_text())

    with monkeypatch.context() as m:
        _no_quantizing(m)
        model = load_model(cfg)
    assert torch.equal(_logits(model), first)
    assert model.get_base_model().config._name_or_path == str(folder)  # the real base, not the cache
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(folder)


def test_a_damaged_copy_is_made_again(setup, capfd):
    cfg, _, cache = setup
    first = _logits(load_model(cfg))
    (copy,) = _copies(cache)
    weights = copy / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    capfd.readouterr()

    assert torch.equal(_logits(load_model(cfg)), first)
    assert "does not load" in capfd.readouterr().err
    (again,) = _copies(cache)
    assert (again / "model.safetensors").stat().st_size == size


def test_a_changed_model_gets_a_new_copy(setup):
    cfg, folder, cache = setup
    load_model(cfg)
    st = (folder / "config.json").stat()
    os.utime(folder / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_model(cfg)
    assert len(_copies(cache)) == 2


def test_cache_4bit_false_quantizes_on_every_load(setup, tmp_path):
    _, folder, cache = setup
    cfg = config(tmp_path, model={"path": str(folder), "cache_4bit": False})
    load_model(cfg)
    assert _copies(cache) == []
