#!/usr/bin/env bash
# The long run on a GPU machine, over several device calls: GPU tests, all three compute-sanitizer
# tools, stress, demo and every benchmark. The one-call check of main is bench/gpu_check.sh (run that
# first; this script is for when more device time is at hand). Warm the JIT cache on the CPU first
# (python -m commkit jit warm --out .jit-cache) and carry .jit-cache: it is used when present.
# Nothing is installed (the device has no network): the tree runs through PYTHONPATH, with $PYTHON
# (default python3). Logs and results go under $OUT (default: ./gpu_out). From the repository root:
#     bash bench/gpu_all.sh                      # every step (more than one 10-minute device call)
#     bash bench/gpu_all.sh install gpu_tests    # only these steps
# Steps: env install gpu_tests memcheck racecheck synccheck stress demo bench bench_nodes bench_kernels
# overlap tune
# (`sanitizers` selects memcheck racecheck synccheck).
# The device allows 10 minutes per call; suggested split into calls of < 10 minutes each:
#     1. bash bench/gpu_all.sh env install gpu_tests   (install: checks that the tree imports)
#     2. bash bench/gpu_all.sh sanitizers
#     3. bash bench/gpu_all.sh stress demo
#     4. bash bench/gpu_all.sh bench bench_kernels
#     5. bash bench/gpu_all.sh bench_nodes overlap tune
# Each step is capped at STEP_LIMIT seconds (<= 540) and at what is left of DEADLINE (seconds since
# this script started, default 570): a step that would not fit is not started and is recorded as
# "skipped: no time". Each selected step runs even if an earlier one failed; a summary line per step
# is printed as it ends and appended to $OUT/summary.txt; the exit status is the number of failed steps.
set -u
OUT="${OUT:-$PWD/gpu_out}"
DEADLINE="${DEADLINE:-570}"
STEP_LIMIT="${STEP_LIMIT:-540}"
MIN_STEP="${MIN_STEP:-30}"  # a step is not started with less time than this left
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${COMMKIT_CACHE_DIR:-}" && -d "$PWD/.jit-cache" ]]; then
    export COMMKIT_CACHE_DIR="$PWD/.jit-cache"
fi
export COMMKIT_CACHE_DIR="${COMMKIT_CACHE_DIR:-$HOME/.cache/commkit}"
SELECTED=" ${*:-env install gpu_tests sanitizers stress demo bench bench_nodes bench_kernels overlap tune} "
SELECTED="${SELECTED/ sanitizers / memcheck racecheck synccheck }"
SANITIZER="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
failed=0
summary() { echo "$1" | tee -a "$OUT/summary.txt"; }
step() {  # step NAME LIMIT_S COMMAND...: run if selected, log to $OUT/NAME.txt, report status
    local name="$1" limit="$2"
    shift 2
    [[ "$SELECTED" == *" $name "* ]] || return 0
    ((limit > STEP_LIMIT)) && limit=$STEP_LIMIT
    local left=$((DEADLINE - SECONDS))
    if ((left < MIN_STEP)); then
        echo "skipped: no time ($left s left of DEADLINE=$DEADLINE)" >"$OUT/$name.txt"
        summary "$name: skipped: no time ($left s left of DEADLINE=$DEADLINE s)"
        return 0
    fi
    ((limit > left)) && limit=$left
    local start=$SECONDS
    # NOTE: through bash -c, so that a step may be a shell function (exported below)
    timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    local note=""
    ((rc == 124 || rc == 137)) && note=" TIMEOUT after ${limit} s"
    summary "$name: rc=$rc ($((SECONDS - start)) s)$note"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
    tail -n 5 "$OUT/$name.txt"
}

record_env() {
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "commit: $(git rev-parse HEAD 2>/dev/null || echo "${COMMKIT_COMMIT:-unknown (no .git, COMMKIT_COMMIT unset)}")"
        nvidia-smi --query-gpu=name,driver_version --format=csv
        nvcc --version | tail -n 2
        "$PY" -c "import torch, cupy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cupy', cupy.__version__)"
        echo "compute-sanitizer: $SANITIZER"
    } >"$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
    nvidia-smi
}

export -f record_env
export PY OUT SANITIZER
step env 60 record_env
step install 60 "$PY" -c "import commkit, commkit.jit.warm; print('commkit from', commkit.__file__)"
step gpu_tests 540 "$PY" -m pytest -q -m gpu tests/gpu -rA
# compute-sanitizer on the small config (2 virtual ranks); no caching allocator, so that it sees every
# allocation's bounds.
step memcheck 300 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 1 \
    "$PY" tests/gpu/run_small.py
step racecheck 300 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool racecheck --error-exitcode 1 \
    "$PY" tests/gpu/run_small.py
step synccheck 300 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool synccheck --error-exitcode 1 \
    "$PY" tests/gpu/run_small.py
step stress 420 "$PY" tests/gpu/stress.py --rounds 1000 --max-seconds 360
step demo 120 "$PY" -m commkit demo
step bench 420 "$PY" -m commkit bench --virtual 8 --shape deepseek-v3 --num-sms 8 --num-sms 16 --reps 10 \
    --out "$OUT/bench" --no-progress
# Virtual nodes (2 x 4): the internode kernels, nvlink-domain hop; rows report RDMA vs flat bytes
step bench_nodes 240 "$PY" -m commkit bench --virtual 8 --ranks-per-node 4 --shape deepseek-v3 --num-sms 8 \
    --num-sms 16 --reps 10 --out "$OUT/bench_nodes" --no-progress
step bench_kernels 300 "$PY" tests/gpu/bench_kernels.py --out "$OUT/bench_kernels.json"
step overlap 300 "$PY" -m commkit overlap --virtual 8 --out "$OUT/overlap" --reps 5 --warmup 1
step tune 300 "$PY" -m commkit tune --virtual 8 --num-sms 4 --num-sms 8 --num-sms 16 --reps 5 --warmup 1 \
    --dry-run --out "$OUT/tune" --no-progress
summary "failed steps: $failed"
exit "$failed"
