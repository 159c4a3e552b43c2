"""`model.path = "model.gguf"`: a GGUF file, converted once into an ordinary transformers folder.

transformers reads GGUF files (llama.cpp's format) through the `gguf` package, dequantizing every
tensor: ~20 s and a few times the model's fp32 size in memory for SmolLM2-135M, on every load. So
the first load converts the file into a cache folder, `$FASTTUNE_CACHE/gguf/<stem>-<key>/` (default
~/.cache/fasttune/gguf), with the weights dequantized to fp32 safetensors and the tokenizer and its
chat template as the file has them; every later load (training, eval, generate, merge) reads that
folder, and QLoRA quantizes it to NF4 as it would any model. The key is a hash of the file's
absolute path, size and modification time: a file replaced in place gets a new folder; a copy
elsewhere is converted again. The folder is written into a temporary folder and renamed, so an
interrupted conversion leaves nothing half-written; delete the cache folder to reclaim the disk.
"""

import hashlib
import sys
from pathlib import Path

from . import cache
from .config import ConfigError

MAGIC = b"GGUF"


def is_gguf(path) -> bool:
    return str(path).lower().endswith(".gguf")


def cache_root() -> Path:
    return cache.root() / "gguf"


def _checked(path: str) -> Path:
    """The file, or one line saying why it cannot be used."""
    p = Path(path).expanduser()
    where = f"model.path = {path!r}"
    if not p.exists():
        raise ConfigError(f"{where}: no such file; give the path of a .gguf model file")
    if not p.is_file():
        raise ConfigError(f"{where}: not a file; give the path of a .gguf model file")
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ConfigError(f"{where}: cannot be read ({e.strerror or e}); check its permissions") from None
    if head != MAGIC:
        raise ConfigError(f"{where}: not a GGUF file (it does not start with the GGUF magic bytes)")
    return p


def folder_for(path: str) -> Path:
    """The cache folder of the GGUF file at `path` (whether converted yet or not)."""
    p = _checked(path)
    st = p.stat()
    key = hashlib.sha256(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / f"{p.stem}-{key}"


def resolve(path: str) -> str:
    """The transformers folder of the GGUF file at `path`, converting it the first time."""
    out = folder_for(path)
    if (out / "config.json").is_file():
        return str(out)
    print(f"fasttune: converting {path} once into {out} (dequantized to fp32; later loads read that folder)",
          file=sys.stderr, flush=True)
    cache.publish(out, lambda tmp: _convert(Path(path).expanduser(), tmp, path))
    return str(out)


def _convert(p: Path, dest: Path, given: str):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    def first_line(e):
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]

    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
    except Exception as e:  # noqa: BLE001 - the gguf reader raises ValueError, KeyError, IndexError, ...
        raise ConfigError(f"model.path = {given!r}: transformers cannot load this GGUF file "
                          f"(unsupported architecture, or a truncated or damaged file): {first_line(e)}") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    # Dequantized, it is a plain model: saved as one, without the GGUF loader's quantization settings.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
