"""fasttune's cache ($FASTTUNE_CACHE, default ~/.cache/fasttune) and writing a model folder into it.

A folder is written into a temporary folder beside its place and renamed there when complete, so an
interrupted write leaves nothing half-made, and two processes making the same folder (two ranks) do
not mix their files: the first rename wins.
"""

import os
import shutil
import tempfile
from pathlib import Path


def root() -> Path:
    return Path(os.environ.get("FASTTUNE_CACHE") or Path.home() / ".cache" / "fasttune")


def publish(out: Path, make) -> bool:
    """make(tmp) into a temporary folder, then rename it to the model folder `out`; False if another
    process made `out` first. The folder gets the user's usual permissions (the cache is as shareable as
    their files), not mkdtemp's private ones."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        make(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for f in [tmp, *tmp.iterdir()]:
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
        try:
            tmp.rename(out)
        except OSError:  # another process made it first
            if not (out / "config.json").is_file():
                raise
            return False
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
