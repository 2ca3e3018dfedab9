#!/usr/bin/env bash
# The GPU check (issue 11): one command, at most 8 minutes, on a machine with an NVIDIA GPU.
#
#   scripts/gpu-check.sh --prepare        on a build machine (Rust, no GPU needed): the release
#                                         binary and the GPU test binaries, stripped and gzipped,
#                                         the commit, and the torchcfm + POT wheels, into .gpu-bin/
#                                         (git-ignored; carry it to the GPU machine)
#   scripts/gpu-check.sh [--out DIR] [--budget S] [--dry-run]
#                                         the check; DIR defaults to $OUT (the device machine's
#                                         output folder), else bench/results
#
# Every step runs under `timeout` (its own limit, cut to what is left of the budget, 480 s by
# default; a step with under 10 s left is skipped), writes its result file (steps/<name>.json,
# with its .out/.err) as soon as it ends, and the summary DIR/<date>-<device>.json (schema in
# scripts/gpu_check_summary.py; a missing measurement is null with the reason) is rewritten after
# every step: a hang or a kill loses nothing that finished. The order puts what matters most
# first: the GPU tests (briefly), our benchmarks (kernels; bf16 then f32 sampling, round, U-Net),
# PyTorch (torchcfm's UNetModelWrapper, eager AMP/f32/TF32, then torch.compile), then the rest
# (f16, the NVRTC test, the tests again with the GEMM convolutions).
#
# Under the device tool ($OUT set), at most 8 files come back: DIR holds the summary, the log
# and steps.tar.gz (every step file, re-packed after each step) and nothing else.
#
# --dry-run hides the GPUs (CUDA_VISIBLE_DEVICES=) so that every GPU step fails at once and the
# plumbing (timeouts, result files, the summary with its reasons) is checked anywhere.
#
# Libraries: ORWCFM_CUDA_LIB_DIRS, else the `nvidia` Python packages of python3 (the cuBLAS,
# cuDNN, NVRTC wheels beside torch), else the system's. Which files were really bound (ours and
# torch's, from /proc/self/maps) is in the summary under "libraries", with any library mapped
# from two files under "duplicates".
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
COMMAND="scripts/gpu-check.sh $*"

GPU_TESTS="gpu_ops nvrtc_kernels"
TORCHCFM_WHEELS="torchcfm==1.0.7 pot==0.9.5"

prepare() {
    set -e
    echo "== build"
    cargo build --release --bin orwcfm-fast
    local tests="" t
    for t in $GPU_TESTS; do tests="$tests --test $t"; done
    # cargo names the test executables
    # shellcheck disable=SC2086
    cargo test --release --no-run --message-format=json $tests > /tmp/gpu-check-tests.json
    rm -rf .gpu-bin
    mkdir -p .gpu-bin/wheels
    cp target/release/orwcfm-fast .gpu-bin/orwcfm-fast
    for t in $GPU_TESTS; do
        local exe
        exe=$(python3 -c 'import json, sys
name = sys.argv[1]
for line in open(sys.argv[2]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == name and m.get("executable"):
        print(m["executable"])' "$t" /tmp/gpu-check-tests.json | tail -1)
        [ -n "$exe" ] || { echo "cargo built no test executable named $t"; exit 1; }
        cp "$exe" ".gpu-bin/$t"
    done
    for f in .gpu-bin/*; do
        [ -f "$f" ] || continue
        strip "$f"
        gzip -9 "$f"
    done
    git rev-parse HEAD > .gpu-bin/COMMIT
    if git status --porcelain | grep -q .; then echo "+uncommitted changes" >> .gpu-bin/COMMIT; fi
    echo "== wheels (torchcfm and POT for the GPU machine's Python 3.12, which has torch, numpy, scipy)"
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu-bin/wheels $TORCHCFM_WHEELS
    ls -la .gpu-bin .gpu-bin/wheels
    local carried tree
    carried=$(du -sb .gpu-bin | cut -f1)
    tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    echo "carried .gpu-bin: $((carried / 1024)) KiB; tracked tree: $((tree / 1024)) KiB; together $(((carried + tree) / 1048576)) MiB of the 64 MiB a call may carry"
    if [ $((carried + tree)) -gt $((60 * 1048576)) ]; then echo "too large to carry"; exit 1; fi
}

OUTDIR=${OUT:-}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --prepare) prepare; exit 0 ;;
        --out) OUTDIR=$2; shift ;;
        --out=*) OUTDIR=${1#--out=} ;;
        --budget) BUDGET=$2; shift ;;
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (see --help)"; exit 2 ;;
    esac
    shift
done
OUTDIR=${OUTDIR:-$ROOT/bench/results}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
START=$(date +%s)
DEADLINE=$((START + BUDGET))
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
# under the device tool only a few files come back: the step files are packed
if [ -n "${OUT:-}" ] && [ "$OUTDIR" = "$(cd "$OUT" && pwd)" ]; then PACK=1; STEPS=$WORK/steps; else PACK=0; STEPS=$OUTDIR/steps; fi
mkdir -p "$STEPS"
LOG=$OUTDIR/gpu-check.log
: > "$LOG"
say() { echo "$@" | tee -a "$LOG"; }
[ "$DRY" = 1 ] && { export CUDA_VISIBLE_DEVICES=; say "== dry run: the GPUs are hidden (CUDA_VISIBLE_DEVICES=)"; }
HAVE_TIMEOUT=1
command -v timeout >/dev/null 2>&1 || { HAVE_TIMEOUT=0; say "warning: no timeout command: steps run without a limit"; }
# tmo SECONDS CMD...: CMD under a limit (the setup's commands too: nothing may hang the check)
tmo() {
    local s=$1 left=$((DEADLINE - $(date +%s)))
    shift
    # never past the budget (the bookkeeping gets 20 s grace)
    [ "$s" -gt $((left + 20)) ] && s=$((left + 20))
    [ "$s" -lt 5 ] && s=5
    if [ "$HAVE_TIMEOUT" = 1 ]; then timeout -k 5 "$s" "$@"; else "$@"; fi
}

# the binaries: .gpu-bin/ (made by --prepare) when it matches the tree or there is no cargo
BIN=""
declare -A TESTBIN
COMMIT=$(git rev-parse HEAD 2>/dev/null || true)
if [ -f .gpu-bin/COMMIT ] && { ! command -v cargo >/dev/null 2>&1 || [ "$(head -1 .gpu-bin/COMMIT)" = "$COMMIT" ]; }; then
    say "== binaries from .gpu-bin/ ($(tr '\n' ' ' < .gpu-bin/COMMIT))"
    mkdir -p "$WORK/bin"
    for f in .gpu-bin/*.gz; do gzip -dc "$f" > "$WORK/bin/$(basename "$f" .gz)" && chmod +x "$WORK/bin/$(basename "$f" .gz)"; done
    BIN=$WORK/bin/orwcfm-fast
    for t in $GPU_TESTS; do TESTBIN[$t]=$WORK/bin/$t; done
    COMMIT=$(tr '\n' ' ' < .gpu-bin/COMMIT | sed 's/ *$//')
elif command -v cargo >/dev/null 2>&1; then
    say "== build (cargo; not counted in the budget)"
    cargo build --release --bin orwcfm-fast 2>&1 | tail -2 | tee -a "$LOG"
    BIN=$ROOT/target/release/orwcfm-fast
    tests=""
    for t in $GPU_TESTS; do tests="$tests --test $t"; done
    # shellcheck disable=SC2086
    cargo test --release --no-run --message-format=json $tests 2>/dev/null > "$WORK/tests.json"
    for t in $GPU_TESTS; do
        TESTBIN[$t]=$(python3 -c 'import json, sys
for line in open(sys.argv[2]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$t" "$WORK/tests.json" | tail -1)
    done
    git status --porcelain 2>/dev/null | grep -q . && COMMIT="$COMMIT +uncommitted changes"
    START=$(date +%s)
    DEADLINE=$((START + BUDGET))
else
    say "== no binaries: neither .gpu-bin/ (scripts/gpu-check.sh --prepare) nor cargo; every step of ours fails"
    COMMIT=${COMMIT:-unknown}
fi

# torchcfm for PyTorch: the carried wheels, installed apart from the system's packages
PY=${TORCH_PYTHON:-python3}
if ls .gpu-bin/wheels/*.whl >/dev/null 2>&1; then
    if tmo 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .gpu-bin/wheels/*.whl >> "$LOG" 2>&1; then
        export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
        say "== torchcfm and POT from .gpu-bin/wheels"
    else
        say "warning: the carried wheels did not install (see the log)"
    fi
fi

if [ -z "${ORWCFM_CUDA_LIB_DIRS:-}" ]; then
    d=$(tmo 20 "$PY" -c 'import nvidia, os; print(list(nvidia.__path__)[0])' 2>/dev/null) && export ORWCFM_CUDA_LIB_DIRS="$d"
fi
export ORWCFM_KERNEL_CACHE=${ORWCFM_KERNEL_CACHE:-$WORK/kernels}
DEVNAME=$(tmo 30 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
DRIVER=$(tmo 30 nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
[ "$DRY" = 1 ] && DEVNAME="${DEVNAME:-no-gpu} dry-run"
export GC_DEVICE=${DEVNAME:-no-gpu} GC_DRIVER=${DRIVER:-} GC_COMMIT=$COMMIT GC_COMMAND=$COMMAND GC_START=$START GC_BUDGET=$BUDGET GC_DRY=$DRY
say "== $GC_DEVICE, driver ${DRIVER:-none}, commit $COMMIT, budget ${BUDGET}s, results in $OUTDIR"
SUMMARY=""
summarize() {
    SUMMARY=$(tmo 60 python3 scripts/gpu_check_summary.py summary "$STEPS" "$OUTDIR" 2>>"$LOG")
    if [ "$PACK" = 1 ]; then tar -czf "$OUTDIR/steps.tar.gz.tmp" -C "$WORK" steps 2>/dev/null && mv "$OUTDIR/steps.tar.gz.tmp" "$OUTDIR/steps.tar.gz"; fi
}

# step NAME LIMIT_S [--result FILE] CMD...: run CMD under the limit (cut to the budget), record it
step() {
    local name=$1 limit=$2 result=""
    shift 2
    if [ "${1:-}" = "--result" ]; then result=$2; shift 2; fi
    local left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 10 ]; then
        tmo 60 python3 scripts/gpu_check_summary.py skip "$STEPS" "$name" "the ${BUDGET} s budget was spent before it" 2>>"$LOG"
        say "== $name: skipped (budget spent)"
        summarize
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    if [ -z "${1:-}" ] || { [ "${1#/}" != "$1" ] && [ ! -x "$1" ]; }; then
        echo "error: missing executable '${1:-}' (build it: scripts/gpu-check.sh --prepare)" > "$STEPS/$name.err"
        : > "$STEPS/$name.out"
        tmo 60 python3 scripts/gpu_check_summary.py step "$STEPS" "$name" 127 0 "$limit" 2>>"$LOG"
        say "== $name: FAILED (missing executable ${1:-})"
        summarize
        return
    fi
    say "== $name (limit ${limit}s): $*"
    local t0 t1 rc
    t0=$(date +%s.%N)
    tmo "$limit" "$@" > "$STEPS/$name.out" 2> "$STEPS/$name.err"
    rc=$?
    t1=$(date +%s.%N)
    tmo 60 python3 scripts/gpu_check_summary.py step "$STEPS" "$name" "$rc" "$(awk "BEGIN{print $t1 - $t0}")" "$limit" $result 2>>"$LOG"
    grep -v '^{' "$STEPS/$name.out" | tail -15 | tee -a "$LOG"
    tail -3 "$STEPS/$name.err" | sed 's/^/  stderr: /' | tee -a "$LOG"
    say "   -> exit $rc in $(awk "BEGIN{printf \"%.1f\", $t1 - $t0}") s"
    summarize
}

summarize # a valid summary (everything missing, with why) before the first step
B=(--unet-config cifar10 --batch 128 --device cuda)
# 1. the device opens (compiles the kernels into the cache for the later steps) and the libraries
step devices 120 "$BIN" devices --json
# 2. the GPU tests, briefly
step test_gpu_ops 150 env ORWCFM_REQUIRE_GPU=1 "${TESTBIN[gpu_ops]:-}" --test-threads=1
# 3. ours: kernels, then bf16 and f32 sampling, round and U-Net
step ours_kernels 90 "$BIN" bench kernels --device cuda --dtypes f32,bf16 --json
# (--max-seconds: no further timed run after that, so a slow precision still reports one)
for p in bf16 f32; do
    step "ours_sample_$p" 60 "$BIN" bench sample "${B[@]}" --steps 100 --precision "$p" --iters 3 --warmup 1 --max-seconds 30 --json
    step "ours_round_$p" 90 "$BIN" bench round "${B[@]}" --steps 100 --precision "$p" --iters 3 --warmup 1 --max-seconds 45 --json
    step "ours_unet_$p" 60 "$BIN" bench unet "${B[@]}" --precision "$p" --iters 10 --warmup 3 --json
done
# 4. PyTorch on the same GPU: eager (AMP first), then torch.compile with its own limit
step torch_eager 200 --result "$STEPS/torch_eager.result.json" env PYTHONUNBUFFERED=1 "$PY" scripts/bench_torch_gpu.py --modes amp_bf16,amp_f16,f32,tf32 --out "$STEPS/torch_eager.result.json"
step torch_compile 180 --result "$STEPS/torch_compile.result.json" env PYTHONUNBUFFERED=1 "$PY" scripts/bench_torch_gpu.py --modes compile_bf16 --out "$STEPS/torch_compile.result.json"
# 5. the rest
step ours_sample_f16 60 "$BIN" bench sample "${B[@]}" --steps 100 --precision f16 --iters 3 --warmup 1 --max-seconds 30 --json
step ours_round_f16 90 "$BIN" bench round "${B[@]}" --steps 100 --precision f16 --iters 3 --warmup 1 --max-seconds 45 --json
step ours_unet_f16 60 "$BIN" bench unet "${B[@]}" --precision f16 --iters 10 --warmup 3 --json
step test_nvrtc_kernels 60 env ORWCFM_REQUIRE_NVRTC=1 "${TESTBIN[nvrtc_kernels]:-}" --test-threads=1
step test_gpu_ops_gemmconv 150 env ORWCFM_REQUIRE_GPU=1 ORWCFM_CONV=gemm "${TESTBIN[gpu_ops]:-}" --test-threads=1

summarize
say "== summary: $SUMMARY"
python3 - "$SUMMARY" <<'EOF' | tee -a "$LOG"
import json, sys
try:
    s = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"no summary ({e})"); sys.exit(1)
st = s["steps"]
bad = {n: r for n, r in st.items() if r["status"] != "ok"}
print(f"{len(st) - len(bad)} of {len(st)} steps ok; tests: {sum(v == 'ok' for v in s['tests'].values())} ok, {sum(v != 'ok' for v in s['tests'].values())} FAILED")
for n, r in bad.items():
    print(f"  {n}: {r['status']}: {r['reason']}")
for n, t in s["targets"].items():
    v = "-" if t["value"] is None else f"{t['value']:.3g}"
    print(f"  target {n}: {v} (target {t['target']}) {'met' if t['met'] else 'NOT met' if t['met'] is False else 'not measured'}")
print("GPU CHECK", "PASSED" if not bad else "FAILED")
sys.exit(0 if not bad else 1)
EOF
rc=${PIPESTATUS[0]}
echo "steps in $STEPS"
exit "$rc"
