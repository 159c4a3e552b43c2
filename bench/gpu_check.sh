#!/usr/bin/env bash
# bench/gpu_check.sh OUTDIR: everything a lent GPU should run, in one command, inside one 10-minute call.
#
# Stages, most important figures first; each has its own time limit and none may run past the
# overall budget (GPU_CHECK_BUDGET, default 530 s), so the script always returns in time:
#   setup         peers from the wheels in .whl/ (`make gpu-wheels`), fasttune installed editable, env.txt
#   kernel_tests  the kernels' tests on CUDA (compiled Triton, gpu-marked tests included)
#   e2e_1b        QLoRA SFT step, Llama-3.2-1B shape, 4096-token rows: fasttune vs HF+PEFT+bnb vs Liger
#   e2e_8b        the same at the Llama-3-8B shape
#   kernel_bench  the kernel benchmarks (pytest bench, without the end-to-end smoke file)
#   e2e_rl        DPO and GRPO steps, Llama-3.2-1B shape
#   the rest      torchrun with one process (DDP on the GPU), 8192-token rows, Qwen2.5-7B, the end-to-end smoke tests, the remaining test suite
# Results are appended as JSON lines the moment each is measured (OUTDIR/e2e.jsonl, OUTDIR/bench.jsonl),
# so a stage that times out loses only what it had not measured yet. Every stage logs to OUTDIR/NAME.log;
# OUTDIR/summary.txt has one line per stage (exit code, seconds), OUTDIR/tables.md the results as tables.
# A missing peer (liger-kernel, cut-cross-entropy) is skipped and says so; a failing stage does not stop the next.
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 BENCH_SAVE=1
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-530}
START=$SECONDS
status=0

# stage NAME LIMIT COMMAND...: COMMAND with at most LIMIT seconds (less if the budget has less left),
# stdin closed, output in OUT/NAME.log; killed 5 s after the polite signal if it ignores it.
stage() {
    local name=$1 limit=$2 left rc t0
    shift 2
    left=$(( BUDGET - (SECONDS - START) - 5 ))
    if (( left < 20 )); then
        echo "$name: not run, the budget is spent" | tee -a "$OUT/summary.txt"
        return
    fi
    (( limit > left )) && limit=$left
    echo "== $name (at most ${limit}s)"
    t0=$SECONDS
    timeout -k 5 "$limit" "$@" </dev/null >"$OUT/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc after $(( SECONDS - t0 ))s$( (( rc == 124 || rc == 137 )) && echo ' (timed out)')" \
        | tee -a "$OUT/summary.txt"
    tail -n 12 "$OUT/$name.log"
    (( rc != 0 )) && status=1
}

e2e() {  # e2e NAME LIMIT MODEL CASES
    stage "$1" "$2" $PY bench/e2e.py --out "$OUT/e2e.jsonl" --model "$3" --cases "$4"
}

# ---- setup ------------------------------------------------------------------------------------
if ls .whl/*.whl >/dev/null 2>&1; then
    if timeout 90 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >"$OUT/wheels.log" 2>&1; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "wheel install failed (wheels.log); the peers that needed them will be skipped" | tee -a "$OUT/summary.txt"
    fi
else
    echo "no wheels in .whl/ (make gpu-wheels); liger-kernel, cut-cross-entropy and bitsandbytes only if installed" \
        | tee -a "$OUT/summary.txt"
fi
timeout 90 $PY -m pip install -q --no-deps --no-build-isolation --no-index -e ./kernels -e . >"$OUT/install.log" 2>&1 \
    || { echo "pip install -e ./kernels -e . failed (install.log)" | tee -a "$OUT/summary.txt"; status=1; }
{ timeout 20 nvidia-smi -L; timeout 60 $PY -m fasttune.cli env
  timeout 30 $PY -m pip list 2>/dev/null | grep -iE "torch|triton|transformers|peft|bitsandbytes|liger|cut.cross|flash|pytest"
} >>"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# ---- the most important figures first -----------------------------------------------------------
KERNEL_TESTS="tests/test_gpu.py tests/test_cross_entropy.py tests/test_logprobs.py tests/test_attention.py tests/test_kto.py"
stage kernel_tests 80 $PY -m pytest $KERNEL_TESTS -q -p no:cacheprovider
e2e e2e_1b 80 llama-3.2-1b sft:4096
e2e e2e_8b 120 llama-3-8b sft:4096
BENCH_JSONL="$OUT/bench.jsonl" stage kernel_bench 100 \
    $PY -m pytest bench -q -p no:cacheprovider --ignore=bench/test_bench_e2e.py --benchmark-columns=median,min,rounds
cp bench/results/*.json "$OUT/" 2>/dev/null
e2e e2e_rl 70 llama-3.2-1b dpo,grpo

# ---- the rest, with the time left ------------------------------------------------------------------
# torchrun with one process: the launcher, NCCL and DDP on the GPU (QLoRA SFT demo, 30 steps)
stage torchrun_ws1 60 $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m fasttune sft examples/sft.toml \
    --set train.max_steps=30 --set "run.output_dir=\"$OUT/torchrun_ws1\"" --set 'data.eval=""'
e2e e2e_1b_8k 50 llama-3.2-1b sft:8192
e2e e2e_8b_8k 90 llama-3-8b sft:8192
e2e e2e_qwen 100 qwen2.5-7b sft:4096,sft:8192
BENCH_JSONL="$OUT/e2e_smoke.jsonl" stage e2e_smoke 60 $PY -m pytest bench/test_bench_e2e.py -q -p no:cacheprovider -rs
stage tests_rest 100 $PY -m pytest tests -q -p no:cacheprovider $(for f in $KERNEL_TESTS; do echo --ignore="$f"; done)

timeout 30 $PY bench/report.py "$OUT"/*.jsonl >"$OUT/tables.md" 2>&1
cat "$OUT/summary.txt"
echo "gpu_check: $(( SECONDS - START ))s, exit $status"
exit $status
