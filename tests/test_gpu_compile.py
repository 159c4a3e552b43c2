"""Every Triton kernel variant compiles for real GPUs, checked on the CPU with Triton's own compiler.

The interpreter that runs the kernels in the other tests executes Python and accepts code the
compiler rejects (a module global read inside @triton.jit code, say), so this is what proves the
kernels build. `python -m fasttune.kernels._aot` compiles, for sm_80 and sm_90, every entry of
each kernel's launch table (attention: fp32/bf16/fp16 × head dims 32, 64, 80, 96, 128, 192, 256 ×
every tile of the pass; the row kernel of the losses: each dtype × vocabulary tile ×
softcap/gradient/entropy switch), specialized as Triton's launcher specializes a real call
(pointers and strides divisible by 16), and the loss kernel's default tiles once more unaligned
(a vocabulary of 32001). sm_86/sm_89 build the same Ampere code as sm_80, so their smaller shared memory (99 KiB)
is checked on the sm_80 builds of the default tiles. The compile runs in a subprocess: under the
interpreter (set by conftest.py) @triton.jit returns objects that cannot be compiled.
"""

import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def test_every_variant_compiles_for_sm80_and_sm90(tmp_path):
    report = tmp_path / "compile-report.txt"
    out = subprocess.run(
        [sys.executable, "-m", "fasttune.kernels._aot", "--arch", "80", "--arch", "90", "--report", str(report)],
        capture_output=True, text=True, env=_env(), timeout=1200,
    )
    text = report.read_text() if report.exists() else ""
    print(text)  # the registers / spills table, in the test log
    assert out.returncode == 0, out.stderr[-6000:] + out.stdout[-2000:]
    # every launch-table entry was built, for both architectures
    for kind in ("attention.fwd", "attention.dq", "attention.dkdv", "attention.delta", "ce_rows"):
        assert f"{kind} " in text
    assert text.count(" sm_80 ") == text.count(" sm_90 ") >= 250
    assert " unaligned " in text and "D=192 " in text and "D=32 " in text


def test_the_check_flags_errors_shared_memory_and_new_spills():
    from fasttune.kernels._aot import problems

    ok = {"name": "k", "arch": 80, "default": False, "shared": 1024, "stack": 0, "local": 0}
    assert problems(ok, {}) == []
    assert "COMPILE" in problems({**ok, "error": "COMPILE failed"}, {})[0]
    assert "over sm_80's" in problems({**ok, "shared": 200 * 1024}, {})[0]
    assert "over the 101376 of sm_86/sm_89" in problems({**ok, "default": True, "shared": 120 * 1024}, {})[0]
    assert "spills 8 B per thread, baseline 0 B" in problems({**ok, "local": 8}, {})[0]
    assert problems({**ok, "local": 8}, {"k sm_80": 8}) == []


def test_the_check_catches_what_the_interpreter_accepts(tmp_path):
    """A kernel that reads a plain module global runs under the interpreter but must fail to
    compile: the bug (LOG2E) that kept every attention kernel from building on a GPU."""
    src = tmp_path / "bad_kernel.py"
    src.write_text(textwrap.dedent('''
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        SCALE = 1.4426950408889634

        @triton.jit
        def k(x_ptr, BLOCK: tl.constexpr):
            i = tl.arange(0, BLOCK)
            tl.store(x_ptr + i, tl.load(x_ptr + i) * SCALE)

        try:
            triton.compile(ASTSource(fn=k, signature={"x_ptr": "*fp32", "BLOCK": "constexpr"},
                                     constexprs={(1,): 16}), target=GPUTarget("cuda", 90, 32))
        except Exception as e:
            print("REJECTED", type(e).__name__, e)
        else:
            print("COMPILED")
    '''))
    out = subprocess.run([sys.executable, str(src)], capture_output=True, text=True, env=_env(), timeout=300)
    assert "REJECTED" in out.stdout and "global" in out.stdout, out.stdout + out.stderr
