#!/usr/bin/env bash
# Everything that needs the GPU machine: install, compile matrix, GPU tests, compute-sanitizer,
# stress, benchmark. Logs and results go under $OUT (default: ./gpu_out). From the repository root:
#     bash bench/gpu_all.sh                      # every step
#     bash bench/gpu_all.sh install gpu_tests    # only these steps (a step list keeps each call short)
# Steps: env install compile gpu_tests memcheck racecheck stress bench. Each selected step runs even
# if an earlier one failed; the exit status is the number of failed steps.
set -u
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export COMMKIT_CACHE_DIR="${COMMKIT_CACHE_DIR:-$HOME/.cache/commkit}"
SELECTED=" ${*:-env install compile gpu_tests memcheck racecheck stress bench} "
failed=0
step() {  # step NAME TIMEOUT_S COMMAND...: run if selected, log to $OUT/NAME.txt, report status
    local name="$1" limit="$2"
    shift 2
    [[ "$SELECTED" == *" $name "* ]] || return 0
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name: rc=$rc ($((SECONDS - start)) s)" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
    tail -n 5 "$OUT/$name.txt"
}

step env 60 bash -c 'nvidia-smi; nvcc --version; python -c "import torch, cupy; print(torch.__version__, cupy.__version__)"'
step install 300 pip install --no-deps --no-build-isolation -e .
# Every kernel of the CI matrix (fills the JIT cache, records the ptxas figures)
step compile 600 env COMMKIT_PTXAS_TABLE="$OUT/ptxas_sm90.txt" python -m pytest -q -s tests/test_compile.py \
    tests/test_ptx.py tests/test_jit_cache.py tests/test_fp8_rule.py tests/test_protocol_model.py
step gpu_tests 900 python -m pytest -q -m gpu tests/gpu -rA
step memcheck 900 compute-sanitizer --tool memcheck --error-exitcode 1 python tests/gpu/run_small.py
step racecheck 900 compute-sanitizer --tool racecheck --error-exitcode 1 python tests/gpu/run_small.py
step stress 900 python tests/gpu/stress.py --rounds 1000
step bench 900 python tests/gpu/bench_kernels.py --out "$OUT/bench_kernels.json"
echo "failed steps: $failed" | tee -a "$OUT/summary.txt"
exit "$failed"
