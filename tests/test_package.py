"""The package layout: the kernels are their own distribution (kernels/, torch and triton only),
nothing of ours is importable as `kernels` from the repository root, and the console script runs."""

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("transformers", "peft", "bitsandbytes", "datasets")


def _run(code, cwd, python=sys.executable):
    return subprocess.run([python, "-c", code], cwd=cwd, capture_output=True, text=True, check=True)


def test_kernels_import_is_light(tmp_path):
    out = _run(
        "import sys, fasttune.kernels as k; "
        f"print(k.__file__); print(sorted(m for m in {HEAVY} if m in sys.modules))",
        tmp_path,
    )
    path, heavy = out.stdout.splitlines()
    assert path.endswith("kernels/src/fasttune/kernels/__init__.py")
    assert heavy == "[]", f"import fasttune.kernels pulled in {heavy}"


def test_repository_root_does_not_shadow_kernels():
    """Hugging Face's `kernels` package owns that import name. With the repository root on sys.path
    (cwd, as `python -c` and `python -m` put it there), `kernels` is HF's, or nothing, or at most the
    empty namespace Python makes of any folder: no module or name of ours, and transformers (which
    imports HF's package when it sees one) does not take it for an installed `kernels`."""
    code = """if True:
        import importlib, importlib.util as u, sys
        assert sys.path[0] == ""
        s = u.find_spec("kernels")
        if s is not None and s.origin is not None:   # a real package: must not be ours
            print("file", s.origin)
        elif s is not None:                          # a namespace of the kernels/ folder
            k = importlib.import_module("kernels")
            print("names", sorted(n for n in vars(k) if not n.startswith("__")))
            for sub in ("cross_entropy", "hf", "attention", "fasttune"):
                try:
                    importlib.import_module("kernels." + sub)
                    print("module", sub)
                except ImportError:
                    pass
            from transformers.utils.import_utils import is_kernels_available
            print("transformers sees kernels", is_kernels_available())
        import fasttune.kernels as ours
        print("ours", ours.__file__)
    """
    out = _run(code, ROOT).stdout.splitlines()
    assert not any(line.startswith(("module", "transformers sees kernels True")) for line in out), out
    assert "names []" in out or not any(line.startswith("names") for line in out), out
    assert not any(line.startswith("file " + str(ROOT / "kernels")) for line in out), out  # (.venv may be under ROOT)
    assert out[-1].startswith("ours ") and out[-1].endswith("kernels/src/fasttune/kernels/__init__.py")


def _closure(names):
    """The installed distributions `names` need (their requirements, recursively, markers evaluated)."""
    seen, todo = {}, list(names)
    while todo:
        # the newest copy on sys.path (this venv may hold an older setuptools than the one torch needs)
        dist = max(md.distributions(name=todo.pop()), key=lambda d: Version(d.version))
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen[key] = dist
        for r in map(Requirement, dist.requires or []):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return seen


@pytest.mark.slow
def test_kernels_install_alone(tmp_path):
    """`pip install ./kernels` into a fresh venv that sees torch, triton and their own dependencies only
    (symlinked from this environment into one folder, named by a .pth): it installs without fetching
    anything, and the kernels import and compute there, where transformers & co. do not exist."""
    deps = tmp_path / "deps"
    deps.mkdir()
    # setuptools: torch needs it, and so does the build; pip: the installer (the venv is made without one)
    for dist in _closure(["torch", "triton", "setuptools", "pip"]).values():
        for top in {f.parts[0] for f in dist.files if f.parts[0] not in ("..", "__pycache__") and f.suffix != ".pth"}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (deps / top).exists():
                (deps / top).symlink_to(src)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    py = str(tmp_path / "venv" / "bin" / "python")
    site = _run("import sysconfig; print(sysconfig.get_paths()['purelib'])", tmp_path, py).stdout.strip()
    Path(site, "deps.pth").write_text(str(deps) + "\n")
    assert _run(f"import importlib.util as u; print([m for m in {HEAVY + ('fasttune',)} if u.find_spec(m)])",
                tmp_path, py).stdout.strip() == "[]"

    pip = subprocess.run([py, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--disable-pip-version-check",
                          str(ROOT / "kernels")], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
    out = _run("""if True:
        import sys, torch
        from fasttune.kernels import fused_linear_cross_entropy, linear_logprobs, dpo_loss, grpo_loss, varlen_attention
        import fasttune.kernels.hf  # imports transformers only when apply() runs
        h, w = torch.randn(5, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
        y = torch.tensor([1, 2, 3, -100, 10])
        ref = torch.nn.functional.cross_entropy(h @ w.T, y)
        print(abs(fused_linear_cross_entropy(h, w, y).item() - ref.item()) < 1e-5 * abs(ref.item()))  # fp32 inside
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "peft", "bitsandbytes", "datasets")))
        import os, fasttune.kernels as k
        print(os.path.isfile(os.path.join(os.path.dirname(k.__file__), "gpu_spills.json")))  # _aot's baseline
        print(k.__file__)
    """, tmp_path, py).stdout.splitlines()
    assert out[:3] == ["True", "[]", "True"], out
    assert out[3].startswith(site), out  # the installed copy, not the source tree


def test_console_script(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fasttune.cli", "env"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "backend" in out.stdout
