#!/usr/bin/env bash
# The GPU check of main in ONE device call of under 8 minutes (issue 13). From the repository root:
#     python -m commkit jit warm --out .jit-cache   # on the CPU first: every kernel compiled ahead
#     bash bench/gpu_check.sh --dry-run             # steps, budgets, predictions, cached kernels
#     bash bench/gpu_check.sh                       # on the GPU machine (carry .jit-cache)
#     python bench/collect_results.py OUT_DIR       # then, here: bench/results/<date>-<gpu>/
# Options: --dry-run (or DRY_RUN=1), --only STEP[,STEP...], --skip STEP[,STEP...], --deadline SECONDS
# (default 465, at most 570), --out DIR (default $OUT, else ./gpu_out), -h/--help.
# STEP is a step name below or gpu_tests (the four tests_* steps).
#
# Steps, in order of value; each runs under its own deadline (`timeout`, its budget in seconds, and
# never past --deadline), so a slow step cannot eat the next; every selected step runs even if an
# earlier one failed; stress gets what is left. A step that would start with less than MIN_STEP
# seconds left is "SKIPPED: no time". BUDGET_<step>=S overrides a budget (e.g. BUDGET_bench=90).
#   env                GPU, driver, SMs, nvcc, torch, CuPy, NCCL, commit -> env.txt
#   jit                the warmed cache (.jit-cache): both nvcc versions; the misses compiled in parallel
#   tests_kernels      tests/gpu/test_kernels_gpu.py          (one pytest process per file: a device
#   tests_backend      tests/gpu/test_kernels_backend_gpu.py   trap poisons the CUDA context of the
#   tests_count        tests/gpu/test_count_exchange_gpu.py    whole process; per-test timeouts with
#   tests_fabric       tests/gpu/test_fabric_gpu.py            pytest-timeout)
#   nodes              tests/gpu/test_internode_gpu.py (virtual nodes 2x2, 4x2, 2x4)
#   bench              8 virtual ranks, DeepSeek-V3, bf16 and FP8, 16 and 24 SMs: vs a copy kernel on
#                      the same SMs, vs torch ops, and (bench/d2d_ratio.py) vs a device-to-device copy
#   overlap            GEMM throughput alongside 20 communication SMs (4 virtual ranks x 5 SMs)
#   memcheck           compute-sanitizer memcheck on tests/gpu/run_small.py (a refusal is recorded)
#   stress             tests/gpu/stress.py rounds until the deadline
# Outputs ($OUT, at most 8 files, no folders): summary.txt (a line per step), env.txt, log.txt (every
# step's output), bench.json and bench.png, overlap.json and overlap.png. Exit status: failed steps.
# The device has no network: nothing is installed; the tree is used through PYTHONPATH.
# Test hook: GPU_CHECK_TEST_CMD replaces every step's command (tests/test_gpu_check.py).
set -u
cd "$(dirname "$0")/.." || exit 2
REPO="$PWD"

STEPS="env jit tests_kernels tests_backend tests_count tests_fabric nodes bench overlap memcheck stress"
declare -A BUDGET=([env]=12 [jit]=40 [tests_kernels]=95 [tests_backend]=30 [tests_count]=20 [tests_fabric]=12
    [nodes]=75 [bench]=60 [overlap]=30 [memcheck]=40 [stress]=0)
# Predicted seconds and why (printed by --dry-run; stress takes the rest)
declare -A PREDICT=([env]=8 [jit]=5 [tests_kernels]=60 [tests_backend]=15 [tests_count]=10 [tests_fabric]=6
    [nodes]=55 [bench]=40 [overlap]=20 [memcheck]=35 [stress]=0)
declare -A WHY=(
    [env]="nvidia-smi ~1 s; python imports torch and CuPy and starts CUDA ~5 s"
    [jit]="all hits: 90 instantiations hashed, 0.5 s + imports (measured here); another nvcc: all miss, 90 / 16 workers x 1.5-3.7 s ~20-30 s"
    [tests_kernels]="CPU references ~25 s (measured on 2 CPU cores; the 8x7168 cases 4-12 s), 2 trap subprocesses ~6 s each, imports 5 s"
    [tests_backend]="NCCL world of one ~3 s, 4 small tests (300 tokens, one rank)"
    [tests_count]="NCCL world of one, 3 tiny tests"
    [tests_fabric]="NVML/driver queries only"
    [nodes]="CPU references ~25 s (measured on 2 cores) + role splits 8 x ~2 s, then a 200-round stress"
    [bench]="2 of 4 configs run (8 x 24 = 192 blocks do not fit under 192 SMs: skipped), each 13 reps + torch ops + copy roofline; d2d ~3 s"
    [overlap]="one budget (4 ranks x 5 SMs), GEMMs alone and alongside"
    [memcheck]="sanitizer start and torch init under memcheck dominate; 3 tiny runs"
    [stress]="the rest of the deadline: ~10 s to prepare 7 cases, then rounds until --max-seconds (the budget less 20 s)"
)
declare -A WARM_STEP=([tests_kernels]=gpu_tests [tests_backend]=gpu_tests [nodes]=nodes [bench]=bench
    [overlap]=overlap [memcheck]=memcheck [stress]=stress)
MIN_STEP="${MIN_STEP:-10}"
TAIL_RESERVE=8  # seconds kept after stress for the summary

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check.sh: $1" >&2; echo "usage: bash bench/gpu_check.sh [--dry-run] [--only STEPS] [--skip STEPS] [--deadline S] [--out DIR] (--help)" >&2; exit 2; }

expand_steps() {  # "a,b" -> "a b" with gpu_tests expanded; dies on an unknown name
    local item out=""
    for item in ${1//,/ }; do
        if [[ "$item" == gpu_tests ]]; then
            out+=" tests_kernels tests_backend tests_count tests_fabric"
        elif [[ " $STEPS " == *" $item "* ]]; then
            out+=" $item"
        else
            die "unknown step '$item' (steps: $STEPS; gpu_tests = the four tests_* steps)"
        fi
    done
    [[ -n "$out" ]] || die "empty step list"
    echo "$out"
}

DRY_RUN="${DRY_RUN:-0}"
DEADLINE=465
ONLY=""
SKIP=""
OUT="${OUT:-$REPO/gpu_out}"
while (($#)); do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --only | --skip | --deadline | --out)
            (($# >= 2)) || die "$1 needs a value"
            case "$1" in
                --only) ONLY="$(expand_steps "$2")" || exit 2 ;;
                --skip) SKIP="$(expand_steps "$2")" || exit 2 ;;
                --deadline) DEADLINE="$2" ;;
                --out) OUT="$2" ;;
            esac
            shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument '$1'" ;;
    esac
    shift
done
[[ "$DEADLINE" =~ ^[0-9]+$ ]] || die "--deadline: expected whole seconds, got '$DEADLINE'"
((DEADLINE >= 30 && DEADLINE <= 570)) || die "--deadline: expected 30 to 570 seconds (one device command runs at most 600), got $DEADLINE"
for s in $STEPS; do
    var="BUDGET_$s"
    if [[ -n "${!var:-}" ]]; then
        [[ "${!var}" =~ ^[0-9]+$ ]] || die "$var: expected whole seconds, got '${!var}'"
        BUDGET[$s]="${!var}"
    fi
done
SELECTED=""
for s in $STEPS; do
    [[ -z "$ONLY" || " $ONLY " == *" $s "* ]] || continue
    [[ " $SKIP " == *" $s "* ]] && continue
    SELECTED+=" $s"
done
[[ -n "$SELECTED" ]] || die "no step selected"

# Python: $PYTHON, else the first of python3, python that imports torch (the device has python3)
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    for c in python3 python; do
        if command -v "$c" >/dev/null && "$c" -c "import torch" >/dev/null 2>&1; then PY="$c"; break; fi
    done
fi
PY="${PY:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export COMMKIT_CACHE_DIR="${COMMKIT_CACHE_DIR:-$REPO/.jit-cache}"
SANITIZER="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
TIMEOUT_ARGS=""
"$PY" -c "import pytest_timeout" >/dev/null 2>&1 && TIMEOUT_ARGS="--timeout=60"

step_cmd() {  # the command line of a step
    local t="$PY -m pytest -q -rA -p no:cacheprovider -m gpu $TIMEOUT_ARGS"
    case "$1" in
        env) echo "record_env" ;;
        jit) echo "$PY -m commkit jit warm --quiet --out \"$COMMKIT_CACHE_DIR\"" ;;
        tests_kernels) echo "$t tests/gpu/test_kernels_gpu.py" ;;
        tests_backend) echo "$t tests/gpu/test_kernels_backend_gpu.py" ;;
        tests_count) echo "$t tests/gpu/test_count_exchange_gpu.py" ;;
        tests_fabric) echo "$t tests/gpu/test_fabric_gpu.py" ;;
        nodes) echo "$t tests/gpu/test_internode_gpu.py" ;;
        bench) echo "$PY -m commkit bench --virtual 8 --shape deepseek-v3 --dtype bf16 --dtype fp8 --num-sms 16 --num-sms 24 --reps 10 --warmup 3 --no-progress --out \"\$WORK/bench\" && $PY bench/d2d_ratio.py \"\$WORK/bench/bench.json\" && cp \"\$WORK/bench/bench.json\" \"\$WORK/bench/bench.png\" \"\$OUT/\"" ;;
        overlap) echo "$PY -m commkit overlap --virtual 4 --shape deepseek-v3 --num-sms 5 --reps 10 --warmup 2 --no-progress --out \"\$WORK/overlap\" && cp \"\$WORK/overlap/overlap.json\" \"\$WORK/overlap/overlap.png\" \"\$OUT/\"" ;;
        memcheck) echo "memcheck" ;;
        stress) echo "$PY tests/gpu/stress.py --rounds 1000000 --progress 200 --max-seconds \"\$((LIMIT - 20))\"" ;;
    esac
}

record_env() {
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        local commit
        commit="$(git rev-parse HEAD 2>/dev/null)"
        if [[ -n "$commit" ]]; then
            echo "commit: $commit (git)"
        elif [[ -n "${COMMKIT_COMMIT:-}" ]]; then
            echo "commit: $COMMKIT_COMMIT (COMMKIT_COMMIT)"
        else
            echo "commit: $("$PY" -c "import json,sys; m=json.load(open(sys.argv[1])); print(m.get('commit') or 'unknown', '(the JIT cache manifest; dirty tree)' if m.get('dirty') else '(the JIT cache manifest)')" "$COMMKIT_CACHE_DIR/warm.json" 2>/dev/null || echo 'unknown (no .git, COMMKIT_COMMIT unset, no cache manifest)')"
        fi
        echo "gpu: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>&1 | head -n 1)"
        echo "driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1 | head -n 1)"
        echo "nvcc: $(nvcc --version 2>&1 | grep -i release | tail -n 1)"
        echo "compute-sanitizer: $SANITIZER"
        "$PY" - <<'EOF'
import importlib.metadata as md, platform
print("python:", platform.python_version())
try:
    import torch
    print("torch:", torch.__version__, "cuda", torch.version.cuda)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("sms:", p.multi_processor_count)
        print("memory_gib:", round(p.total_memory / 2**30, 1))
except Exception as exc:  # noqa: BLE001
    print("torch: unavailable:", exc)
try:
    import cupy
    print("cupy:", cupy.__version__)
except Exception as exc:  # noqa: BLE001
    print("cupy: unavailable:", exc)
for dist in ("nvidia-nccl-cu13", "nvidia-nccl-cu12", "pytest-timeout", "cuda-bindings"):
    try:
        print(f"{dist}:", md.version(dist))
    except md.PackageNotFoundError:
        pass
EOF
    } >"$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
    nvidia-smi
}

memcheck() {
    if [[ ! -x "$SANITIZER" ]]; then
        echo "memcheck refused: compute-sanitizer not found ($SANITIZER)"
        return 3
    fi
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 1 "$PY" tests/gpu/run_small.py
    local rc=$?
    return "$rc"
}
export -f record_env memcheck
export PY OUT SANITIZER

jit_entries() { find "$COMMKIT_CACHE_DIR" -name kernel.json 2>/dev/null | wc -l; }

# ------------------------------------------------------------------ dry run
if [[ "$DRY_RUN" == 1 ]]; then
    echo "gpu_check dry run: deadline $DEADLINE s; python: $PY; cache: $COMMKIT_CACHE_DIR; out: $OUT"
    printf '%-14s %7s %6s %9s  %s\n' step budget start predicted "why / command"
    at=0
    warm_steps=""
    for s in $STEPS; do
        if [[ " $SELECTED " != *" $s "* ]]; then
            printf '%-14s %7s %6s %9s  %s\n' "$s" - - - "not selected"
            continue
        fi
        left=$((DEADLINE - at))
        b=${BUDGET[$s]}
        if [[ $s == stress ]]; then b=$((left - TAIL_RESERVE)); fi
        if ((left < MIN_STEP || b < MIN_STEP)); then
            printf '%-14s %7s %6s %9s  %s\n' "$s" 0 "$at" - "SKIPPED: no time ($left s left)"
            continue
        fi
        ((b > left)) && b=$left
        p=${PREDICT[$s]}
        [[ $s == stress ]] && p=$b
        printf '%-14s %7s %6s %9s  %s\n' "$s" "$b" "$at" "$p" "${WHY[$s]}"
        printf '%-14s %7s %6s %9s    $ %s\n' "" "" "" "" "${GPU_CHECK_TEST_CMD:-$(step_cmd "$s")}"
        at=$((at + b))
        [[ -n "${WARM_STEP[$s]:-}" && " $warm_steps " != *" ${WARM_STEP[$s]} "* ]] && warm_steps+=" ${WARM_STEP[$s]}"
    done
    echo "total: $at s of the $DEADLINE s deadline (each step at most its budget; stress gets what the others leave)"
    if ! "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
        echo "note: pytest-timeout not importable here: no per-test timeouts (the device has it: --timeout=60)"
    fi
    if [[ -n "$warm_steps" ]]; then
        warm_list="$(echo $warm_steps | tr ' ' ',')"
        echo "instantiations ($PY -m commkit jit warm --dry-run --steps $warm_list):"
        "$PY" -m commkit jit warm --dry-run --out "$COMMKIT_CACHE_DIR" --steps "$warm_list" ||
            echo "(cannot list them: $PY cannot import commkit; set PYTHON to a python with torch)"
    fi
    exit 0
fi

# ------------------------------------------------------------------ run
mkdir -p "$OUT" || die "cannot create $OUT"
rm -f "$OUT/summary.txt" "$OUT/log.txt"
WORK="$(mktemp -d)"
export WORK
trap 'rm -rf "$WORK"' EXIT
failed=0
summary() { echo "$1" | tee -a "$OUT/summary.txt"; }
summary "gpu_check: deadline $DEADLINE s; steps:$SELECTED; python $PY; cache $COMMKIT_CACHE_DIR"
entries_before=$(jit_entries)
for s in $SELECTED; do
    left=$((DEADLINE - SECONDS))
    limit=${BUDGET[$s]}
    [[ $s == stress ]] && limit=$((left - TAIL_RESERVE))
    ((limit > left)) && limit=$left
    if ((left < MIN_STEP || limit < MIN_STEP)); then
        summary "$s: SKIPPED: no time ($left s left of $DEADLINE)"
        continue
    fi
    cmd="${GPU_CHECK_TEST_CMD:-$(step_cmd "$s")}"
    {
        echo
        echo "=== $s (budget $limit s, at $SECONDS s): $cmd"
    } >>"$OUT/log.txt"
    start=$SECONDS
    LIMIT=$limit timeout --kill-after=5 "$limit" bash -c "$cmd" >"$WORK/$s.txt" 2>&1
    rc=$?
    cat "$WORK/$s.txt" >>"$OUT/log.txt"
    took=$((SECONDS - start))
    detail="$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped)|(passed|failed|error)s? in [0-9.]+s' "$WORK/$s.txt" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')"
    [[ -z "$detail" ]] && detail="$(grep -v '^\s*$' "$WORK/$s.txt" | tail -n 1 | cut -c1-160)"
    if ((rc == 124 || rc == 137)); then
        status="TIMEOUT after $limit s"
    elif ((rc == 0)); then
        status="PASS"
    elif [[ $s == memcheck ]] && { ((rc == 3)) || grep -qiE 'not supported|unsupported device|refused|Device not supported|No supported' "$WORK/$s.txt"; } && ! grep -q '^run_small:' "$WORK/$s.txt"; then
        status="REFUSED (recorded, not a failure)"
        detail="$(grep -iE 'not supported|unsupported|refused|not found' "$WORK/$s.txt" | head -n 1 | cut -c1-160)"
        rc=0
    else
        status="FAIL rc=$rc"
    fi
    summary "$s: $status (${took} s of $limit s) ${detail}"
    if [[ "$status" == FAIL* || "$status" == TIMEOUT* ]]; then failed=$((failed + 1)); fi
done
entries_after=$(jit_entries)
summary "jit: $((entries_after - entries_before)) instantiations compiled during the check (0 when the warm covered it)"
summary "failed steps: $failed (wall ${SECONDS} s)"
exit "$failed"
