"""Ahead-of-time compile check: build every Triton kernel variant the launchers can pick for real
GPU targets, without a GPU (ptxas ships inside the triton wheel).

    python -m fasttune.kernels._aot [--arch 80 --arch 90] [--report FILE] [--jobs N]

Triton's interpreter runs Python and accepts code the compiler rejects, so this is the check that
the kernels build at all. Each variant is built as Triton's launcher specializes a real call
(pointers and strides divisible by 16), and the default tiles of the loss kernel once more without
that (`builds`). For each build it records shared memory (from Triton's metadata) and registers,
stack and spills (cuobjdump's resource usage of the cubin, the figures `ptxas -v` prints). It fails
on a compile error, on shared memory above the architecture's per-block limit,
on a default tile (the one the launcher takes before autotuning) over the 99 KiB of sm_86/sm_89,
and on a build that spills more than kernels/gpu_spills.json records for it (nothing, for a build
it does not list): a tile or kernel change that starts to spill fails here, and a spill we accept
is written down there (`--write-baseline`).

Must run with TRITON_INTERPRET unset: under the interpreter @triton.jit returns objects that
cannot be compiled.
"""

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

# Per-block shared memory limits (opt-in maximum) in bytes, from the CUDA programming guide.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
MIN_SHARED = min(SHARED_LIMIT.values())


def variants():
    """(name, kernel, signature, constexprs, num_warps, num_stages, is_default) over every module."""
    for name in ("attention", "cross_entropy"):  # by path: the package exports functions of these names
        yield from importlib.import_module(f".{name}", __package__).gpu_variants()


def _resources(cubin: bytes) -> dict:
    """Registers, stack and local memory (spills) of the one function in a cubin."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    return {"regs": int(m.group(1)), "stack": int(m.group(2)), "local": int(m.group(3))}


def _aligned(fn, signature) -> dict:
    """The specialization Triton's launcher gives a real call: every pointer (torch allocations are
    256-byte aligned) and every stride (a head dim or a vocabulary that is a multiple of 16) divisible
    by 16, as `tt.divisibility` attributes. Without them a build is not what runs on a GPU: it uses
    narrower loads, more registers and less shared memory."""
    return {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params)
            if signature[p.name].startswith("*") or p.name.startswith(("s_", "stride")) or p.name.endswith("_stride")}


# Kernels whose strides are often not multiples of 16: the loss kernel's row stride is the vocabulary
# (32001, 50257). Attention's strides are head dims times heads, multiples of 16 for every table dim.
UNALIGNED = ("ce_rows",)


def builds():
    """(variant index, aligned): the aligned build of every variant, and an unaligned one of each
    default tile of the UNALIGNED kernels."""
    out = []
    for i, v in enumerate(variants()):
        out.append((i, True))
        if v[6] and v[0].startswith(UNALIGNED):
            out.append((i, False))
    return out


def _compile_one(job):
    (index, aligned), arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, fn, signature, constexprs, warps, stages, default = list(variants())[index]
    names = [p.name for p in fn.params]
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=_aligned(fn, signature) if aligned else None)
    name = name if aligned else name + " unaligned"
    row = {"name": name, "arch": arch, "warps": warps, "stages": stages, "default": default and aligned}
    t = time.time()
    try:
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    except Exception as e:  # a compile error is a result to report, not a crash of the check
        row["error"] = f"{type(e).__name__}: {str(e).strip()[:2000]}"
        return row
    row.update(shared=k.metadata.shared, seconds=round(time.time() - t, 2), **_resources(k.asm["cubin"]))
    return row


def key(row) -> str:
    return f"{row['name']} sm_{row['arch']}"


def problems(row, spills: dict) -> list[str]:
    """What is wrong with one build: a compile error, too much shared memory, or more spilled bytes
    (stack + local per thread) than the recorded baseline `spills` allows (0 for a build it lacks)."""
    if "error" in row:
        return [row["error"]]
    out = []
    if row["shared"] > SHARED_LIMIT[row["arch"]]:
        out.append(f"{row['shared']} B of shared memory, over sm_{row['arch']}'s {SHARED_LIMIT[row['arch']]}")
    if row["default"] and row["shared"] > MIN_SHARED:
        out.append(f"default tile needs {row['shared']} B of shared memory, over the {MIN_SHARED} of sm_86/sm_89")
    spill = row["stack"] + row["local"]
    if spill > spills.get(key(row), 0):
        out.append(f"spills {spill} B per thread, baseline {spills.get(key(row), 0)} B "
                   "(pick a smaller tile or more warps; or accept it with --write-baseline)")
    return out


def check(archs=(80, 90), jobs=None) -> list[dict]:
    work = [(b, a) for a in archs for b in builds()]
    with ProcessPoolExecutor(jobs or os.cpu_count()) as pool:
        return list(pool.map(_compile_one, work, chunksize=4))


def report(rows, spills) -> str:
    lines = [f"{'build':<58} {'arch':>5} {'shared':>7} {'regs':>4} {'spill':>6}  problems"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<58} sm_{r['arch']:<2}  COMPILE ERROR  {r['error'].splitlines()[0][:80]}")
            continue
        flag = "; ".join(problems(r, spills))
        name = r["name"] + (" *" if r["default"] else "")
        lines.append(f"{name:<58} sm_{r['arch']:<2} {r['shared']:>7} {r['regs']:>4} {r['stack'] + r['local']:>6}  {flag}")
    return "\n".join(lines) + "\n(* the default tile; spill = stack + local bytes per thread)\n"


BASELINE = os.path.join(os.path.dirname(__file__), "gpu_spills.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="sm number; default 80 and 90")
    ap.add_argument("--report", help="write the table of builds here")
    ap.add_argument("--jobs", type=int)
    ap.add_argument("--write-baseline", action="store_true", help=f"record today's spills in {BASELINE}")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    t = time.time()
    rows = check(tuple(args.arch or (80, 90)), args.jobs)
    if args.write_baseline:
        with open(BASELINE, "w") as f:
            json.dump({key(r): r["stack"] + r["local"] for r in rows if r.get("stack", 0) + r.get("local", 0)},
                      f, indent=1, sort_keys=True)
    with open(BASELINE) as f:
        spills = json.load(f)
    if args.report:
        with open(args.report, "w") as f:
            f.write(report(rows, spills))
    bad = [(r, p) for r in rows for p in problems(r, spills)]
    for r, p in bad:
        print(f"FAIL {key(r)}: {p}", file=sys.stderr)
    print(f"{len(rows)} builds in {time.time() - t:.0f} s, {len(bad)} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
