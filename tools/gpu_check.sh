#!/usr/bin/env bash
# GPU check: the GPU tests, then the GPU benchmark (tools/gpu_bench.py) on small shapes, then a big
# shape and the rest of the suite if time remains, all within one time budget (docs/GPU_CHECK.md).
# Installs nothing: runs skipdeploy from this source tree (PYTHONPATH) with whatever python is on
# PATH (or $PYTHON); what is absent is skipped with a line. Results are never held back for the
# end: every phase writes its log to OUTDIR at once, and bench.json after every timed call.
#
#   tools/gpu_check.sh [--budget SECONDS] [--plan] [OUTDIR]
#
#   OUTDIR         logs, bench.json, phases.txt [default: $OUT, else /tmp/skipdeploy-gpu-check]
#   --budget / $BUDGET   seconds for the whole script [default 520: fits a 540 s device call, kills included]
#   --plan         print how the budget is split (each phase at its limit) and run nothing
#   $SHAPES        benchmark shapes measured first [default: opt-125m smollm2-135m]
#   $BIG_SHAPE     measured only if time remains [default: opt-1.3b; empty: none]
#   $REST_TESTS    pytest targets of the last step [default: tests, on a CUDA machine only]
#
# Exit status: 0 when nothing failed, 1 when a test or a benchmark check failed. A phase cut by
# the time budget (timeout's exit 124/137) is reported as such, not as a failure of the code.
set -u
CALLER=$(pwd)  # a relative OUTDIR is the caller's, not the repository's
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-520}
PLAN=""
OUTDIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --budget) BUDGET=${2:?--budget needs a number of seconds}; shift 2 ;;
        --budget=*) BUDGET=${1#--budget=}; shift ;;
        --plan) PLAN=1; shift ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        /*) OUTDIR=$1; shift ;;
        *) OUTDIR=$CALLER/$1; shift ;;
    esac
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check.sh: the budget must be a whole number of seconds, not '$BUDGET'" >&2
                               exit 2 ;; esac
SHAPES=${SHAPES-opt-125m smollm2-135m}
BIG_SHAPE=${BIG_SHAPE-opt-1.3b}

# -- the budget ----------------------------------------------------------------------------------
# Each phase may take at most its cap, less what the phases after it are promised, so that a slow
# or hung phase cannot starve the benchmark; time a phase does not use flows to the next ones.
RESERVE=10                               # the summary at the end
ENV_CAP=45                               # importing torch on a fresh machine: ~10 s
TESTS_MIN=30
TESTS_CAP=$(( BUDGET * 25 / 100 ))       # tests/test_gpu.py
SMALL_MIN=60
SMALL_CAP=$(( BUDGET * 20 / 100 ))       # each of $SHAPES: checkpoint, export, loads, capture, rounds
[ "$TESTS_CAP" -lt "$TESTS_MIN" ] && TESTS_CAP=$TESTS_MIN
[ "$SMALL_CAP" -lt "$SMALL_MIN" ] && SMALL_CAP=$SMALL_MIN
BIG_MIN=150                              # $BIG_SHAPE runs only with this much left
REST_MIN=30                              # the rest of the suite, last, with whatever is left
BENCH_MARGIN=10                          # the benchmark's own soft budget stops this much before its limit

START=$(date +%s)
SIM=0                                    # --plan: the clock, advanced by each phase's full limit
now() { if [ -n "$PLAN" ]; then echo "$SIM"; else echo $(( $(date +%s) - START )); fi; }

# limit CAP PROMISED: seconds the next phase may take
limit() {
    local left=$(( BUDGET - RESERVE - $(now) - $2 ))
    [ "$left" -gt "$1" ] && left=$1
    echo "$left"
}

status=0
PHASES=()   # "name seconds outcome" lines for the summary

# phase NAME CAP PROMISED MIN LOG SIGNAL -- COMMAND...: run COMMAND under its limit, teeing LOG;
# sets PHASE_RC (-1 when skipped). In --plan mode it runs nothing and spends its whole limit.
phase() {
    local name=$1 cap=$2 promised=$3 min=$4 log=$5 sig=$6
    shift 7
    local lim t0
    lim=$(limit "$cap" "$promised")
    PHASE_RC=-1
    if [ "$lim" -lt "$min" ]; then
        local mark="=="; [ -n "$PLAN" ] && mark="plan:"
        echo "$mark $name: skipped (the time budget leaves $(( lim > 0 ? lim : 0 )) s, it needs $min s)"
        PHASES+=("$name: skipped (time budget)")
        return
    fi
    if [ -n "$PLAN" ]; then
        echo "plan: $name $lim"
        SIM=$(( SIM + lim ))
        PHASE_RC=0
        return
    fi
    echo "== $name (at $(now) s; limit $lim s)"
    t0=$(now)
    timeout --signal="$sig" --kill-after=10 "$lim" "$@" 2>&1 | tee "$OUT/$log"
    PHASE_RC=${PIPESTATUS[0]}
    PHASE_SECONDS=$(( $(now) - t0 ))
}

# outcome NAME [what exit 1 means]: one line for the phase that just ran; a cut is no failure.
outcome() {
    local name=$1 line
    case "$PHASE_RC" in
        -1) return ;;
        0) line="ok" ;;
        124|137) line="cut by the time budget after $PHASE_SECONDS s (not a failure of the code)" ;;
        5) line="no tests collected" ;;
        *) line="FAILED (exit $PHASE_RC${2:+: $2})"; status=1 ;;
    esac
    [ -n "$PLAN" ] || { echo "$name: $line"; PHASES+=("$name: $PHASE_SECONDS s, $line"); }
}

skip() {  # NAME WHY
    echo "== $1: skipped ($2)"
    PHASES+=("$1: skipped ($2)")
}

NSHAPES=$(echo $SHAPES | wc -w)
if [ -n "$PLAN" ]; then  # the same flow below, on the GPU machine's branch, with nothing run
    echo "plan for a budget of $BUDGET s (each phase at its limit; reserve $RESERVE s for the summary):"
    OUT=/dev/null WORK=/nonexistent
else
    OUT=${OUTDIR:-${OUT:-/tmp/skipdeploy-gpu-check}}
    mkdir -p "$OUT"
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/skipdeploy-gpu-work.XXXXXX")  # checkpoints + exports, removed at the end
    trap 'rm -rf "$WORK"' EXIT
    echo "gpu_check: budget $BUDGET s; results in $OUT"
    if ! command -v "$PY" >/dev/null; then
        echo "gpu_check: no $PY on PATH (set PYTHON): nothing can run"; exit 1
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1  # a phase cut off at its time limit still shows how far it got

phase "environment" "$ENV_CAP" 0 5 environment.txt TERM -- "$PY" - <<'EOF'
import importlib, platform, warnings
warnings.simplefilter("ignore")  # e.g. click's deprecated __version__: noise in a log read from afar
print("python", platform.python_version())
for name in ("torch", "transformers", "onnx", "onnxruntime", "numpy", "click", "tokenizers", "tqdm", "pytest",
             "hypothesis", "cupy", "tensorrt", "polygraphy"):
    try:
        module = importlib.import_module(name)
        print(f"{name:<13} {getattr(module, '__version__', '?')}")
    except Exception as exc:
        print(f"{name:<13} absent ({type(exc).__name__}: {exc})"[:160])
cuda = False
try:
    import torch
    cuda = torch.cuda.is_available()
    print("torch cuda", torch.version.cuda, "available", cuda, torch.cuda.get_device_name(0) if cuda else "")
except Exception as exc:
    print("torch unusable:", exc)
try:
    import onnxruntime
    print("onnxruntime providers", onnxruntime.get_available_providers())
except Exception as exc:
    print("onnxruntime unusable:", exc)
try:
    import skipdeploy
    print("skipdeploy", skipdeploy.__version__, "from", skipdeploy.__file__)
except Exception as exc:
    print("skipdeploy does not import:", type(exc).__name__, exc)
print("cuda:", "yes" if cuda else "no")
EOF
outcome "environment"
CUDA=no HAS_PYTEST=no HAS_TORCH=no IGNORE=()
if [ -n "$PLAN" ]; then
    CUDA=yes HAS_PYTEST=yes HAS_TORCH=yes
else
    grep -q '^torch .*absent' "$OUT/environment.txt" 2>/dev/null || HAS_TORCH=yes
    # Only a definite "no" turns the GPU steps off: an environment step cut short must not.
    grep -q '^cuda: no' "$OUT/environment.txt" 2>/dev/null || CUDA=yes
    grep -q '^pytest .*absent' "$OUT/environment.txt" 2>/dev/null || HAS_PYTEST=yes
    grep -q '^hypothesis .*absent' "$OUT/environment.txt" 2>/dev/null \
        && IGNORE=(--ignore=tests/test_properties.py --ignore=tests/test_schedule.py)
fi

# The GPU tests (their CPU-checkable paths run everywhere; the GPU ones say why they skip).
if [ "$HAS_PYTEST" = yes ]; then
    phase "gpu tests" "$TESTS_CAP" $(( NSHAPES * SMALL_MIN )) "$TESTS_MIN" test_gpu.log INT -- \
        "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py
    outcome "gpu tests" "a test failed (see test_gpu.log)"
else
    skip "gpu tests" "pytest is not installed here"
fi

# bench SHAPE CAP PROMISED MIN: one gpu_bench run, its own process (GPU memory freed after it).
bench() {
    local shape=$1 lim
    lim=$(limit "$2" "$3")
    phase "bench $shape" "$2" "$3" "$4" "bench-$shape.log" TERM -- \
        "$PY" tools/gpu_bench.py --shape "$shape" --json "$OUT/bench.json" --workdir "$WORK/$shape" \
        --budget $(( lim - BENCH_MARGIN > 20 ? lim - BENCH_MARGIN : 20 ))
    outcome "bench $shape" "a correctness check failed or the benchmark broke (see bench-$shape.log)"
    [ -n "$PLAN" ] || rm -rf "${WORK:?}/$shape"
}

if [ "$CUDA" = yes ]; then
    n=0
    for shape in $SHAPES; do  # each promises the minimum to the small shapes after it
        n=$(( n + 1 ))
        bench "$shape" "$SMALL_CAP" $(( (NSHAPES - n) * SMALL_MIN )) "$SMALL_MIN"
    done
    [ -n "$BIG_SHAPE" ] && bench "$BIG_SHAPE" "$BUDGET" 0 "$BIG_MIN"
else
    skip "bench $SHAPES${BIG_SHAPE:+ $BIG_SHAPE}" "no CUDA GPU visible to torch"
    # The benchmark's own CPU smoke path still runs, on tiny shapes, so that its code is exercised.
    [ "$HAS_TORCH" = yes ] || skip "bench cpu smoke" "torch is not installed here (the benchmark runs on torch)"
    for shape in $([ "$HAS_TORCH" = yes ] && echo tiny tiny-llama); do
        phase "bench cpu smoke $shape" 80 0 20 "bench-cpu-$shape.log" TERM -- \
            "$PY" tools/gpu_bench.py --device cpu --shape "$shape" --batches 1,2 --new-tokens 6 --prompt 4 \
            --repeats 2 --budget 60 --json "$OUT/bench.json" --workdir "$WORK/$shape"
        outcome "bench cpu smoke $shape" "see bench-cpu-$shape.log"
    done
fi

# The rest of the suite, last: it runs on every CPU machine anyway, so only leftover time goes to it.
if [ "$HAS_PYTEST" != yes ]; then
    skip "rest of the suite" "pytest is not installed here"
elif [ "$CUDA" != yes ] && [ -z "${REST_TESTS:-}" ]; then
    skip "rest of the suite" "no CUDA GPU: the CPU machines run it (set REST_TESTS to run it here)"
else
    # shellcheck disable=SC2086  # REST_TESTS is a list of pytest targets
    phase "rest of the suite" "$BUDGET" 0 "$REST_MIN" test_rest.log INT -- \
        "$PY" -m pytest -q -p no:cacheprovider -x --continue-on-collection-errors ${IGNORE[@]+"${IGNORE[@]}"} \
        --ignore=tests/test_gpu.py --ignore=tests/test_gpu_check.py ${REST_TESTS:-tests}
    outcome "rest of the suite" "a test failed (see test_rest.log)"
fi

if [ -n "$PLAN" ]; then
    echo "plan: total $SIM"
    exit 0
fi
echo "== summary ($(now) s of $BUDGET s)"
if [ -f "$OUT/bench.json" ]; then
    timeout "$RESERVE" "$PY" tools/gpu_bench_report.py "$OUT/bench.json"
    echo
fi
printf '%s\n' "${PHASES[@]}" | tee "$OUT/phases.txt"
echo "== done in $(now) s (status $status); logs in $OUT"
exit $status
