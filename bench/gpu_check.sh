#!/usr/bin/env bash
# bench/gpu_check.sh OUTDIR: everything a lent GPU should run, in one command, well inside 10 minutes.
#
#   1. installs the peers that travel as wheels in .whl/ (`make gpu-wheels` fetches them here);
#   2. makes fasttune importable (editable install, no downloads);
#   3. runs the whole test suite on CUDA (real Triton kernels, gpu-marked tests included);
#   4. runs the GPU benchmark suite; a missing peer is skipped and says so;
#   5. leaves in OUTDIR: env.txt, tests.log, bench.log and the results JSON to commit to bench/results/.
#
# Each step has its own time limit; a failing step is reported and the next one still runs.
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 BENCH_SAVE=1
PY=${PYTHON:-python3}
status=0

if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
        || echo "wheel install failed; peers that needed them will be skipped" | tee -a "$OUT/env.txt"
fi
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
    || { echo "pip install -e . failed (see install.log)"; status=1; }

{ nvidia-smi -L; $PY -m fasttune.cli env; $PY -m pip list 2>/dev/null | grep -iE "torch|triton|transformers|peft|bitsandbytes|liger|cut.cross|flash|pytest"; } \
    >>"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Most valuable first, within one 10-minute call: the kernels' tests (compiled Triton), their
# benchmarks, then the rest of the suite (integration, trainer) with the time left.
KERNEL_TESTS="tests/test_gpu.py tests/test_cross_entropy.py tests/test_logprobs.py tests/test_attention.py"
echo "== kernel tests on CUDA"
timeout 170 $PY -m pytest $KERNEL_TESTS -q -p no:cacheprovider >"$OUT/tests.log" 2>&1 || status=1
tail -5 "$OUT/tests.log"

echo "== benchmarks on CUDA"
timeout 300 $PY -m pytest bench -q -p no:cacheprovider --benchmark-columns=median,min,rounds >"$OUT/bench.log" 2>&1 || status=1
sed -n '/fasttune benchmark results/,$p' "$OUT/bench.log"
cp bench/results/*.json "$OUT/" 2>/dev/null

echo "== the other tests on CUDA"
timeout 100 $PY -m pytest tests -q -p no:cacheprovider $(for f in $KERNEL_TESTS; do echo --ignore="$f"; done) \
    >"$OUT/tests_rest.log" 2>&1 || status=1
tail -5 "$OUT/tests_rest.log"
exit $status
