"""The QLoRA base, quantized once: a 4-bit copy of a local model folder, read instead of the original.

Quantizing on load means reading every weight at full precision first: for SmolLM2-135M on the CPU,
3.7 s and a peak of 1.1 GB resident for a 538 MB fp32 file, on every run. The first QLoRA load of a
folder saves the quantized model (bitsandbytes' own serialization, through `save_pretrained`) into
`$FASTTUNE_CACHE/4bit/<name>-<key>/` (or `$FASTTUNE_4BIT_CACHE/...`); every later load reads that folder: 0.3 s and the 4-bit
weights only (161 MB for SmolLM2, whose tied embeddings stay fp32). The weights are the very bytes
the quantizer made, so training and evaluation give the same numbers either way (tested).

The key is a hash of the folder's absolute path and its files' names, sizes and modification times,
the quantization settings, the load dtype, and the transformers and bitsandbytes versions: a changed
checkpoint or an upgrade makes a new copy. The copy is written into a temporary folder and renamed,
so an interrupted save leaves nothing; a copy that no longer loads is removed and made again. Hub ids
and models with their own code are quantized on load as before. `model.cache_4bit = false` turns
this off; delete the folder to reclaim the disk.
"""

import hashlib
import os
import shutil
import sys
from pathlib import Path

from . import cache


def cache_root() -> Path:
    """$FASTTUNE_4BIT_CACHE, else $FASTTUNE_CACHE/4bit (default ~/.cache/fasttune/4bit)."""
    if os.environ.get("FASTTUNE_4BIT_CACHE"):
        return Path(os.environ["FASTTUNE_4BIT_CACHE"])
    return cache.root() / "4bit"


def folder_for(path: str, settings: dict) -> Path | None:
    """The cache folder of the model folder `path` quantized with `settings` (None: not cacheable)."""
    src = Path(path)
    if not src.is_dir() or not (src / "config.json").is_file():
        return None
    import bitsandbytes
    import transformers

    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in src.iterdir() if f.is_file())
    what = [str(src.resolve()), files, sorted(settings.items()), transformers.__version__, bitsandbytes.__version__]
    key = hashlib.sha256(repr(what).encode()).hexdigest()[:16]
    return cache_root() / f"{src.resolve().name}-{key}"


def load(path: str, settings: dict, load_from):
    """The model of folder `path` quantized with `settings`: `load_from(folder, quantize)` on the cached
    copy (quantize=False) if there is one that loads, else on `path` (quantize=True), saving the result
    as the cached copy. The model's name stays `path`, so adapters saved from it name the real base."""
    out = folder_for(path, settings)
    if out is None:
        return load_from(path, True)
    if (out / "config.json").is_file():
        try:
            model = load_from(str(out), False)
        except Exception as e:  # noqa: BLE001 - a damaged copy: any loader error means "make it again"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            print(f"fasttune: the 4-bit copy {out} does not load ({first}); quantizing {path} again",
                  file=sys.stderr, flush=True)
            shutil.rmtree(out, ignore_errors=True)
        else:
            _rename(model, path)
            return model
    model = load_from(path, True)
    _save(model, out)
    return model


def _rename(model, path):
    model.name_or_path = model.config._name_or_path = str(path)


def _save(model, out: Path):
    """Save the quantized `model` as `out`; a failure (disk full) only costs the cache."""
    try:
        if cache.publish(out, model.save_pretrained):
            print(f"fasttune: saved the 4-bit base to {out}; later runs load it instead of quantizing "
                  "(model.cache_4bit = false turns this off)", file=sys.stderr, flush=True)
    except OSError as e:
        print(f"fasttune: could not save the 4-bit base to {out} ({e.strerror or e}); quantizing on every load",
              file=sys.stderr, flush=True)
