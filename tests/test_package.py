"""The package layout: fasttune.kernels stays light, and the console script runs."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code, tmp_path):
    # From an empty folder: the repository root on sys.path would shadow HF's `kernels` package.
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)


def test_kernels_import_is_light(tmp_path):
    out = _run(
        "import sys, fasttune.kernels as k; "
        "print(k.__file__); print(sorted(m for m in ('transformers', 'peft', 'bitsandbytes') if m in sys.modules))",
        tmp_path,
    )
    path, heavy = out.stdout.splitlines()
    assert path.endswith("kernels/__init__.py")
    assert heavy == "[]", f"import fasttune.kernels pulled in {heavy}"


def test_top_level_kernels_name_is_not_ours(tmp_path):
    """Hugging Face's `kernels` package owns that import name; ours must not take it."""
    out = _run("import importlib.util as u; s = u.find_spec('kernels'); print(s and s.origin)", tmp_path)
    assert not out.stdout.strip().startswith(str(ROOT)), out.stdout


def test_console_script(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fasttune.cli", "env"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "backend" in out.stdout
